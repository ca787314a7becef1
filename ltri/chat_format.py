"""Where the context, the questions and the answers go in the model's chat template.

The template is rendered once with marker strings and cut at them, so that the text can be fed
before the question is known and the conversation can go on for ever:

    open_first_user + context + question_separator + question + open_assistant + answer
    + open_next_user + question + open_assistant + answer ...
"""

from __future__ import annotations

from dataclasses import dataclass

_MARKERS = ("\x00LTRI-U1\x00", "\x00LTRI-A1\x00", "\x00LTRI-U2\x00")


@dataclass(frozen=True)
class ChatFormat:
    open_first_user: str  # before the first user message (system prompt included)
    question_separator: str  # between the fed text and the question inside one user message
    open_assistant: str  # after a user message, before the answer
    open_next_user: str  # after an answer, before the next user message
    add_special_tokens: bool  # whether the tokenizer should add its own BOS to the first piece

    @classmethod
    def for_tokenizer(cls, tokenizer, system: str | None = None) -> ChatFormat:
        if getattr(tokenizer, "chat_template", None):
            return cls._from_template(tokenizer, system)
        return cls._plain(system)

    @classmethod
    def _from_template(cls, tokenizer, system: str | None) -> ChatFormat:
        user1, answer1, user2 = _MARKERS
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages += [
            {"role": "user", "content": user1},
            {"role": "assistant", "content": answer1},
            {"role": "user", "content": user2},
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before_user1, rest = rendered.split(user1, 1)
        between_user1_answer1, rest = rest.split(answer1, 1)
        between_answer1_user2, after_user2 = rest.split(user2, 1)
        return cls(
            open_first_user=before_user1,
            question_separator="\n\n",
            open_assistant=between_user1_answer1,
            open_next_user=between_answer1_user2,
            add_special_tokens=False,
        )

    @classmethod
    def _plain(cls, system: str | None) -> ChatFormat:
        return cls(
            open_first_user="" if system is None else system + "\n\n",
            question_separator="\n\nQuestion: ",
            open_assistant="\nAnswer:",
            open_next_user="\n\nQuestion: ",
            add_special_tokens=True,
        )
