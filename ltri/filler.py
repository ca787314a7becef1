"""Deterministic filler text: plain, varied English sentences for tests, samples and haystacks.

The same seed always gives the same text, so tests and benchmarks need no files from elsewhere.
"""

from __future__ import annotations

import random

_PEOPLE = ["Mara", "Tomas", "Ines", "Olek", "Priya", "Jonah", "Lucia", "Bram", "Selma", "Arjun", "Hedda", "Kofi"]
_PLACES = [
    "the harbour",
    "the old library",
    "the market square",
    "the hill farm",
    "the train station",
    "the bakery",
    "the river bank",
    "the school yard",
    "the town hall",
    "the orchard",
    "the bridge",
]
_TIMES = [
    "In the morning",
    "Before noon",
    "Late in the afternoon",
    "After supper",
    "On Sunday",
    "At dawn",
    "Later that week",
    "In early spring",
    "During the long winter",
    "One rainy evening",
]
_ACTIONS = [
    "walked slowly to",
    "cycled to",
    "met a friend at",
    "painted a picture of",
    "wrote a letter about",
    "swept the floor of",
    "sold apples near",
    "sang a quiet song at",
    "read a newspaper at",
    "looked for a lost key at",
]
_AFTERTHOUGHTS = [
    "The weather was mild and grey.",
    "Nobody else seemed to notice.",
    "It had been a long day.",
    "A dog barked somewhere far away.",
    "The bells rang twice.",
    "There was bread on the table.",
    "The wind came from the sea.",
    "Everyone talked about the coming fair.",
    "The clock in the hall was slow again.",
    "Somebody had left the gate open.",
]


def filler_sentence(rng: random.Random) -> str:
    sentence = f"{rng.choice(_TIMES)}, {rng.choice(_PEOPLE)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}."
    if rng.random() < 0.5:
        sentence += " " + rng.choice(_AFTERTHOUGHTS)
    return sentence


def filler_text(n_sentences: int, seed: int = 0, paragraph_every: int = 6) -> str:
    """n_sentences of filler, in paragraphs of paragraph_every sentences."""
    rng = random.Random(seed)
    paragraphs, current = [], []
    for _ in range(n_sentences):
        current.append(filler_sentence(rng))
        if len(current) == paragraph_every:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def text_with_fact(fact: str, n_sentences: int, depth: float = 0.5, seed: int = 0) -> str:
    """Filler with one fact sentence inserted between sentences at depth (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    sentences = [filler_sentence(rng) for _ in range(n_sentences)]
    sentences.insert(round(depth * n_sentences), fact)
    return " ".join(sentences)
