"""Turning a growing list of token ids into text pieces as they decode."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Yields only the new text each time a token arrives, decoding a few tokens per step, not the whole answer.

    Each step decodes the tokens since prefix_offset twice: without and with the unread tokens
    (read_offset onwards); the difference is the new text. The earlier tokens give the decoder the
    context it needs for spaces, and an incomplete UTF-8 sequence (ending in U+FFFD) is held back.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        already, text = self._decode_window()
        if len(text) <= len(already) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return text[len(already) :]

    def finish(self) -> str:
        """Whatever is still held back (an answer cut inside a multi-byte character)."""
        already, text = self._decode_window()
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return text[len(already) :]

    def _decode_window(self) -> tuple[str, str]:
        window = self.token_ids[self.prefix_offset :]
        already = self.tokenizer.decode(window[: self.read_offset - self.prefix_offset], skip_special_tokens=True)
        return already, self.tokenizer.decode(window, skip_special_tokens=True)
