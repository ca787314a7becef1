"""Registers and spills of every Triton kernel launch on an H100 (sm_90), read from ptxas on a machine without a GPU.

    python3 benchmarks/speed/kernel_resources.py [--out FILE]

Each kernel launcher runs on CPU tensors with its launches recorded (tests/kernel_build.py: the kernel tests'
shapes, float32, float16 and bfloat16); each distinct launch is compiled for sm_90 by Triton and its PTX assembled
again by the ptxas that comes with Triton, verbosely: one JSON line per launch with the kernel, dtype, warps,
stages, shared memory (bytes), registers per thread, spill stores and loads (bytes) and the stack frame. A static
view: registers set how many warps an SM holds (65,536 registers), spills go through local memory; none is a
timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import kernel_build  # noqa: E402

FIELDS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack_frame": r"(\d+) bytes stack frame",
}


def ptxas_path() -> str:
    """The newest ptxas Triton ships (the PTX it writes may be newer than the plain one accepts)."""
    import triton

    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (folder / name).exists():
            return str(folder / name)
    raise SystemExit(f"no ptxas under {folder}")


def resources(ptx: str, ptxas: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as source:
        source.write(ptx)
    try:
        done = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", source.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        os.unlink(source.name)
    found = {name: re.search(pattern, done.stderr) for name, pattern in FIELDS.items()}
    return {name: int(match.group(1)) if match else None for name, match in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file (default: standard output only)")
    parser.add_argument("--limit", type=int, default=0, help="the first LIMIT launches only (0: all)")
    args = parser.parse_args()
    ptxas = ptxas_path()
    rows = []
    for index, (dtype, kernel, launch_args, kwargs) in enumerate(kernel_build.distinct_launches()):
        if args.limit and index >= args.limit:
            break
        compiled = kernel_build.compile_launch(kernel, launch_args, kwargs)
        values = kernel_build.launch_values(kernel, launch_args, kwargs)
        row = {
            "kernel": kernel.__name__,
            "dtype": str(dtype).removeprefix("torch."),
            "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages,
            "constexprs": {
                param.name: values[param.name]
                for param in kernel.params
                if param.is_constexpr and isinstance(values.get(param.name), (int, bool, str))
            },
            "shared_bytes": compiled.metadata.shared,
            **resources(compiled.asm["ptx"], ptxas),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
