"""The options the commands share, as dataclasses whose fields map one-to-one onto config fields."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, fields, replace
from typing import Annotated

import typer

from ltri.config import SELECTORS, LtriConfig, MemoryConfig, RetrievalConfig, SamplingConfig, check_selection_narrows

_MEMORY, _RETRIEVAL, _LTRI, _SAMPLING = MemoryConfig(), RetrievalConfig(), LtriConfig(), SamplingConfig()


@dataclass(frozen=True)
class ReadingOptions:
    """How the model reads the text; each option maps onto one config field.

    The memory options default to None, meaning the config's default, or for a saved store the
    value it was made with.
    """

    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Hub id, model directory or .gguf file (default: SmolLM2).")
    ] = None
    policy: Annotated[
        str | None,
        typer.Option("--policy", help=f"Memory policy: ltri, full or streaming (default: {_MEMORY.policy})."),
    ] = None
    sink: Annotated[
        int | None,
        typer.Option("--sink", help=f"Attention-sink tokens kept from the start (default: {_MEMORY.n_sink})."),
    ] = None
    window: Annotated[
        int | None, typer.Option("--window", help=f"Most recent tokens kept (default: {_MEMORY.n_window}).")
    ] = None
    budget: Annotated[
        int | None,
        typer.Option("--budget", help=f"Retrieved tokens per layer and step (default: {_RETRIEVAL.budget})."),
    ] = None
    selector: Annotated[
        str | None,
        typer.Option(
            "--selector",
            help=f"Token selection among retrieved spans: {', '.join(SELECTORS)} (default: {_RETRIEVAL.selector}).",
        ),
    ] = None
    select_tokens: Annotated[
        int | None,
        typer.Option(
            "--select-tokens",
            help="With --selector, retrieved tokens each KV head keeps a step; below --budget "
            f"(default: {_RETRIEVAL.select_tokens}).",
        ),
    ] = None
    select_rank: Annotated[
        int | None,
        typer.Option(
            "--select-rank", help=f"Dimensions the --selector's scores use (default: {_RETRIEVAL.select_rank})."
        ),
    ] = None
    refresh_every: Annotated[
        int | None,
        typer.Option(
            "--refresh-every",
            help="Answer tokens per retrieval; 0 keeps what the question retrieved "
            f"(default: {_RETRIEVAL.refresh_every}).",
        ),
    ] = None
    reread: Annotated[
        bool | None,
        typer.Option(
            "--reread/--no-reread",
            help="At each question, read the window again with the spans the question retrieved "
            f"(default: {'on' if _RETRIEVAL.reread else 'off'}).",
        ),
    ] = None
    reread_evidence: Annotated[
        int | None,
        typer.Option(
            "--reread-evidence",
            help="With --reread, stored tokens read again with the window: those the question's retrieval, or "
            f"the draft's, held most (default: {_RETRIEVAL.reread_evidence}).",
        ),
    ] = None
    draft_tokens: Annotated[
        int | None,
        typer.Option(
            "--draft-tokens",
            help="With --reread-evidence, a greedy draft answer of up to this many tokens chooses the evidence, "
            f"then is forgotten (default: {_RETRIEVAL.draft_tokens}).",
        ),
    ] = None
    echo_tokens: Annotated[
        int | None,
        typer.Option(
            "--echo-tokens",
            help="Of the --reread-evidence, up to this many stored tokens around where the question's own words "
            f"recur in the text (default: {_RETRIEVAL.echo_tokens}).",
        ),
    ] = None
    chunk: Annotated[
        int | None, typer.Option("--chunk", help="Tokens per prefill step (default: 2048 on a GPU, 1024 on the CPU).")
    ] = None
    positions: Annotated[
        str | None,
        typer.Option("--positions", help=f"compact, one_angle or true (default: {_LTRI.position_mode})."),
    ] = None
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda if present).")] = (
        None
    )
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False

    def config(self, base: LtriConfig | None = None) -> LtriConfig:
        """base (default: LtriConfig()) with the options given on the command line."""
        base = base or LtriConfig()
        memory = _given(base.memory, policy=self.policy, n_sink=self.sink, n_window=self.window)
        retrieval = _given(
            base.retrieval,
            budget=self.budget,
            selector=self.selector,
            select_tokens=self.select_tokens,
            select_rank=self.select_rank,
            refresh_every=self.refresh_every,
            reread=self.reread,
            reread_evidence=self.reread_evidence,
            draft_tokens=self.draft_tokens,
            echo_tokens=self.echo_tokens,
        )
        if self.selector not in (None, "none"):
            check_selection_narrows(retrieval)
        return _given(
            base,
            memory=memory,
            retrieval=retrieval,
            chunk_size=self.chunk,
            position_mode=self.positions,
            device=self.device,
        )


@dataclass(frozen=True)
class AnswerOptions:
    """How answers are decoded; `/set NAME VALUE` in the chat changes the first four."""

    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens in one answer.")] = (
        _SAMPLING.max_new_tokens
    )
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 for greedy decoding.")] = (
        _SAMPLING.temperature
    )
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = _SAMPLING.top_p
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")] = _SAMPLING.seed
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None

    def sampling(self) -> dict:
        """Keyword arguments of Session.stream."""
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    def checked(self) -> AnswerOptions:
        """self, once SamplingConfig accepted its values (LtriError otherwise)."""
        SamplingConfig(**self.sampling())
        return self


def _given(config, **values):
    """config with the values that are not None."""
    return replace(config, **{name: value for name, value in values.items() if value is not None})


def with_options(**groups: type) -> Callable:
    """Give a command the fields of each options dataclass as its own options; it receives one instance
    per group, under the group's keyword (for example ``reading=ReadingOptions(...)``)."""

    def decorate(command: Callable) -> Callable:
        shared = {name: _parameters(group) for name, group in groups.items()}
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name not in groups]

        @functools.wraps(command)
        def wrapper(**kwargs):
            built = {
                name: groups[name](**{p.name: kwargs.pop(p.name) for p in parameters})
                for name, parameters in shared.items()
            }
            return command(**built, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + [p for parameters in shared.values() for p in parameters])
        return wrapper

    return decorate


def _parameters(group: type) -> list[inspect.Parameter]:
    hints = inspect.get_annotations(group, eval_str=True)
    return [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], default=_default(f))
        for f in fields(group)
    ]


def _default(field: Field):
    return inspect.Parameter.empty if field.default is MISSING else field.default
