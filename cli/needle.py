"""`ltri needle`: the needle-in-a-haystack (or passkey) benchmark, with the options of
benchmarks/needle/needle.py. ``register(app)`` adds the command to a typer app."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ltri.config import LtriConfig, MemoryConfig, RetrievalConfig, SpanConfig
from ltri.errors import LtriError
from ltri.needle.settings import DEFAULT_DEPTHS, DEFAULT_LENGTHS, DEFAULT_METHODS, HELP, NeedleRun

_MEMORY, _RETRIEVAL, _SPANS, _LTRI = MemoryConfig(), RetrievalConfig(), SpanConfig(), LtriConfig()


def needle(
    out: Annotated[Path, typer.Option("--out", help=HELP["out"])],
    lengths: Annotated[str, typer.Option("--lengths", help=HELP["lengths"])] = DEFAULT_LENGTHS,
    depths: Annotated[str, typer.Option("--depths", help=HELP["depths"])] = DEFAULT_DEPTHS,
    methods: Annotated[str, typer.Option("--methods", help=HELP["methods"])] = DEFAULT_METHODS,
    task: Annotated[str, typer.Option("--task", help=HELP["task"])] = NeedleRun.task,
    seed: Annotated[int, typer.Option("--seed", help=HELP["seed"])] = NeedleRun.seed,
    haystack: Annotated[Path | None, typer.Option("--haystack", help=HELP["haystack"])] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help=HELP["model"])] = None,
    device: Annotated[str | None, typer.Option("--device", help=HELP["device"])] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help=HELP["dtype"])] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help=HELP["max_new_tokens"])
    ] = NeedleRun.max_new_tokens,
    budget: Annotated[int, typer.Option("--budget", help=HELP["budget"])] = _RETRIEVAL.budget,
    window: Annotated[int, typer.Option("--window", help=HELP["window"])] = _MEMORY.n_window,
    sink: Annotated[int, typer.Option("--sink", help=HELP["sink"])] = _MEMORY.n_sink,
    chunk_size: Annotated[int | None, typer.Option("--chunk-size", help=HELP["chunk_size"])] = _LTRI.chunk_size,
    index_vectors: Annotated[str, typer.Option("--index-vectors", help=HELP["index_vectors"])] = _SPANS.index_vectors,
    query_dims: Annotated[str, typer.Option("--query-dims", help=HELP["query_dims"])] = _RETRIEVAL.query_dims,
    refresh_every: Annotated[
        int, typer.Option("--refresh-every", help=HELP["refresh_every"])
    ] = _RETRIEVAL.refresh_every,
    vote: Annotated[str, typer.Option("--vote", help=HELP["vote"])] = _RETRIEVAL.vote,
    reading_vote: Annotated[
        str | None, typer.Option("--reading-vote", help=HELP["reading_vote"])
    ] = _RETRIEVAL.reading_vote,
    reread: Annotated[bool, typer.Option("--reread/--no-reread", help=HELP["reread"])] = _RETRIEVAL.reread,
    reread_evidence: Annotated[
        int, typer.Option("--reread-evidence", help=HELP["reread_evidence"])
    ] = _RETRIEVAL.reread_evidence,
    draft_tokens: Annotated[int, typer.Option("--draft-tokens", help=HELP["draft_tokens"])] = _RETRIEVAL.draft_tokens,
    echo_tokens: Annotated[int, typer.Option("--echo-tokens", help=HELP["echo_tokens"])] = _RETRIEVAL.echo_tokens,
    selector: Annotated[str, typer.Option("--selector", help=HELP["selector"])] = _RETRIEVAL.selector,
    select_tokens: Annotated[
        int, typer.Option("--select-tokens", help=HELP["select_tokens"])
    ] = _RETRIEVAL.select_tokens,
    select_rank: Annotated[int, typer.Option("--select-rank", help=HELP["select_rank"])] = _RETRIEVAL.select_rank,
) -> None:
    """Hide a sentence at depths of long texts, ask for it with each method, write cells, summary.csv and heatmaps."""
    from ltri.needle.command import make_run, run_benchmark

    options = dict(task=task, seed=seed, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
    options |= dict(budget=budget, window=window, sink=sink, chunk_size=chunk_size)
    options |= dict(index_vectors=index_vectors, query_dims=query_dims, refresh_every=refresh_every, vote=vote)
    options |= dict(
        reading_vote=reading_vote, reread=reread, reread_evidence=reread_evidence, draft_tokens=draft_tokens
    )
    options |= dict(echo_tokens=echo_tokens, selector=selector, select_tokens=select_tokens, select_rank=select_rank)
    try:
        run = make_run(lengths, depths, methods, out, haystack, **options)
    except ValueError as error:
        raise LtriError(f"{str(error).rstrip('.')}.") from None
    run_benchmark(run, sys.argv[1:])


def register(app: typer.Typer) -> None:
    """Add `needle` to app."""
    app.command("needle")(needle)
