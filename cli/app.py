"""The ``ltri`` command line. It only calls the Session API; every user error ends in one sentence."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from typing import Annotated

import typer

from ltri.config import LtriConfig, MemoryConfig
from ltri.errors import LtriError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Read a long text with a language model and answer questions about it.",
)

ContextOption = Annotated[str, typer.Option("--context", "-c", help="Text file to read (- for standard input).")]
ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="Hub id, model directory or .gguf file (default: bundled SmolLM2).")
]
PolicyOption = Annotated[str, typer.Option("--policy", help="Memory policy: full or streaming.")]
SinkOption = Annotated[int, typer.Option("--sink", help="Attention-sink tokens kept from the start (streaming).")]
WindowOption = Annotated[int, typer.Option("--window", help="Most recent tokens kept (streaming).")]
ChunkOption = Annotated[int, typer.Option("--chunk", help="Tokens per prefill step.")]
PositionsOption = Annotated[str, typer.Option("--positions", help="Position mode: compact or true.")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda if present).")]
MaxTokensOption = Annotated[int, typer.Option("--max-tokens", help="Most tokens in one answer.")]
TemperatureOption = Annotated[float, typer.Option("--temperature", "-t", help="0 for greedy decoding.")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")]
SystemOption = Annotated[str | None, typer.Option("--system", help="System prompt.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]


def build_config(policy: str, sink: int, window: int, chunk: int, positions: str, device: str | None) -> LtriConfig:
    memory = MemoryConfig(policy=policy, n_sink=sink, n_window=window)
    return LtriConfig(memory=memory, chunk_size=chunk, position_mode=positions, device=device)


def open_session(context: str, model: str | None, config: LtriConfig, system: str | None, quiet: bool):
    """Read the context file, load the model and feed the text, with progress on stderr."""
    from ltri.session import Session
    from ltri.text_input import read_text

    text = read_text(context)
    if quiet:
        session = Session(model, config, system=system)
    else:
        from rich.console import Console

        with Console(stderr=True).status("loading the model (its first use converts it once, ~20 s)"):
            session = Session(model, config, system=system)
    _feed_with_progress(session, text, quiet)
    return session


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    context: ContextOption,
    model: ModelOption = None,
    policy: PolicyOption = "full",
    sink: SinkOption = 64,
    window: WindowOption = 2048,
    chunk: ChunkOption = 512,
    positions: PositionsOption = "compact",
    device: DeviceOption = None,
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = 0.0,
    seed: SeedOption = None,
    system: SystemOption = None,
    quiet: QuietOption = False,
) -> None:
    """Answer one question about a text file and print the answer."""
    if not question.strip():
        raise LtriError("The question is empty: ask something about the text.")
    config = build_config(policy, sink, window, chunk, positions, device)
    session = open_session(context, model, config, system, quiet)
    for piece in session.stream(question, max_new_tokens=max_tokens, temperature=temperature, seed=seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def chat(
    context: ContextOption,
    model: ModelOption = None,
    policy: PolicyOption = "full",
    sink: SinkOption = 64,
    window: WindowOption = 2048,
    chunk: ChunkOption = 512,
    positions: PositionsOption = "compact",
    device: DeviceOption = None,
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = 0.0,
    seed: SeedOption = None,
    system: SystemOption = None,
    quiet: QuietOption = False,
) -> None:
    """Read a text file, then answer questions from the terminal (one per line; Ctrl-D or /bye ends)."""
    if context == "-":
        raise LtriError("chat reads questions from standard input, so --context - cannot be used with it.")
    config = build_config(policy, sink, window, chunk, positions, device)
    session = open_session(context, model, config, system, quiet)
    interactive = sys.stdin.isatty()
    while True:
        question = _read_question(interactive)
        if question is None or question.strip() in ("/bye", "/exit", "/quit"):
            break
        if not question.strip():
            continue
        with _CtrlC() as ctrl_c:
            for piece in session.stream(question, max_new_tokens=max_tokens, temperature=temperature, seed=seed):
                sys.stdout.write(piece)
                sys.stdout.flush()
                if ctrl_c.pressed:
                    sys.stdout.write(" [stopped]")
                    break
        sys.stdout.write("\n")
        sys.stdout.flush()


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
