"""Numbers as people read them."""

from __future__ import annotations


def human_bytes(n: int | float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def first_words(text: str, n_words: int = 12) -> str:
    """The first n_words of text on one line, with an ellipsis when there is more."""
    words = text.split()
    return " ".join(words[:n_words]) + (" …" if len(words) > n_words else "")
