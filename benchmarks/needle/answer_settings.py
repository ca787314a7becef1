"""Answer-time retrieval settings on one stored needle context: read once, then reopen and ask with each.

    python3 benchmarks/needle/answer_settings.py --length 12k --depth 50 --haystack DIR_OF_TXT \
        --settings '[{}, {"budget": 4096}, {"collaboration": 0}]' --out results.json

The context is built as in needle.py (ltri.needle: same needle, question, scoring and needle recall). It is fed
once with the default config into a store; every setting (RetrievalConfig fields, plus "position_mode", plus
"oracle": true for oracle retrieval, ltri.needle.oracle: the needle's spans win every retrieval) reopens that
store and asks. Only what happens after reading changes between rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from ltri import LtriConfig, RetrievalConfig, Session
from ltri.needle.one_context import add_context_arguments, load_context
from ltri.needle.oracle import needle_first
from ltri.needle.recall import fed_token_ids, needle_token_range, recall_fields, watch_needle
from ltri.provenance import git_sha


def config_for(setting: dict) -> LtriConfig:
    setting = {key: value for key, value in setting.items() if key != "oracle"}
    position_mode = setting.pop("position_mode", LtriConfig().position_mode)
    return dataclasses.replace(LtriConfig(), position_mode=position_mode, retrieval=RetrievalConfig(**setting))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_context_arguments(parser, length="12k")
    parser.add_argument("--settings", default="[{}]", help="JSON list of RetrievalConfig overrides")
    args = parser.parse_args()
    one = load_context(args)
    model, tokenizer, probe, context = one.model, one.tokenizer, one.probe, one.context
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        with Session(model, LtriConfig(device=args.device), tokenizer=tokenizer, store=store) as reader:
            started = time.perf_counter()
            reader.feed(context.text)
            feed_seconds = time.perf_counter() - started
            reader.save()
        for setting in json.loads(args.settings):
            with Session.open(store, model=model, tokenizer=tokenizer, config=config_for(setting)) as session:
                _, offsets = fed_token_ids(tokenizer, session.chat_format, context.text)
                start, end = needle_token_range(offsets, context.needle_chars)
                oracle = needle_first(start, end) if setting.get("oracle") else contextlib.nullcontext()
                with oracle, watch_needle(start, end) as coverage:
                    response = session.ask(probe.question, max_new_tokens=args.max_new_tokens)
                row = {"setting": setting, "score": probe.score(response), "response": response}
                row |= recall_fields(session, coverage)
            rows.append(row)
            print(
                f"{json.dumps(setting):60s} score {row['score']}  recall {row['needle_recall']:.2f}  {response[:70]!r}"
            )
    result = {
        "context_length": context.n_tokens,
        "depth_percent": args.depth,
        "haystack": str(args.haystack) if args.haystack else "filler",
        "feed_seconds": feed_seconds,
        "env": {"git_sha": git_sha(), "device": str(model.device), "command": " ".join(sys.argv)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
