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

import contextlib
import functools
import os
import shutil
import tempfile
import weakref
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ltri import attention
from ltri.attention import ATTENTION_NAME, STEP_KWARG, RetrievalFrame, StepContext, register_attention
from ltri.cache import LtriCache, cache_argument_name
from ltri.captured_decode import CapturedDecode
from ltri.chat_format import ChatFormat
from ltri.config import LtriConfig, SamplingConfig
from ltri.decode_step import DecodeStep
from ltri.detokenize import IncrementalDetokenizer
from ltri.draft import draft_coverage
from ltri.errors import LtriError
from ltri.fingerprint import model_fingerprint, tokenizer_fingerprint
from ltri.host_threads import one_host_thread
from ltri.model import cache_root, load_model
from ltri.policies import make_memories
from ltri.positions import Rotary
from ltri.reread import forget_evidence, reread_window
from ltri.retrieval_log import RetrievalLog, RetrievedSpan
from ltri.sampling import make_generator, sample_next
from ltri.store_files import (
    SPANS_DIR,
    config_from_dict,
    config_to_dict,
    read_meta,
    read_state,
    stored_fields,
    write_meta,
    write_state,
)

ProgressCallback = Callable[[int, int], None]  # (tokens done, tokens in this feed)


@dataclass(frozen=True)
class SessionStats:
    tokens_seen: int  # tokens fed so far: text, questions and answers
    resident_tokens: int  # most tokens any layer holds in attention memory
    memory_bytes: int  # bytes of keys and values held by all layers on the device
    layers: int
    policy: str
    spans: int  # spans stored, all layers together
    store_bytes: int  # span payload bytes in the store


