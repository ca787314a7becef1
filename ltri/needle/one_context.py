"""One needle context from command-line arguments, for the diagnostics that study a single cell
(benchmarks/needle/answer_settings.py, benchmarks/needle/resident_text.py): the options, the model and the context."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ltri.model import load_model
from ltri.needle.haystack import Context, build_context, make_haystack
from ltri.needle.settings import parse_lengths
from ltri.needle.tasks import Probe, make_probe


def add_context_arguments(parser: argparse.ArgumentParser, length: str) -> None:
    """--length (default length), --depth, --haystack, --device, --max-new-tokens and --out."""
    parser.add_argument("--length", default=length)
    parser.add_argument("--depth", type=float, default=50.0)
    parser.add_argument("--haystack", type=Path, default=None, help="directory of .txt files (default: filler)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, required=True)


@dataclass(frozen=True)
class OneContext:
    model: object
    tokenizer: object
    probe: Probe
    context: Context


def load_context(args: argparse.Namespace) -> OneContext:
    """The bundled model on args.device, the needle probe, and the context of args.length tokens at args.depth."""
    (length,) = parse_lengths(args.length)
    model, tokenizer = load_model(None, device=args.device)
    probe = make_probe("needle", 0, length, args.depth)
    haystack = make_haystack(tokenizer, args.haystack, length + 256)
    return OneContext(model, tokenizer, probe, build_context(tokenizer, haystack, length, args.depth, probe.sentence))
