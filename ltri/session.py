"""Session: the streaming API. Feed text (as much as you like, as often as you like), then ask.

Example::

    from ltri import Session
    session = Session()                    # bundled SmolLM2, default config
    session.feed(open("book.txt").read())
    print(session.ask("Who wrote the letter?"))
    for piece in session.stream("And why?"):
        print(piece, end="")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ltri.attention import ATTENTION_NAME, STEP_KWARG, StepContext, register_attention
from ltri.cache import LtriCache, cache_argument_name
from ltri.chat_format import ChatFormat
from ltri.config import LtriConfig, SamplingConfig
from ltri.detokenize import IncrementalDetokenizer
from ltri.memory import make_memory
from ltri.model import load_model
from ltri.positions import Rotary
from ltri.sampling import make_generator, sample_next

ProgressCallback = Callable[[int, int], None]  # (tokens done, tokens in this feed)


@dataclass(frozen=True)
class SessionStats:
    tokens_seen: int  # tokens fed so far: text, questions and answers
    resident_tokens: int  # most tokens any layer holds in attention memory
    memory_bytes: int  # bytes of keys and values held by all layers
    layers: int
    policy: str


class Session:
    """A model reading one stream of text, and a conversation about it.

    model: None (the bundled SmolLM2), a model name, directory or .gguf path, or a loaded
        transformers model (then pass its tokenizer too).
    """

    def __init__(self, model=None, config: LtriConfig | None = None, tokenizer=None, system: str | None = None):
        self.config = config or LtriConfig()
        if model is None or isinstance(model, (str, os.PathLike)):
            name = None if model is None else str(model)
            self.model, self.tokenizer = load_model(name, device=self.config.device, dtype=self.config.dtype)
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer together with a loaded model")
            register_attention()
            model.set_attn_implementation(ATTENTION_NAME)
            self.model, self.tokenizer = model, tokenizer
        self.device = next(self.model.parameters()).device
        self.rotary = Rotary(self.model.get_decoder().rotary_emb)
        self.chat_format = ChatFormat.for_tokenizer(self.tokenizer, system)
        self.stop_token_ids = _stop_token_ids(self.model, self.tokenizer)
        self._cache_kwarg = cache_argument_name(self.model)
        self.reset()

    # ---- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: the text and the conversation."""
        n_layers = self.model.config.num_hidden_layers
        self.cache = LtriCache([make_memory(self.config.memory) for _ in range(n_layers)])
        self._phase = "empty"  # "empty" -> "in_user" (text open in a user turn) -> "answered"
        self.last_answer_tokens: list[int] = []

    def stats(self) -> SessionStats:
        memories = self.cache.memories()
        return SessionStats(
            tokens_seen=self.cache.tokens_seen,
            resident_tokens=max(memory.resident_tokens() for memory in memories),
            memory_bytes=sum(memory.nbytes() for memory in memories),
            layers=len(memories),
            policy=self.config.memory.policy,
        )

    # ---- reading -----------------------------------------------------------------------------
    def feed(self, text: str | Sequence[int], progress: ProgressCallback | None = None) -> int:
        """Read more text (a string, or token ids). Returns the number of tokens fed."""
        token_ids = self._tokenize(self._opening(inside_user_turn=""))
        token_ids += self._tokenize(text) if isinstance(text, str) else [int(t) for t in text]
        self._phase = "in_user"
        self.prefill(token_ids, progress=progress)
        return len(token_ids)

    def prefill(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        progress: ProgressCallback | None = None,
        all_logits: bool = False,
    ):
        """Feed raw token ids (n_tokens,), no chat formatting, in chunks of config.chunk_size.

        Returns the logits (vocab,) of the last position, or (n_tokens, vocab) with all_logits.
        """
        if isinstance(token_ids, torch.Tensor):
            ids = token_ids.to(device=self.device, dtype=torch.long).flatten()
        else:
            ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
        pieces, last = [], None
        for start in range(0, ids.numel(), self.config.chunk_size):
            chunk = ids[start : start + self.config.chunk_size]
            logits = self._forward(chunk, all_logits=all_logits)
            pieces.append(logits)
            last = logits[-1]
            if progress is not None:
                progress(start + chunk.numel(), ids.numel())
        if all_logits:
            return torch.cat(pieces) if pieces else None
        return last

    # ---- asking ------------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 256, temperature: float = 0.0, **sampling) -> str:
        """Answer a question about everything fed so far; the answer joins the context."""
        return "".join(self.stream(question, max_new_tokens=max_new_tokens, temperature=temperature, **sampling))

    def stream(self, question: str, max_new_tokens: int = 256, temperature: float = 0.0, **sampling) -> Iterator[str]:
        """Like ask, but yields the answer in text pieces as they decode."""
        config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, **sampling)
        logits = self.prefill(self.question_tokens(question))
        self._phase = "answered"
        yield from self._decode(logits, config)

    def question_tokens(self, question: str) -> list[int]:
        """The token ids that ask() feeds for a question, given what was fed before."""
        opening = self._opening(inside_user_turn=self.chat_format.question_separator)
        return self._tokenize(opening + question + self.chat_format.open_assistant)

    def _opening(self, inside_user_turn: str) -> str:
        """What goes before new user content: a new user turn, or inside_user_turn if one is open."""
        if self._phase == "empty":
            return self.chat_format.open_first_user
        if self._phase == "answered":
            return self.chat_format.open_next_user
        return inside_user_turn

    def _decode(self, logits: torch.Tensor, config: SamplingConfig) -> Iterator[str]:
        generator = make_generator(config.seed, self.device)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        self.last_answer_tokens = []
        for _ in range(config.max_new_tokens):
            token = sample_next(logits, config, generator)
            if token in self.stop_token_ids:
                break
            self.last_answer_tokens.append(token)
            piece = detokenizer.push(token)
            # The answer joins the context: every token, the last one too, goes through the model.
            logits = self._forward(torch.tensor([token], device=self.device))[-1]
            if piece:
                yield piece
        rest = detokenizer.finish()
        if rest:
            yield rest

    # ---- model -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, chunk: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """One forward over chunk (q_len,) token ids; returns logits (q_len or 1, vocab) in float32."""
        start = self.cache.tokens_seen
        positions = torch.arange(start, start + chunk.numel(), device=self.device)
        step = StepContext(self.cache, self.rotary, self.config.position_mode, positions)
        output = self.model(
            input_ids=chunk[None, :],
            position_ids=torch.zeros_like(chunk)[None, :],  # pre-RoPE q/k: ltri rotates them itself
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{self._cache_kwarg: self.cache, STEP_KWARG: step},
        )
        self.cache.advance(chunk.numel())
        return output.logits[0].float()

    def _tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        add_special = self.chat_format.add_special_tokens and self.cache.tokens_seen == 0
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]


def _stop_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(t) for t in source)
    return ids
