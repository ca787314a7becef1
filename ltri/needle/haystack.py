"""The haystack (a directory of .txt files, or generated filler) and the context of a cell: the
haystack trimmed by tokens, with the hidden sentence inserted at the sentence boundary nearest a depth."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ltri.filler import filler_text


@dataclass(frozen=True)
class Haystack:
    """Source text and the end character of each of its tokens (so that any token prefix is a text prefix)."""

    text: str
    token_ends: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ends)

    def prefix(self, n_tokens: int) -> str:
        return self.text[: self.token_ends[n_tokens - 1]] if n_tokens > 0 else ""

    def char_at_token(self, index: int) -> int:
        """Where token index starts (the text's end for index n_tokens)."""
        return 0 if index <= 0 else self.token_ends[min(index, self.n_tokens) - 1]


@dataclass(frozen=True)
class Context:
    """Haystack with the hidden sentence in it, as fed to the model."""

    text: str
    n_tokens: int  # tokens of text (haystack + sentence), measured with the tokenizer
    needle_chars: tuple[int, int]  # [start, end) of the hidden sentence in text
    depth_percent: float  # requested depth
    actual_depth_percent: float  # where the sentence's first character landed, in % of the text's tokens


def read_haystack_files(directory: Path) -> str:
    paths = sorted(directory.glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"{directory} holds no .txt files to make a haystack of")
    texts = [path.read_text(encoding="utf-8", errors="replace").strip() for path in paths]
    return "\n\n".join(text for text in texts if text)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_haystack(tokenizer, text: str) -> Haystack:
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return Haystack(text, tuple(end for _, end in offsets))


def make_haystack(tokenizer, directory: Path | None, min_tokens: int) -> Haystack:
    """At least min_tokens tokens: the directory's text repeated, or filler grown until long enough."""
    if directory is not None:
        base = read_haystack_files(directory)
        repeats = math.ceil(min_tokens / max(1, count_tokens(tokenizer, base)))
        while True:
            haystack = tokenize_haystack(tokenizer, "\n\n".join([base] * repeats))
            if haystack.n_tokens >= min_tokens:
                return haystack
            repeats += 1
    n_sentences = min_tokens // 10 + 16
    while True:
        haystack = tokenize_haystack(tokenizer, filler_text(n_sentences, seed=0))
        if haystack.n_tokens >= min_tokens:
            return haystack
        n_sentences *= 2


def insertion_point(text: str, target: int) -> int:
    """The sentence boundary (after ". " or a period and any white space, or either end) nearest target."""
    boundaries = [0, len(text)] + [match.end() for match in re.finditer(r"\.\s+", text)]
    return min(boundaries, key=lambda boundary: (abs(boundary - target), boundary))


def insert_sentence(text: str, at: int, sentence: str) -> tuple[str, tuple[int, int]]:
    """text with sentence inserted at character at (a sentence boundary); returns it and the sentence's [start, end)."""
    before, after = text[:at], text[at:]
    if before and not before[-1].isspace():
        before += " "
    if after and not after[0].isspace():
        after = " " + after
    return before + sentence + after, (len(before), len(before) + len(sentence))


def build_context(tokenizer, haystack: Haystack, length: int, depth: float, sentence: str) -> Context:
    """Haystack trimmed by tokens so that haystack + sentence has length tokens (re-measured, corrected twice)."""
    n_haystack = length - count_tokens(tokenizer, " " + sentence + " ")
    for _ in range(3):
        if not 1 <= n_haystack <= haystack.n_tokens:
            raise ValueError(f"the haystack has {haystack.n_tokens} tokens, {n_haystack} are needed")
        trimmed = haystack.prefix(n_haystack)
        at = insertion_point(trimmed, haystack.char_at_token(round(depth / 100 * n_haystack)))
        text, needle_chars = insert_sentence(trimmed, at, sentence)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) == length:
            break
        n_haystack += length - len(offsets)
    first = next(i for i, (_, end) in enumerate(offsets) if end > needle_chars[0])
    actual_depth = 100 * first / max(1, len(offsets) - 1)
    return Context(text, len(offsets), needle_chars, depth, round(actual_depth, 2))
