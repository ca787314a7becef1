"""The ``ltri`` command line. It only calls the Session API; every user error ends in one sentence."""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, fields, replace
from pathlib import Path
from typing import Annotated

import typer

from ltri.config import LtriConfig, MemoryConfig, RetrievalConfig, SamplingConfig
from ltri.errors import LtriError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Read a long text with a language model and answer questions about it.",
)

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
    chunk: Annotated[
        int | None, typer.Option("--chunk", help=f"Tokens per prefill step (default: {_LTRI.chunk_size}).")
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
        retrieval = _given(base.retrieval, budget=self.budget)
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
    """How answers are decoded."""

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


ContextOption = Annotated[str | None, typer.Option("--context", "-c", help="Text file to read (- for standard input).")]
StoreOption = Annotated[
    Path | None, typer.Option("--store", "-s", help="Saved store to answer from (made by `ltri ingest`).")
]


def _status(quiet: bool, message: str):
    if quiet:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


def open_session(context: str | None, store: Path | None, reading: ReadingOptions, system: str | None = None):
    """A session over the context file (read now, with progress on stderr) or over a saved store."""
    from ltri.session import Session
    from ltri.store_files import stored_config
    from ltri.text_input import read_text

    if (context is None) == (store is None):
        raise LtriError("Give either --context FILE or --store DIR (one of them).")
    if store is not None:
        if system is not None:
            raise LtriError("--system cannot change a saved store's conversation: give it to `ltri ingest`.")
        config = reading.config(stored_config(store))
        with _status(reading.quiet, "opening the store"):
            return Session.open(store, model=reading.model, config=config)
    text = read_text(context)
    with _status(reading.quiet, "loading the model (its first use converts it once)"):
        session = Session(reading.model, reading.config(), system=system)
    _feed_with_progress(session, text, reading.quiet)
    return session


def print_answer(session, question: str, answer: AnswerOptions, stop: Callable[[], bool] = lambda: False) -> None:
    """Stream the answer to stdout; stop() is asked after each piece."""
    for piece in session.stream(question, **answer.sampling()):
        sys.stdout.write(piece)
        sys.stdout.flush()
        if stop():
            sys.stdout.write(" [stopped]")
            break
    sys.stdout.write("\n")
    sys.stdout.flush()


@app.command()
@with_options(reading=ReadingOptions, answer=AnswerOptions)
def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    reading: ReadingOptions,
    answer: AnswerOptions,
    context: ContextOption = None,
    store: StoreOption = None,
) -> None:
    """Answer one question about a text file (or a saved store) and print the answer."""
    if not question.strip():
        raise LtriError("The question is empty: ask something about the text.")
    print_answer(open_session(context, store, reading, answer.system), question, answer)


@app.command()
@with_options(reading=ReadingOptions, answer=AnswerOptions)
def chat(
    reading: ReadingOptions, answer: AnswerOptions, context: ContextOption = None, store: StoreOption = None
) -> None:
    """Read a text file (or open a saved store), then answer questions from the terminal (/bye or Ctrl-D ends)."""
    if context == "-":
        raise LtriError("chat reads questions from standard input, so --context - cannot be used with it.")
    session = open_session(context, store, reading, answer.system)
    interactive = sys.stdin.isatty()
    while True:
        question = _read_question(interactive)
        if question is None or question.strip() in ("/bye", "/exit", "/quit"):
            break
        if question.strip():
            with _CtrlC() as ctrl_c:
                print_answer(session, question, answer, stop=lambda: ctrl_c.pressed)


@app.command()
@with_options(reading=ReadingOptions)
def ingest(
    file: Annotated[str, typer.Argument(help="Text file to read (- for standard input).")],
    reading: ReadingOptions,
    store: Annotated[Path, typer.Option("--store", "-s", help="New or empty directory for the store.")],
    system: Annotated[str | None, typer.Option("--system", help="System prompt of later questions.")] = None,
) -> None:
    """Read a text once into a store; later `ltri ask --store DIR` answers without reading it again."""
    from ltri.session import Session
    from ltri.text_input import read_text

    text = read_text(file)
    with _status(reading.quiet, "loading the model (its first use converts it once)"):
        session = Session(reading.model, reading.config(), system=system, store=store)
    _feed_with_progress(session, text, reading.quiet)
    session.save()
    session.close()
    if not reading.quiet:
        sys.stderr.write(f"saved the store in {store}\n")


class _CtrlC:
    """While an answer streams, Ctrl-C stops it after the current token (never inside a forward,
    which would leave the layers' memories out of step), and the chat goes on."""

    def __init__(self) -> None:
        self.pressed = False

    def __enter__(self) -> _CtrlC:
        self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_signal(self, signum, frame) -> None:
        self.pressed = True


def _read_question(interactive: bool) -> str | None:
    try:
        if interactive:
            return input(">>> ")
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except (EOFError, KeyboardInterrupt):
        return None


def _feed_with_progress(session, text: str, quiet: bool) -> None:
    if quiet:
        session.feed(text)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = (
        TextColumn("reading"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("feed", total=None, rate="")
        started = time.perf_counter()

        def report(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=done, total=total, rate=f"{rate:,.0f} tok/s")

        session.feed(text, progress=report)
    seconds = time.perf_counter() - started
    stats = session.stats()
    console.print(f"read {stats.tokens_seen:,} tokens in {seconds:.1f} s", style="dim")


def run_guarded(command: Callable[[], object]) -> int:
    """Run the app; a user error becomes one line on stderr and exit code 1, never a traceback."""
    try:
        command()
    except LtriError as exc:
        sys.stderr.write(f"ltri: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("ltri: interrupted\n")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main() -> None:
    sys.exit(run_guarded(lambda: app(standalone_mode=True)))


if __name__ == "__main__":
    main()
