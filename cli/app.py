"""The ``ltri`` command line. It only calls the Session API; every user error ends in one sentence."""

from __future__ import annotations

import functools
import inspect
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, fields
from typing import Annotated

import typer

from ltri.config import LtriConfig, MemoryConfig, SamplingConfig
from ltri.errors import LtriError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Read a long text with a language model and answer questions about it.",
)

_MEMORY, _LTRI, _SAMPLING = MemoryConfig(), LtriConfig(), SamplingConfig()


@dataclass(frozen=True)
class ReadingOptions:
    """The options every command that reads a text shares; each maps onto one config field."""

    context: Annotated[str, typer.Option("--context", "-c", help="Text file to read (- for standard input).")]
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Hub id, model directory or .gguf file (default: SmolLM2).")
    ] = None
    policy: Annotated[str, typer.Option("--policy", help="Memory policy: full or streaming.")] = _MEMORY.policy
    sink: Annotated[int, typer.Option("--sink", help="Attention-sink tokens kept from the start.")] = _MEMORY.n_sink
    window: Annotated[int, typer.Option("--window", help="Most recent tokens kept.")] = _MEMORY.n_window
    chunk: Annotated[int, typer.Option("--chunk", help="Tokens per prefill step.")] = _LTRI.chunk_size
    positions: Annotated[str, typer.Option("--positions", help="compact or true.")] = _LTRI.position_mode
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda if present).")] = (
        _LTRI.device
    )
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens in one answer.")] = (
        _SAMPLING.max_new_tokens
    )
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 for greedy decoding.")] = (
        _SAMPLING.temperature
    )
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = _SAMPLING.top_p
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")] = _SAMPLING.seed
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False

    def config(self) -> LtriConfig:
        memory = MemoryConfig(policy=self.policy, n_sink=self.sink, n_window=self.window)
        return LtriConfig(memory=memory, chunk_size=self.chunk, position_mode=self.positions, device=self.device)

    def sampling(self) -> dict:
        """Keyword arguments of Session.stream."""
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


def with_reading_options(command: Callable) -> Callable:
    """Give a command ReadingOptions' fields as its own options and pass them on as ``options``."""
    hints = inspect.get_annotations(ReadingOptions, eval_str=True)
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], default=_default(f))
        for f in fields(ReadingOptions)
    ]
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = ReadingOptions(**{p.name: kwargs.pop(p.name) for p in shared})
        return command(options=options, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + shared)
    return wrapper


def _default(field: Field):
    return inspect.Parameter.empty if field.default is MISSING else field.default


def open_session(options: ReadingOptions):
    """Read the context file, load the model and feed the text, with progress on stderr."""
    from ltri.session import Session
    from ltri.text_input import read_text

    text = read_text(options.context)
    config = options.config()
    if options.quiet:
        session = Session(options.model, config, system=options.system)
    else:
        from rich.console import Console

        with Console(stderr=True).status("loading the model (its first use converts it once)"):
            session = Session(options.model, config, system=options.system)
    _feed_with_progress(session, text, options.quiet)
    return session


def print_answer(session, question: str, options: ReadingOptions, stop: Callable[[], bool] = lambda: False) -> None:
    """Stream the answer to stdout; stop() is asked after each piece."""
    for piece in session.stream(question, **options.sampling()):
        sys.stdout.write(piece)
        sys.stdout.flush()
        if stop():
            sys.stdout.write(" [stopped]")
            break
    sys.stdout.write("\n")
    sys.stdout.flush()


@app.command()
@with_reading_options
def ask(question: Annotated[str, typer.Argument(help="The question to answer.")], options: ReadingOptions) -> None:
    """Answer one question about a text file and print the answer."""
    if not question.strip():
        raise LtriError("The question is empty: ask something about the text.")
    print_answer(open_session(options), question, options)


@app.command()
@with_reading_options
def chat(options: ReadingOptions) -> None:
    """Read a text file, then answer questions from the terminal (one per line; Ctrl-D or /bye ends)."""
    if options.context == "-":
        raise LtriError("chat reads questions from standard input, so --context - cannot be used with it.")
    session = open_session(options)
    interactive = sys.stdin.isatty()
    while True:
        question = _read_question(interactive)
        if question is None or question.strip() in ("/bye", "/exit", "/quit"):
            break
        if question.strip():
            with _CtrlC() as ctrl_c:
                print_answer(session, question, options, stop=lambda: ctrl_c.pressed)


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