class Session:
    """A model reading one stream of text, and a conversation about it.

    model: None (the bundled SmolLM2), a model name, directory or .gguf path, or a loaded
        transformers model (then pass its tokenizer too).
    """

    def __init__(
        self,
        model=None,
        config: LtriConfig | None = None,
        tokenizer=None,
        system: str | None = None,
        store: str | os.PathLike | None = None,
    ):
        """store: an empty (or new) directory to keep the span store in, so that save() can finish it
        in place; None keeps it in a temporary directory removed when the session closes."""
        self._setup(model, config or LtriConfig(), tokenizer, system)
        self.reset(store=store)

    def _setup(self, model, config: LtriConfig, tokenizer, system: str | None) -> None:
        self.config = config
        if model is None or isinstance(model, (str, os.PathLike)):
            self.model_source = None if model is None else str(model)
            self.model, self.tokenizer = load_model(self.model_source, device=config.device, dtype=config.dtype)
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer together with a loaded model")
            register_attention()
            model.set_attn_implementation(ATTENTION_NAME)
            self.model, self.tokenizer = model, tokenizer
            self.model_source = getattr(model, "name_or_path", None) or None
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.rotary = Rotary(self.model.get_decoder().rotary_emb)
        self._retrieval_frame = RetrievalFrame.for_config(config, self.rotary, self.device, self.dtype)
        self.system = system
        self.chat_format = ChatFormat.for_tokenizer(self.tokenizer, system)
        self._retrieval_log = RetrievalLog()
        self.stop_token_ids = _stop_token_ids(self.model, self.tokenizer)
        self._cache_kwarg = cache_argument_name(self.model)
        self._decode_step = DecodeStep.for_model(
            self.model, use_graphs=config.cuda_graphs, dense_kernels=config.dense_kernels
        )
        self._captured: CapturedDecode | None = None  # bound to self.cache's memories (_captured_decode)
        self._eager_steps = False  # set while a draft decodes (ltri.draft)
        self.store = None
        self.store_path: Path | None = None

    # ---- state -----------------------------------------------------------------------------
    def reset(self, store: str | os.PathLike | None = None) -> None:
        """Forget everything: the text and the conversation. A store directory written so far is left
        as it is; what comes next goes to store (default: a new temporary one)."""
        self.close()
        if self.config.memory.policy == "ltri":
            self._open_store(Path(store) if store is not None else None)
        n_layers = self.model.config.num_hidden_layers
        self.cache = LtriCache(make_memories(self.config, n_layers, self.store))
        self._phase = "empty"  # "empty" -> "in_user" (text open in a user turn) -> "answered"
        self.last_answer_tokens: list[int] = []
        self.token_ids = array("i")  # every token fed, in order: text, questions and answers
        self._retrieval_log.clear()

    def close(self) -> None:
        """Release the memories' host rows and the span store (a temporary one is deleted). Reading again needs
        reset()."""
        self._release_memories()
        self._release_store()
        finalizer = getattr(self, "_remove_temporary", None)
        if finalizer is not None:
            finalizer()
            self._remove_temporary = None

    def _release_memories(self) -> None:
        """The memories' host rows given back, and the captured decode step that reads them dropped."""
        self._captured = None
        cache = getattr(self, "cache", None)
        if cache is not None:
            for memory in cache.memories():
                memory.release()

    def _release_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_store(self, directory: Path | None) -> None:
        from ltri.offload.span_store import SpanStore

        if directory is None:
            scratch = cache_root() / "scratch"
            scratch.mkdir(parents=True, exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix="store-", dir=scratch))
            self._remove_temporary = weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        elif directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise LtriError(
                f"{directory} is not an empty directory: give a new one for the store "
                "(a saved store is opened with Session.open or --store)."
            )
        directory.mkdir(parents=True, exist_ok=True)
        write_meta(directory, self._meta(complete=False))
        self.store = SpanStore(directory / SPANS_DIR, background_writes=True)
        self.store_path = directory

    def stats(self) -> SessionStats:
        memories = self.cache.memories()
        return SessionStats(
            tokens_seen=self.cache.tokens_seen,
            resident_tokens=max(memory.resident_tokens() for memory in memories),
            memory_bytes=sum(memory.nbytes() for memory in memories),
            layers=len(memories),
            policy=self.config.memory.policy,
            spans=sum(getattr(memory, "n_spans", 0) for memory in memories),
            store_bytes=0 if self.store is None else self.store.nbytes(),
        )

    # ---- saving and opening --------------------------------------------------------------------
    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Save what was read so far, so that Session.open(path) answers without reading it again.

        path: None or the session's own store directory finishes that store in place; another
        directory (new or empty) gets a compacted copy. Returns the directory.
        """
        target = Path(path) if path is not None else self.store_path
        if target is None:
            raise LtriError("This session has no store directory: give save() a directory.")
        in_place = self.store_path is not None and target.resolve() == self.store_path.resolve()
        if not in_place:
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise LtriError(f"{target} is not an empty directory: give a new one to save into.")
            target.mkdir(parents=True, exist_ok=True)
            write_meta(target, self._meta(complete=False))
        if self.store is not None:
            for memory in self.cache.memories():
                memory.end_forward()
                memory.store_deferred()
            self.store.flush()
            if not in_place:
                self.store.copy_to(target / SPANS_DIR)
        state_sha = write_state(target, self._state())
        write_meta(target, self._meta(complete=True, state_sha256=state_sha))
        return target

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        model=None,
        config: LtriConfig | None = None,
        tokenizer=None,
        verify: bool = False,
    ) -> Session:
        """Reopen a saved store. model: None takes the model that made it; config: None takes the stored
        one (a given config must store the same way: same memory and span settings).
        verify: read every stored payload and check its checksum now, not only when it is used."""
        directory = Path(path)
        meta = read_meta(directory)
        stored_config = config_from_dict(meta["config"])
        config = _reopening_config(directory, stored_config, config)
        if config.dtype is None:
            config = replace(config, dtype=meta["dtype"])  # payloads are read back in the dtype they were written
        session = cls.__new__(cls)
        session._setup(model if model is not None else meta["model"]["source"], config, tokenizer, None)
        session._check_made_by_this_model(directory, meta)
        state = read_state(directory, meta["state_sha256"])
        session._resume(directory, meta, state, verify)
        return session

    def rewind(self, path: str | os.PathLike | None = None) -> None:
        """Go back to the state saved in path (default: this session's store directory), keeping the loaded
        model: what was read since, a conversation for example, is forgotten. Reading on after save() writes
        new span ids only, so the saved state stays valid however long the session went on."""
        directory = Path(path) if path is not None else self.store_path
        if directory is None:
            raise LtriError("This session has no saved state to go back to: save() it first.")
        meta = read_meta(directory)
        _reopening_config(directory, config_from_dict(meta["config"]), self.config)
        self._check_made_by_this_model(directory, meta)
        state = read_state(directory, meta["state_sha256"])
        same_store = self.store_path is not None and directory.resolve() == self.store_path.resolve()
        if same_store:
            self._release_memories()
            self._release_store()  # a temporary store must outlive this: it is where the state comes from
        else:
            self.close()
        self._resume(directory, meta, state, verify=False)

    def _check_made_by_this_model(self, directory: Path, meta: dict) -> None:
        made_by = meta["model"]
        if made_by["fingerprint"] != model_fingerprint(self.model):
            raise LtriError(
                f"The store at {directory} was made with another model ({made_by['source'] or 'the default model'}): "
                "open it with that model, or ingest the text again with this one."
            )
        if made_by["tokenizer"] != tokenizer_fingerprint(self.tokenizer):
            raise LtriError(f"The store at {directory} was made with another tokenizer: ingest the text again.")
        if meta["dtype"] != str(self.dtype).removeprefix("torch."):
            raise LtriError(
                f"The store at {directory} holds {meta['dtype']} payloads but the model runs in "
                f"{str(self.dtype).removeprefix('torch.')}: open it with dtype {meta['dtype']}."
            )

    def _resume(self, directory: Path, meta: dict, state: dict, verify: bool) -> None:
        from ltri.offload.span_store import SpanStore

        self.system = state["system"]
        self.chat_format = ChatFormat.for_tokenizer(self.tokenizer, self.system)
        if self.config.memory.policy == "ltri":
            self.store = SpanStore(directory / SPANS_DIR, background_writes=True)
            self.store_path = directory
            self._check_payloads(directory, meta["payloads"], verify)
        n_layers = self.model.config.num_hidden_layers
        self.cache = LtriCache(make_memories(self.config, n_layers, self.store))
        for memory, layer_state in zip(self.cache.memories(), state["layers"], strict=True):
            memory.load_state(layer_state, self.device)
        self.cache.tokens_seen = int(state["tokens_seen"])
        self._phase = state["phase"]
        self.last_answer_tokens = []
        self.token_ids = array("i", state.get("token_ids", torch.empty(0, dtype=torch.int32)).tolist())
        self._retrieval_log.clear()

    def _check_payloads(self, directory: Path, payloads: dict, verify: bool) -> None:
        counts = payloads["spans_per_layer"]
        if self.store.digest(counts) != payloads["digest"]:
            raise LtriError(
                f"The store at {directory} is damaged: its payload checksums changed; ingest the text again."
            )
        if verify:
            self.store.verify(counts)

    def _meta(self, complete: bool, state_sha256: str | None = None) -> dict:
        memories = self.cache.memories() if complete else []
        counts = [getattr(memory, "n_spans", 0) for memory in memories]
        return {
            "complete": complete,
            "model": {
                "source": self.model_source,
                "model_type": self.model.config.model_type,
                "fingerprint": model_fingerprint(self.model),
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
            },
            "config": config_to_dict(replace(self.config, device=None)),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tokens_seen": self.cache.tokens_seen if complete else 0,
            "state_sha256": state_sha256,
            "payloads": {
                "spans_per_layer": counts,
                "digest": self.store.digest(counts) if complete and self.store is not None else None,
            },
        }

    def _state(self) -> dict:
        return {
            "tokens_seen": self.cache.tokens_seen,
            "phase": self._phase,
            "system": self.system,
            "layers": [memory.state() for memory in self.cache.memories()],
            "token_ids": torch.tensor(self.token_ids, dtype=torch.int32),
        }

    # ---- reading -----------------------------------------------------------------------------
    def feed(self, text: str | Sequence[int], progress: ProgressCallback | None = None) -> int:
        """Read more text (a string, or token ids). Returns the number of tokens fed."""
        token_ids = self._tokenize(self._opening(inside_user_turn=""))
        token_ids += self._tokenize(text) if isinstance(text, str) else [int(t) for t in text]
        forget_evidence(self.cache.memories())  # the last answer's (ltri.evidence)
        self._phase = "in_user"
        self.prefill(token_ids, progress=progress)
        return len(token_ids)

    def prefill(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        progress: ProgressCallback | None = None,
        all_logits: bool = False,
    ):
        """Feed raw token ids (n_tokens,), no chat formatting, in chunks of config.prefill_chunk(device).

        Returns the logits (vocab,) of the last position, or (n_tokens, vocab) with all_logits.
        """
        if isinstance(token_ids, torch.Tensor):
            ids = token_ids.to(device=self.device, dtype=torch.long).flatten()
        else:
            ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
        pieces, last = [], None
        chunk_size = self.config.prefill_chunk(self.device)
        for start in range(0, ids.numel(), chunk_size):
            chunk = ids[start : start + chunk_size]
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
        self._retrieval_log.clear()
        forget_evidence(self.cache.memories())
        logits = self.prefill(self.question_tokens(question), progress=lambda done, total: self._record_retrieval())
        retrieval = self.config.retrieval
        if retrieval.reread:
            coverage = draft_coverage(self, logits, retrieval.draft_tokens) if retrieval.draft_tokens else None
            echo = retrieval.echo_tokens
            question_ids = self.tokenizer(question, add_special_tokens=False)["input_ids"] if echo else ()
            logits = reread_window(
                self, logits, retrieval.reread_evidence, coverage, question_ids, retrieval.echo_tokens
            )
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
            logits = self.forward_token(token)
            if piece:
                yield piece
        rest = detokenizer.finish()
        if rest:
            yield rest

    def forward_token(self, token: int) -> torch.Tensor:
        """One decode step: the token joins the context; the logits (vocab,) of what follows it."""
        logits = self._forward(torch.tensor([token], device=self.device))[-1]
        self._record_retrieval()
        return logits

    def forget_last(self, n_tokens: int) -> None:
        """Forget the last n_tokens read, as if never fed (a draft answer's, ``ltri.draft``): every layer must hold
        them as the unsegmented tail of its window (``SpanMemory.forgettable_tokens``)."""
        if n_tokens <= 0:
            return
        for memory in self.cache.memories():
            memory.forget_last(n_tokens)
        self.cache.tokens_seen -= n_tokens
        del self.token_ids[-n_tokens:]

    @contextlib.contextmanager
    def eager_steps(self) -> Iterator[None]:
        """Decode steps inside run eagerly, never as captured steps (``ltri.captured_decode``)."""
        self._eager_steps = True
        try:
            yield
        finally:
            self._eager_steps = False

    def retrieved_spans(self, limit: int = 10) -> list[RetrievedSpan]:
        """The stored spans the last answer attended to (its question, its draft if any, and its steps, all layers),
        most retrieved first, each with its text: the evidence the answer came from."""
        return self._retrieval_log.top(limit, self._text_at)

    def retrieval_coverage(self, n_positions: int) -> np.ndarray:
        """(n_positions,) for each text position, the (layer, step) pairs of the last answer so far whose retrieval
        held it (``RetrievalLog.coverage``)."""
        return self._retrieval_log.coverage(n_positions)

    def _record_retrieval(self) -> None:
        self._retrieval_log.record(self.cache.memories())

    def _text_at(self, start: int, length: int) -> str:
        """The text of token positions start..start+length (empty for a store saved without its token ids)."""
        return self.tokenizer.decode(self.token_ids[start : start + length].tolist(), skip_special_tokens=True)

    # ---- model -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, chunk: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """One forward over chunk (q_len,) new token ids; returns logits (q_len or 1, vocab) in float32. On CUDA the
        host's bookkeeping runs on one intra-op thread (``ltri.host_threads``)."""
        start = self.cache.tokens_seen
        with one_host_thread(self.device):
            logits = self.run_model(chunk, torch.arange(start, start + chunk.numel(), device=self.device), all_logits)
            self.cache.advance(chunk.numel())
        self.token_ids.extend(chunk.tolist())
        return logits

    @torch.inference_mode()
    def run_model(self, chunk: torch.Tensor, positions: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """The model over chunk (q_len,) token ids at text positions (q_len,) -> logits (q_len or 1, vocab) float32.

        The layers' memories take the chunk's keys and values; counting the tokens is the caller's."""
        step = StepContext(self.cache, self.rotary, self.config.position_mode, positions, self._retrieval_frame)
        if chunk.numel() == 1 and self._decode_step is not None:
            captured = self._captured_decode()
            logits = None if captured is None else captured(chunk)
            if logits is not None:
                return logits
            return self._decode_step(chunk, functools.partial(attention.attend_with_memory, step))
        output = self.model(
            input_ids=chunk[None, :],
            position_ids=torch.zeros_like(chunk)[None, :],  # pre-RoPE q/k: ltri rotates them itself
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{self._cache_kwarg: self.cache, STEP_KWARG: step},
        )
        return output.logits[0].float()

    def _captured_decode(self) -> CapturedDecode | None:
        """The captured decode steps of the current memories; None where the settings rule them out (another
        policy or position mode, a retrieval frame): then every decode step is eager."""
        eligible = (
            not self._eager_steps
            and self.config.memory.policy == "ltri"
            and self.config.position_mode == "compact"
            and self._retrieval_frame is None
        )
        if not eligible:
            return None
        memories = self.cache.memories()
        if self._captured is None or self._captured.memories != memories:
            use_graph = self.config.cuda_graphs
            self._captured = CapturedDecode(self._decode_step, memories, self.rotary, self.device, use_graph)
        return self._captured

    def _tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        add_special = self.chat_format.add_special_tokens and self.cache.tokens_seen == 0
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]


def _reopening_config(directory: Path, stored: LtriConfig, given: LtriConfig | None) -> LtriConfig:
    if given is None:
        return stored
    if stored_fields(given) != stored_fields(stored):
        raise LtriError(
            f"The store at {directory} was made with other memory or span settings: "
            "open it without them, or ingest the text again with the new ones."
        )
    return given


def _stop_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(t) for t in source)
    return ids
