"""The ``ltri`` command line. It only calls the Session API; every user error ends in one sentence."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from ltri.cli import needle
from ltri.cli.answer_stream import stream_answer
from ltri.cli.guard import run_guarded
from ltri.cli.options import AnswerOptions, ReadingOptions, with_options
from ltri.cli.progress import feed_with_progress, note, status
from ltri.cli.session_source import LOADING, check_one_source, open_session

from ltri.errors import LtriError

__all__ = ["AnswerOptions", "ReadingOptions", "app", "main", "open_session", "run_guarded", "with_options"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Read a long text with a language model and answer questions about it.",
)

ContextOption = Annotated[str | None, typer.Option("--context", "-c", help="Text file to read (- for standard input).")]
StoreOption = Annotated[
    Path | None, typer.Option("--store", "-s", help="Saved store to answer from (made by `ltri ingest`).")
]
NoCacheOption = Annotated[
    bool,
    typer.Option("--no-cache", help="Read the context again instead of reopening its cached store (none is kept)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


@app.command()
@with_options(reading=ReadingOptions, answer=AnswerOptions)
def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    reading: ReadingOptions,
    answer: AnswerOptions,
    context: ContextOption = None,
    store: StoreOption = None,
    no_cache: NoCacheOption = False,
    json_output: JsonOption = False,
) -> None:
    """Answer one question about a text file (or a saved store): streamed, or with --json as
    {"answer", "tokens", "seconds", "spans"}."""
    if not question.strip():
        raise LtriError("The question is empty: ask something about the text.")
    answer.checked()
    with open_session(context, store, reading, answer.system, use_cache=not no_cache) as opened:
        report = stream_answer(opened.session, question, answer, echo=not json_output)
        if json_output:
            spans = [dataclasses.asdict(span) for span in opened.session.retrieved_spans()]
            result = {"answer": report.text, "tokens": report.tokens, "seconds": report.seconds, "spans": spans}
            sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")


@app.command()
@with_options(reading=ReadingOptions, answer=AnswerOptions)
def chat(
    reading: ReadingOptions,
    answer: AnswerOptions,
    context: ContextOption = None,
    store: StoreOption = None,
    no_cache: NoCacheOption = False,
) -> None:
    """Read a text file (or open a saved store), then answer questions from the terminal.

    Answers stream as they decode; Ctrl-C stops one. /help lists the commands (/stats, /spans,
    /reset, /set, /save); /bye or Ctrl-D ends. A text read once is kept in the cache (--no-cache:
    not), so the next chat about it starts without reading it again.
    """
    from ltri.cli.chat import run_chat
    from ltri.cli.chat_input import attach_terminal

    from ltri.text_input import read_text

    answer.checked()
    check_one_source(context, store)
    text = None if context is None else read_text(context)
    if context == "-":
        attach_terminal()
    with open_session(context, store, reading, answer.system, not no_cache, rewindable=True, text=text) as opened:
        run_chat(opened, answer, reading.quiet)


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
    with status(reading.quiet, LOADING):
        session = Session(reading.model, reading.config(), system=system, store=store)
    with session:
        feed_with_progress(session, text, reading.quiet)
        session.save()
    note(reading.quiet, f"saved the store in {store}")


@app.command()
def info(
    store: Annotated[Path, typer.Option("--store", "-s", help="The store to describe.")],
    json_output: JsonOption = False,
) -> None:
    """Describe a saved store without loading its model: model, tokens, spans, size, config, complete or not."""
    from ltri.cli.store_view import store_lines

    from ltri.store_info import store_info

    facts = store_info(store)
    text = json.dumps(dataclasses.asdict(facts), indent=2) if json_output else "\n".join(store_lines(facts))
    sys.stdout.write(text + "\n")


needle.register(app)


def main() -> None:
    sys.exit(run_guarded(lambda: app(standalone_mode=False)))


if __name__ == "__main__":
    main()
