"""Time to load the bundled model: first use (GGUF conversion into an empty cache) and later uses.

    python benchmarks/speed/model_load.py --out benchmarks/speed/results/model_load_cpu.json

Each measurement runs in a fresh Python process (imports included, as a user's `ltri` command pays
them), with LTRI_CACHE pointing at a new temporary directory that the first run fills.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ltri.provenance import git_sha

LOAD = "from ltri import load_model; load_model(None, device='cpu', dtype='float32')"


def time_load(cache: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD], check=True, env={**os.environ, "LTRI_CACHE": cache})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = time_load(cache)
        later = [time_load(cache) for _ in range(args.warm_runs)]
    print(f"first use (converts the GGUF): {first:.1f} s; later uses: {', '.join(f'{t:.1f}' for t in later)} s")
    sha = git_sha()
    result = {"first_use_s": first, "later_use_s": later, "command": " ".join(sys.argv), "git_sha": sha}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
