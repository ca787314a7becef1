"""Running the app so that every user error ends in one line on stderr and a non-zero exit, no traceback."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from ltri.errors import LtriError


def run_guarded(command: Callable[[], object]) -> int:
    """Run command (the click app, not in standalone mode); the exit code it should end with."""
    import typer

    try:
        result = command()
    except LtriError as exc:
        return _fail(str(exc))
    except _click_errors() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `ltri` alone: the help is the answer
            exc.show()
            return exc.exit_code
        return _fail(_one_line(exc.format_message()), exc.exit_code)  # a bad option: one sentence
    except (KeyboardInterrupt, typer.Abort):
        return _interrupted()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        return _fail(out_of_memory_sentence(exc))
    if result == 130:  # typer turns Ctrl-C into this exit code
        return _interrupted()
    return result if isinstance(result, int) else 0


def out_of_memory_sentence(exc: BaseException) -> str:
    """torch's several-line out-of-memory report as one sentence with advice."""
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", str(exc))
    what = f" (it needed {asked.group(1)} more)" if asked else ""
    return (
        f"The GPU ran out of memory{what}: try a smaller --budget, --chunk or --window, a smaller model, "
        "or --device cpu."
    )


def _click_errors() -> tuple[type[Exception], ...]:
    """click's exception base, and typer's own copy of it (typer 0.2x carries a vendored click)."""
    import click

    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        return (click.ClickException,)
    return (click.ClickException, ClickException)


def _interrupted() -> int:
    sys.stderr.write("ltri: interrupted\n")
    return 130


def _out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"ltri: error: {message}\n")
    return code


def _one_line(message: str) -> str:
    return " ".join(message.split())
