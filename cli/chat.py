"""The chat loop: messages from the terminal (or a pipe), answers streamed to stdout, slash commands."""

from __future__ import annotations

import sys

from ltri.cli.answer_stream import AnswerReport, CtrlC, stream_answer
from ltri.cli.chat_commands import run_command
from ltri.cli.chat_input import catch_ctrl_c, enable_line_editing, read_message
from ltri.cli.options import AnswerOptions
from ltri.cli.progress import note
from ltri.cli.session_source import OpenSession


class Chat:
    """A conversation about a text: the session, the answer settings, the last answer's report."""

    def __init__(self, opened: OpenSession, answer: AnswerOptions, interactive: bool) -> None:
        self.session = opened.session
        self.saved = opened.saved
        self.answer = answer
        self.interactive = interactive
        self.last: AnswerReport | None = None

    def say(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def error(self, text: str) -> None:
        sys.stderr.write(f"error: {text}\n")
        sys.stderr.flush()

    def answer_question(self, question: str) -> None:
        import torch

        with CtrlC() as ctrl_c:
            try:
                self.last = stream_answer(self.session, question, self.answer, stop=lambda: ctrl_c.pressed)
            except torch.OutOfMemoryError:
                self._recover_from_out_of_memory()
        if self.interactive:
            self.say("")

    def _recover_from_out_of_memory(self) -> None:
        import torch

        torch.cuda.empty_cache()
        self.session.rewind(self.saved)  # the layers' memories may be out of step: go back to the saved text
        self.error(
            "The GPU ran out of memory while answering, so the conversation was reset (the text stays read): "
            "try a smaller --budget or --max-tokens."
        )


def run_chat(opened: OpenSession, answer: AnswerOptions, quiet: bool) -> None:
    interactive = sys.stdin.isatty()
    chat = Chat(opened, answer, interactive)
    if interactive:
        enable_line_editing()
        catch_ctrl_c()
        tokens = opened.session.stats().tokens_seen
        note(quiet, f"{tokens:,} tokens read. Ask about the text; /help lists the commands, /bye ends.")
    while True:
        try:
            message = read_message(interactive)
        except KeyboardInterrupt:
            if not interactive:
                raise
            sys.stdout.write("\n")
            note(False, "(Ctrl-D or /bye ends the chat)")
            continue
        if message is None:
            if interactive:
                sys.stdout.write("\n")  # Ctrl-D leaves the cursor on the prompt line
            break
        message = message.strip()
        if not message:
            continue
        if not message.startswith("/"):
            chat.answer_question(message)
        elif not run_command(chat, message):
            break
