"""Reading the chat's messages: one line each, or several between triple quotes, from a terminal or a pipe."""

from __future__ import annotations

import os
import signal
import sys

from ltri.errors import LtriError

QUOTES = '"""'
PROMPT, CONTINUATION = ">>> ", "... "


def read_message(interactive: bool) -> str | None:
    """The next message: a line, or the lines between a line starting with \"\"\" and the next \"\"\".

    None at the end of the input (Ctrl-D). Ctrl-C at the prompt raises KeyboardInterrupt.
    """
    line = _read_line(PROMPT, interactive)
    if line is None or not line.lstrip().startswith(QUOTES):
        return line
    first = line.lstrip()[len(QUOTES) :]
    if QUOTES in first:
        return first.split(QUOTES, 1)[0].strip()
    lines = [first]
    while True:
        more = _read_line(CONTINUATION, interactive)
        if more is None or QUOTES in more:
            lines.append("" if more is None else more.split(QUOTES, 1)[0])
            return "\n".join(lines).strip()
        lines.append(more)


def _read_line(prompt: str, interactive: bool) -> str | None:
    try:
        if interactive:
            return input(prompt)
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except EOFError:
        return None


def enable_line_editing() -> None:
    """Arrow keys and history at the prompt, where the platform has readline."""
    try:
        import readline  # noqa: F401 - importing it is what makes input() edit lines
    except ImportError:
        pass


def catch_ctrl_c() -> None:
    """Make Ctrl-C at the prompt raise KeyboardInterrupt even where the chat started with SIGINT ignored or blocked.

    Both are inherited from the parent process, and with SIGINT ignored at startup Python installs no handler, so
    a Ctrl-C at the prompt would vanish (the answer's own handler, ``CtrlC``, would still work, and then restore
    the ignoring). Those are exactly the symptoms of the chat test's hang in the full suite (benchmarks/speed/NOTES.md).
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)


def attach_terminal() -> None:
    """Read the questions from the terminal once the context came through standard input (--context -)."""
    try:
        terminal = os.open("/dev/tty", os.O_RDONLY)
    except OSError as exc:
        raise LtriError(
            "With --context -, chat reads the text from standard input and the questions from the terminal, "
            "but there is no terminal: use `ltri ask` or a context file."
        ) from exc
    os.dup2(terminal, 0)
    os.close(terminal)
    sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115 - lives as long as the program
