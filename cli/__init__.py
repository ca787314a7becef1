"""The ``ltri`` command line, imported as ltri.cli."""
