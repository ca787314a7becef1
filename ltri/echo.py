"""Echo: the stored text around where a question's own words recur (``RetrievalConfig.echo_tokens``).

A question's attention queries rarely find a needle in a long text (benchmarks/needle/README.md), yet a question
often restates the words of what it asks about ("What is the best thing to do in San Francisco?" and "The best
thing to do in San Francisco is ..."). So part of the evidence a question's reread encodes (``ltri.reread``) can be
chosen by the token ids alone, as a lexical retriever would: every run of consecutive question tokens found in the
text weighs the sum of its tokens' rarity in that text (log(n_text / count)), and around the heaviest runs, each
with some tokens before and more after (where an answer to the words usually follows), lie the echo's positions.
No model step and no stored payload is read: only the session's token ids.

Shapes: text_ids (n,), question_ids (q,) int arrays; positions (m,) int64, ascending, all < n.
"""

from __future__ import annotations

import numpy as np
import torch

ECHO_BEFORE = 32  # tokens kept before a run
ECHO_AFTER = 96  # tokens kept after a run's last token


def rarity(text_ids: np.ndarray) -> dict[int, float]:
    """log(n / count) of every token id in the text (n,): 0 for a token that is everywhere."""
    ids, counts = np.unique(text_ids, return_counts=True)
    weights = np.log(text_ids.size / counts)
    return dict(zip(ids.tolist(), weights.tolist(), strict=True))


def heaviest_runs(text_ids: np.ndarray, question_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every text position p: the weight (n,) float64 and length (n,) int64 of the heaviest run of
    consecutive question tokens that the text repeats ending at p (0 where text_ids[p] is no question token)."""
    n, q = text_ids.size, question_ids.size
    if n == 0 or q == 0:
        return np.zeros(n), np.zeros(n, dtype=np.int64)
    weight_of = rarity(text_ids)
    best_weight, best_length = np.zeros(n), np.zeros(n, dtype=np.int64)
    weight, length = np.zeros(n), np.zeros(n, dtype=np.int64)  # runs ending at (p, j - 1)
    for token in question_ids.tolist():  # a run ending at (p, j) extends the one ending at (p - 1, j - 1)
        match = text_ids == token  # (n,)
        extended_weight, extended_length = np.zeros(n), np.zeros(n, dtype=np.int64)
        extended_weight[1:], extended_length[1:] = weight[:-1], length[:-1]
        weight = np.where(match, extended_weight + weight_of.get(token, 0.0), 0.0)
        length = np.where(match, extended_length + 1, 0)
        heavier = weight > best_weight
        best_weight, best_length = np.where(heavier, weight, best_weight), np.where(heavier, length, best_length)
    return best_weight, best_length


def echo_positions(text_ids, question_ids, n_tokens: int, before: int = ECHO_BEFORE, after: int = ECHO_AFTER):
    """Up to n_tokens text positions (m,) around the heaviest runs of question tokens the text repeats, ascending
    (CPU int64): each run with ``before`` tokens before it and ``after`` after it, heaviest first (ties to the later
    run), the last one cut short at the quota (``run_reach``'s order); empty where no question token recurs."""
    text_ids, question_ids = np.asarray(text_ids, dtype=np.int64), np.asarray(question_ids, dtype=np.int64)
    weights, lengths = heaviest_runs(text_ids, question_ids)
    ends = np.flatnonzero(weights > 0)
    ends = ends[np.lexsort((-ends, -weights[ends]))]  # heaviest first, then the later
    chosen = np.zeros(text_ids.size, dtype=bool)
    taken = 0
    for end in ends.tolist():
        if taken >= n_tokens:
            break
        if chosen[end]:  # inside an earlier run's reach
            continue
        reach = run_reach(end - int(lengths[end]) + 1, end + 1, text_ids.size, before, after)
        new = reach[~chosen[reach]][: n_tokens - taken]
        chosen[new] = True
        taken += new.size
    return torch.from_numpy(np.flatnonzero(chosen))


def run_reach(start: int, stop: int, n: int, before: int, after: int) -> np.ndarray:
    """The positions (m,) a run [start, stop) reaches in a text of n tokens, in the order a quota takes them: the run,
    the tokens after it, then those before it, nearest first."""
    return np.concatenate(
        [
            np.arange(start, stop),
            np.arange(stop, min(n, stop + after)),
            np.arange(start - 1, max(0, start - before) - 1, -1),
        ]
    )
