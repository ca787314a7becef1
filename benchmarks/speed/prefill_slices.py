"""Each stretch's own prefill speed, from the progress lines of e2e.py's output (NOTES.md step 17).

    python3 benchmarks/speed/prefill_slices.py results/e2e_h100_2e80e2e.log --label "ltri 131072" --out FILE

e2e.py prints a line every eighth of a prefill with the average rate since its start; rows measured since step 17
keep those marks as ``prefill_slices``, and this script recovers the same from the logs of earlier runs (the
seconds of each mark are tokens / the printed rate, which is rounded to whole tokens/s). Prints one line a log
and writes {"logs": {path: {"label", "total_s", "slices": [{"from", "to", "tok_s"}]}}}.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import slice_rates  # noqa: E402


def marks_from_log(text: str, label: str) -> list[tuple[int, float]]:
    """(tokens done, seconds) of each progress line of the row label (e.g. "ltri 131072"), in order."""
    pattern = re.compile(rf"^\s*{re.escape(label)}: prefill (\d+)/\d+ tokens, (\d+) tok/s$", re.MULTILINE)
    return [(int(done), int(done) / int(rate)) for done, rate in pattern.findall(text)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--label", default="ltri 131072", help="the row, as the progress lines name it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    document = {"label": args.label, "logs": {}}
    for path in args.logs:
        marks = marks_from_log(path.read_text(), args.label)
        if not marks:
            sys.exit(f"{path} has no progress lines of {args.label!r}.")
        slices = slice_rates(marks)
        document["logs"][str(path)] = {"total_s": marks[-1][1], "slices": slices}
        stretches = " ".join(f"{s['from'] // 1024}-{s['to'] // 1024}K:{s['tok_s']:,.0f}" for s in slices)
        print(f"{path.name}: {stretches} (total {marks[-1][1]:.2f} s)")
    if args.out is not None:
        args.out.write_text(json.dumps(document, indent=1) + "\n")
    return document


if __name__ == "__main__":
    main()
