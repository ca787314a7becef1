"""Scoring an answer: the fraction of the answer terms it holds, case-insensitive.

The needle task's terms are "sandwich" and "dolores" (1 for both, 0.5 for one, 0 for none); the
passkey task's one term is the key's digits (1 if they appear in the answer, else 0).
"""

from __future__ import annotations

from collections.abc import Sequence


def score(response: str, terms: Sequence[str]) -> float:
    """Fraction of terms found in response, case-insensitive."""
    found = sum(term.lower() in response.lower() for term in terms)
    return found / len(terms)
