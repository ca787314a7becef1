"""The one exception type a user can cause: its message is a single sentence meant for people."""


class LtriError(Exception):
    """A problem with the user's input or environment (file, model, budget), not a bug in ltri."""
