"""DIR/config.json: the run's arguments, task, model and environment, and the configs of earlier runs
in the directory; a resume that would measure differently is refused."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ltri.errors import LtriError
from ltri.needle.cell import BUNDLED_MODEL
from ltri.needle.grid import write_json
from ltri.needle.settings import CELL_SETTINGS, NeedleRun
from ltri.needle.tasks import task_sentence
from ltri.provenance import git_dirty, git_sha


def environment(device: torch.device, argv: Sequence[str]) -> dict:
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
    }


def run_args(run: NeedleRun) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(run).items()}


def recorded_setting(args: dict, key: str):
    """A cell setting as an earlier run recorded it; settings added since then had their default value."""
    defaults = {f.name: f.default for f in fields(NeedleRun)}
    return args.get(key, defaults[key])


def previous_runs(run: NeedleRun) -> list[dict]:
    """The configs of earlier runs in run.out, oldest first; refuses a resume that would measure differently."""
    path = run.out / "config.json"
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    changed = [key for key in CELL_SETTINGS if recorded_setting(previous["args"], key) != run_args(run)[key]]
    if changed:
        raise LtriError(
            f"{run.out} holds cells made with other {', '.join(changed)}: give a new --out for these settings"
        )
    return previous.pop("previous_runs", []) + [previous]


def write_run_config(run: NeedleRun, model, argv: Sequence[str], earlier: list[dict]) -> None:
    device = next(model.parameters()).device
    needle, question = task_sentence(run.task)
    config = {
        "args": run_args(run),
        "task": run.task,
        "needle": needle,
        "question": question,
        "model": run.model or BUNDLED_MODEL,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "environment": environment(device, argv),
        "previous_runs": earlier,
    }
    write_json(run.out / "config.json", config)
