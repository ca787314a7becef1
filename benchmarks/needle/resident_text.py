"""Would the model answer from what ltri holds, read as one short text? A diagnostic for the oracle cells.

    python3 benchmarks/needle/resident_text.py --length 16k --depth 22.2222 --haystack DIR_OF_TXT --out FILE

The context is built as in needle.py and read into an ltri session (default config). Then the question is asked
three ways, each answer scored as the grid scores it:

- ``ltri_oracle``: that session, with oracle retrieval (``ltri.needle.oracle``: every layer holds the needle);
- ``full_resident_text``: a fresh session with full attention over the text of what the oracle keeps resident,
  read as one short text: the sinks' tokens, every layer's spans that hold the needle (their union, one piece)
  and the window's tokens, in that order, as ltri's compact positions place them;
- ``full_without_needle``: the same text without the needle piece (the control: what the rest says).

If full attention answers from the resident text and ltri does not, ltri loses something of what it holds (the keys
and values of those tokens were computed in the long text, next to other tokens); if neither answers, the model
misreads the short text as well, and better retrieval cannot help that cell.
"""

from __future__ import annotations

import argparse
import json
import sys

from ltri import LtriConfig, Session
from ltri.methods import method_config
from ltri.needle.one_context import add_context_arguments, load_context
from ltri.needle.oracle import needle_first
from ltri.needle.recall import fed_token_ids, needle_token_range
from ltri.provenance import git_sha


def needle_spans(memories, start: int, end: int) -> tuple[int, int]:
    """[first, last) token positions of the union of every layer's stored spans that overlap [start, end)."""
    firsts, lasts = [], []
    for memory in memories:
        starts, ends = memory.span_starts, memory.span_starts + memory.span_lengths
        hit = (starts < end) & (ends > start)
        if hit.any():
            firsts.append(int(starts[hit].min()))
            lasts.append(int(ends[hit].max()))
    return (min(firsts), max(lasts)) if firsts else (start, end)


def resident_pieces(session, ids: list[int], n_opening: int, start: int, end: int) -> dict[str, list[int]]:
    """Token ids of the sinks (without the chat opening), the needle's spans and the window, as layer 0 holds them."""
    memory = session.cache.memories()[0]
    sinks = [int(p) for p in memory.sinks.positions() if p >= n_opening]
    window = [int(p) for p in memory.window.positions()]
    first, last = needle_spans(session.cache.memories(), start, end)
    return {
        "sinks": [ids[p] for p in sinks],
        "needle": ids[first:last],
        "window": [ids[p] for p in window],
    }


def ask_full(model, tokenizer, text: str, question: str, max_new_tokens: int) -> str:
    config = method_config("full", LtriConfig())
    with Session(model, config, tokenizer=tokenizer) as session:
        session.feed(text)
        return session.ask(question, max_new_tokens=max_new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_context_arguments(parser, length="16k")
    args = parser.parse_args()
    one = load_context(args)
    model, tokenizer, probe, context = one.model, one.tokenizer, one.probe, one.context
    rows = {}
    with Session(model, LtriConfig(device=args.device), tokenizer=tokenizer) as session:
        session.feed(context.text)
        ids, offsets = fed_token_ids(tokenizer, session.chat_format, context.text)
        start, end = needle_token_range(offsets, context.needle_chars)
        n_opening = sum(1 for offset in offsets if offset == (-1, -1))
        pieces = resident_pieces(session, ids, n_opening, start, end)
        with needle_first(start, end):
            rows["ltri_oracle"] = session.ask(probe.question, max_new_tokens=args.max_new_tokens)
    texts = {name: tokenizer.decode(piece) for name, piece in pieces.items()}
    resident = texts["sinks"] + texts["needle"] + texts["window"]
    rows["full_resident_text"] = ask_full(model, tokenizer, resident, probe.question, args.max_new_tokens)
    control = texts["sinks"] + texts["window"]
    rows["full_without_needle"] = ask_full(model, tokenizer, control, probe.question, args.max_new_tokens)
    result = {
        "context_length": context.n_tokens,
        "depth_percent": args.depth,
        "haystack": str(args.haystack) if args.haystack else "filler",
        "piece_tokens": {name: len(piece) for name, piece in pieces.items()},
        "needle_piece": texts["needle"],
        "answers": {name: {"response": response, "score": probe.score(response)} for name, response in rows.items()},
        "env": {"git_sha": git_sha(), "device": str(model.device), "command": " ".join(sys.argv)},
    }
    for name, answer in result["answers"].items():
        print(f"{name:22s} score {answer['score']}  {answer['response'][:80]!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
