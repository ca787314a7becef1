"""The chat's slash commands. Each takes the chat and the text after its name; /bye returns False."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ltri.cli.chat_reports import settings_line, spans_lines, stats_lines
from ltri.cli.progress import note

from ltri.errors import LtriError

HELP = '''Commands:
  /help             this list
  /stats            tokens read, spans stored, store size, memory, the last answer's speed
  /spans [N]        the stored spans the last answer drew on (default 8), with their first words
  /reset            forget the conversation, keep the text
  /set              show the answer settings
  /set NAME VALUE   change one: temperature, top_p, max_tokens or seed (none: no seed)
  /save DIR         save the text and the conversation so far into a new directory
  /bye              end the chat (so does Ctrl-D)
Ctrl-C stops an answer. """ starts a message of several lines, and """ ends it.'''

SETTINGS: dict[str, Callable[[str], object]] = {
    "temperature": float,
    "top_p": float,
    "max_tokens": int,
    "seed": lambda value: None if value.lower() == "none" else int(value),
}


def run_command(chat, line: str) -> bool:
    """Run one slash command; False when it ends the chat. A user error is reported and the chat goes on."""
    name, _, argument = line.strip().partition(" ")
    command = COMMANDS.get(name.lower())
    if command is None:
        chat.error(f"Unknown command {name}: /help lists the commands.")
        return True
    try:
        return command(chat, argument.strip()) is not False
    except LtriError as exc:
        chat.error(str(exc))
        return True


def _help(chat, argument: str) -> None:
    chat.say(HELP)


def _bye(chat, argument: str) -> bool:
    return False


def _stats(chat, argument: str) -> None:
    chat.say("\n".join(stats_lines(chat.session, chat.last)))


def _spans(chat, argument: str) -> None:
    try:
        limit = int(argument) if argument else 8
    except ValueError:
        raise LtriError(f"/spans takes a number of spans, got {argument!r}.") from None
    chat.say("\n".join(spans_lines(chat.session.retrieved_spans(max(limit, 1)))))


def _reset(chat, argument: str) -> None:
    chat.session.rewind(chat.saved)
    chat.last = None
    chat.say(f"Forgot the conversation; the text is still read ({chat.session.stats().tokens_seen:,} tokens).")


def _save(chat, argument: str) -> None:
    if not argument:
        raise LtriError("/save needs a directory: /save DIR (new or empty).")
    target = Path(argument).expanduser()
    own = chat.session.store_path
    if own is not None and target.resolve() == own.resolve():
        raise LtriError(f"{target} is this chat's own store: give /save a new or empty directory.")
    chat.session.save(target)
    chat.say(f"Saved to {target}: `ltri chat --store {target}` goes on from here.")


def _set(chat, argument: str) -> None:
    if not argument:
        chat.say(settings_line(chat.answer))
        return
    name, _, value = argument.partition(" ")
    field = name.lower().replace("-", "_")
    if field == "system":
        raise LtriError("The system prompt is read before the text: give --system when the text is read.")
    if field not in SETTINGS:
        raise LtriError(f"Unknown setting {name}: choose temperature, top_p, max_tokens or seed.")
    try:
        parsed = SETTINGS[field](value.strip())
    except ValueError:
        raise LtriError(f"{field} needs a number, got {value.strip()!r}.") from None
    chat.answer = replace(chat.answer, **{field: parsed}).checked()
    note(False, settings_line(chat.answer))


COMMANDS = {
    "/help": _help,
    "/?": _help,
    "/bye": _bye,
    "/exit": _bye,
    "/quit": _bye,
    "/stats": _stats,
    "/spans": _spans,
    "/reset": _reset,
    "/save": _save,
    "/set": _set,
}
