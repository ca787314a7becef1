"""What the user sees on stderr while the model loads and reads: a spinner, then a progress bar."""

from __future__ import annotations

import contextlib
import time


def status(quiet: bool, message: str):
    """A spinner with message on stderr while the block runs (nothing when quiet)."""
    if quiet:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


def note(quiet: bool, message: str) -> None:
    """One dim line on stderr (nothing when quiet)."""
    if quiet:
        return
    from rich.console import Console

    Console(stderr=True, highlight=False).print(message, style="dim", soft_wrap=True)


def feed_with_progress(session, text: str, quiet: bool) -> None:
    """session.feed(text) with a progress bar on stderr: tokens read, tokens per second, time left."""
    if quiet:
        session.feed(text)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("reading"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    started = time.perf_counter()
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("feed", total=None, rate="")

        def report(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=done, total=total, rate=f"{rate:,.0f} tok/s")

        session.feed(text, progress=report)
    seconds = time.perf_counter() - started
    tokens = session.stats().tokens_seen
    note(quiet, f"read {tokens:,} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)")
