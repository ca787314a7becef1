"""Where a command's session comes from: a saved store, the cached store of its text, or a fresh reading."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ltri.cli.options import ReadingOptions
from ltri.cli.progress import feed_with_progress, note, status

from ltri.config import LtriConfig
from ltri.errors import LtriError

LOADING = "loading the model (its first use converts it once)"


@dataclass(frozen=True)
class OpenSession:
    session: object  # ltri.Session
    saved: Path | None  # the store whose saved state holds the text just read: /reset goes back to it


def check_one_source(context: str | None, store: Path | None) -> None:
    if (context is None) == (store is None):
        raise LtriError("Give either --context FILE or --store DIR (one of them).")


@contextlib.contextmanager
def open_session(
    context: str | None,
    store: Path | None,
    reading: ReadingOptions,
    system: str | None = None,
    use_cache: bool = True,
    rewindable: bool = False,
    text: str | None = None,
) -> Iterator[OpenSession]:
    """A session over a saved store, or over the context (text: already read from it), closed afterwards.

    use_cache: reopen the context's cached store, or read it into one. rewindable: without the cache,
    read into a scratch store saved after reading, so that the session can go back to that state.
    """
    from ltri.text_input import read_text

    check_one_source(context, store)
    with contextlib.ExitStack() as stack:
        if store is not None:
            opened = _from_store(store, reading, system)
        else:
            text = text if text is not None else read_text(context)
            opened = _from_text(text, reading, system, use_cache, rewindable, stack)
        stack.callback(opened.session.close)
        yield opened


def _from_store(store: Path, reading: ReadingOptions, system: str | None) -> OpenSession:
    from ltri.session import Session
    from ltri.store_files import stored_config

    if system is not None:
        raise LtriError("--system cannot change a saved store's conversation: give it to `ltri ingest`.")
    config = reading.config(stored_config(store))
    with status(reading.quiet, "opening the store"):
        session = Session.open(store, model=reading.model, config=config)
    return OpenSession(session, store)


def _from_text(
    text: str, reading: ReadingOptions, system: str | None, use_cache: bool, rewindable: bool, stack
) -> OpenSession:
    from ltri.store_cache import cached_store, store_key

    config = reading.config()
    if use_cache:
        entry = cached_store(store_key(text, reading.model, config, system))
        if stack.enter_context(entry.locked()):
            return OpenSession(_cached(entry, text, reading, config, system), entry.path)
        note(reading.quiet, "another ltri process is using the cached store of this text: reading it again")
    if not rewindable:
        return OpenSession(_read(text, reading, config, system, None), None)
    scratch = _scratch_dir(stack) / "store"
    return OpenSession(_read(text, reading, config, system, scratch, save=True), scratch)


def _cached(entry, text: str, reading: ReadingOptions, config: LtriConfig, system: str | None):
    """The session of the cache entry: reopened when complete and usable, else read (again) into it."""
    from ltri.session import Session

    if entry.is_complete():
        started = time.perf_counter()
        try:
            with status(reading.quiet, "opening the stored reading of this text"):
                session = Session.open(entry.path, model=reading.model, config=config)
        except LtriError as exc:
            note(reading.quiet, f"the cached store cannot be used ({exc}): reading the text again")
        else:
            tokens = session.stats().tokens_seen
            seconds = time.perf_counter() - started
            note(reading.quiet, f"reopened the cached store of this text ({tokens:,} tokens) in {seconds:.1f} s")
            return session
    entry.clear()
    return _read(text, reading, config, system, entry.path, save=True)


def _read(
    text: str, reading: ReadingOptions, config: LtriConfig, system: str | None, store: Path | None, save: bool = False
):
    """A new session that read text into store (None: a temporary one), saved there when save is true."""
    from ltri.session import Session

    with status(reading.quiet, LOADING):
        session = Session(reading.model, config, system=system, store=store)
    try:
        feed_with_progress(session, text, reading.quiet)
        if save:
            session.save(store)
    except BaseException:
        session.close()
        raise
    return session


def _scratch_dir(stack: contextlib.ExitStack) -> Path:
    """A directory removed when the stack closes, in the cache root (stores can be large: not in /tmp)."""
    from ltri.model import cache_root

    scratch = cache_root() / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chat-", dir=scratch)))
