"""Reading a user's context file, with one clear sentence for every way it can be unusable."""

from __future__ import annotations

import sys
from pathlib import Path

from ltri.errors import LtriError

_SNIFF_BYTES = 8192


def read_text(path: str) -> str:
    """The UTF-8 text of path (``-`` reads standard input); LtriError if it is missing, empty or binary."""
    if path == "-":
        return _check_text(sys.stdin.buffer.read(), "standard input")
    file = Path(path)
    if not file.exists():
        raise LtriError(f"Context file {path} does not exist.")
    if file.is_dir():
        raise LtriError(f"Context file {path} is a directory, not a text file.")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise LtriError(f"Cannot read context file {path}: {exc.strerror or exc}.") from exc
    return _check_text(data, path)


def _check_text(data: bytes, name: str) -> str:
    if not data.strip():
        raise LtriError(f"Context {name} is empty: there is no text to read.")
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise LtriError(f"Context {name} looks like a binary file, not text.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LtriError(f"Context {name} is not UTF-8 text (invalid byte at offset {exc.start}).") from exc
    return text
