"""Does the echo (ltri.echo) hold the needle? For one needle context: the needle's tokens inside the echo's positions,
and the time echo_positions took.

    python3 benchmarks/needle/echo_reach.py --length 16k --depth 66.6667 --haystack DIR_OF_TXT --echo-tokens 256 --out F
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ltri import LtriConfig, Session
from ltri.echo import echo_positions
from ltri.needle.one_context import add_context_arguments, load_context
from ltri.needle.recall import fed_token_ids, needle_token_range
from ltri.provenance import git_sha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_context_arguments(parser, length="16k")
    parser.add_argument("--echo-tokens", type=int, default=256)
    args = parser.parse_args()
    one = load_context(args)
    session = Session(one.model, LtriConfig(device=args.device), tokenizer=one.tokenizer)
    ids, offsets = fed_token_ids(one.tokenizer, session.chat_format, one.context.text)
    start, end = needle_token_range(offsets, one.context.needle_chars)
    question = one.tokenizer(one.probe.question, add_special_tokens=False)["input_ids"]
    started = time.perf_counter()
    echo = echo_positions(ids, question, args.echo_tokens)
    seconds = time.perf_counter() - started
    held = int(np.isin(np.arange(start, end), echo.numpy()).sum())
    row = dict(length=len(ids), depth_percent=args.depth, needle_tokens=end - start, needle_tokens_in_echo=held)
    row |= dict(echo_tokens=args.echo_tokens, echo_ms=seconds * 1000, git_sha=git_sha())
    print(json.dumps(row))
    with open(args.out, "w") as file:
        json.dump(row, file, indent=1)


if __name__ == "__main__":
    main()
