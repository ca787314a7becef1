"""What a cell hides in the haystack and asks about: the needle task and the passkey task.

needle: "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny
day.", asked "What is the best thing to do in San Francisco?"; the answer terms are "sandwich" and
"dolores". passkey: a random 5-digit key, drawn from the run's seed and the cell (length, depth),
hidden as "The pass key is 71432. Remember it. 71432 is the pass key.", asked "What is the pass
key?"; the answer term is the key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ltri.needle.scoring import score

TASKS = ("needle", "passkey")
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_TERMS = ("sandwich", "dolores")
PASSKEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_DIGITS = 5


@dataclass(frozen=True)
class Probe:
    """One cell's hidden sentence, its question, and the terms a right answer holds."""

    sentence: str
    question: str
    answer_terms: tuple[str, ...]

    def score(self, response: str) -> float:
        return score(response, self.answer_terms)


def pass_key(seed: int, length: int, depth: float) -> str:
    """A PASSKEY_DIGITS-digit key, the same for every run with this seed, length and depth."""
    rng = random.Random(f"passkey:{seed}:{length}:{depth:g}")  # a str seed hashes the same in every process
    return str(rng.randrange(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS))


def make_probe(task: str, seed: int, length: int, depth: float) -> Probe:
    """The probe of the cell at (length, depth) for task."""
    if task == "needle":
        return Probe(NEEDLE, QUESTION, ANSWER_TERMS)
    if task == "passkey":
        key = pass_key(seed, length, depth)
        return Probe(PASSKEY_SENTENCE.format(key=key), PASSKEY_QUESTION, (key,))
    raise ValueError(f"unknown task {task!r}: choose {' or '.join(TASKS)}")


def task_sentence(task: str) -> tuple[str, str]:
    """(hidden sentence, question) of a task as config.json records them; {key} marks the pass key."""
    return (NEEDLE, QUESTION) if task == "needle" else (PASSKEY_SENTENCE, PASSKEY_QUESTION)
