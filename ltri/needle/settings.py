"""The settings of one needle run (the grid of cells and how each is read), and how options parse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ltri.config import LtriConfig, MemoryConfig, RetrievalConfig, SpanConfig, check_selection_narrows
from ltri.methods import METHODS, method_config
from ltri.needle.tasks import TASKS

# Run settings that change what a cell measures: a run resuming in a directory must keep them.
CELL_SETTINGS = (
    "task",
    "seed",
    "haystack",
    "model",
    "device",
    "dtype",
    "max_new_tokens",
    "budget",
    "window",
    "sink",
    "chunk_size",
    "index_vectors",
    "query_dims",
    "refresh_every",
    "vote",
    "reading_vote",
    "reread",
    "reread_evidence",
    "draft_tokens",
    "echo_tokens",
    "selector",
    "select_tokens",
    "select_rank",
)


@dataclass(frozen=True)
class NeedleRun:
    """One benchmark run: the grid of cells and how each is read. lengths in tokens, depths in percent."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    methods: tuple[str, ...]
    out: Path
    task: str = "needle"
    seed: int = 0  # the passkey task draws each cell's key from (seed, length, depth)
    haystack: Path | None = None  # directory of .txt files; None: generated filler
    model: str | None = None  # None: the bundled SmolLM2
    device: str | None = None
    dtype: str | None = None
    max_new_tokens: int = 32
    budget: int = RetrievalConfig().budget
    window: int = MemoryConfig().n_window
    sink: int = MemoryConfig().n_sink
    chunk_size: int | None = LtriConfig().chunk_size
    index_vectors: str = SpanConfig().index_vectors  # the ltri method's; the others set their own
    query_dims: str = RetrievalConfig().query_dims  # likewise
    refresh_every: int = RetrievalConfig().refresh_every  # likewise (infllm and quest keep the default)
    vote: str = RetrievalConfig().vote  # likewise
    reading_vote: str | None = RetrievalConfig().reading_vote  # likewise
    reread: bool = RetrievalConfig().reread  # likewise
    reread_evidence: int = RetrievalConfig().reread_evidence  # likewise
    draft_tokens: int = RetrievalConfig().draft_tokens  # likewise
    echo_tokens: int = RetrievalConfig().echo_tokens  # likewise
    selector: str = RetrievalConfig().selector  # likewise: the token selection of its decode steps
    select_tokens: int = RetrievalConfig().select_tokens  # likewise
    select_rank: int = RetrievalConfig().select_rank  # likewise

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError("give at least one context length, each of 64 tokens or more")
        if not self.depths or not all(0 <= depth <= 100 for depth in self.depths):
            raise ValueError("depths must be percentages in [0, 100]")
        unknown = sorted(set(self.methods) - set(METHODS))
        if not self.methods or unknown:
            raise ValueError(f"unknown methods {unknown}: choose among {', '.join(METHODS)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: choose {' or '.join(TASKS)}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")

    def base_config(self) -> LtriConfig:
        """The config the methods start from: the run's sinks, window, budget, chunk, device and dtype (and the ltri
        method's retrieval options); LtriError where they contradict each other."""
        config = LtriConfig(
            memory=MemoryConfig(n_sink=self.sink, n_window=self.window),
            spans=SpanConfig(index_vectors=self.index_vectors),
            retrieval=RetrievalConfig(
                budget=self.budget,
                query_dims=self.query_dims,
                refresh_every=self.refresh_every,
                vote=self.vote,
                reading_vote=self.reading_vote,
                reread=self.reread,
                reread_evidence=self.reread_evidence,
                draft_tokens=self.draft_tokens,
                echo_tokens=self.echo_tokens,
                selector=self.selector,
                select_tokens=self.select_tokens,
                select_rank=self.select_rank,
            ),
            chunk_size=self.chunk_size,
            device=self.device,
            dtype=self.dtype,
        )
        check_selection_narrows(config.retrieval)
        return config

    def ltri_config(self, method: str) -> LtriConfig:
        return method_config(method, self.base_config())


def parse_lengths(text: str) -> tuple[int, ...]:
    """ "16k,32k,5000" -> (16384, 32768, 5000): k is 1024 tokens, as in benchmarks/speed."""
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        lengths.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    return tuple(lengths)


def parse_depths(text: str) -> tuple[float, ...]:
    """ "5" -> 5 depths evenly spaced over [0, 100] inclusive; "10,50,90" or "50%" -> those percentages."""
    text = text.strip()
    if text.isdigit():
        count = int(text)
        if count < 2:
            raise ValueError("a depth count must be 2 or more (write one depth as e.g. '50%')")
        return tuple(round(100 * i / (count - 1), 4) for i in range(count))
    return tuple(float(item.strip().rstrip("%")) for item in text.split(",") if item.strip())


def parse_methods(text: str) -> tuple[str, ...]:
    """ "ltri, full" -> ("ltri", "full")."""
    return tuple(method.strip() for method in text.split(",") if method.strip())


def format_depth(depth: float) -> str:
    return f"{depth:g}"


# Defaults of the grid options, as the command lines write them.
DEFAULT_LENGTHS, DEFAULT_DEPTHS, DEFAULT_METHODS = "2k,4k,8k", "5", "ltri,full"

# What each option means, shared by the script (argparse) and `ltri needle` (typer).
HELP = {
    "lengths": "context lengths in tokens, k = 1024 (16k,32k)",
    "depths": "a count evenly spaced over 0..100% (5), or a list of percentages (10,50,90 or 50%)",
    "methods": f"methods among {','.join(METHODS)} (ltri.methods)",
    "task": f"what is hidden and asked: {' or '.join(TASKS)}",
    "seed": "seed of the passkey task's keys (each cell's key comes from the seed, its length and depth)",
    "out": "result directory (a run there resumes)",
    "haystack": "directory of .txt files (default: generated filler)",
    "model": "model name or path (default: the bundled SmolLM2)",
    "device": "cpu, cuda or cuda:N (default: cuda if present)",
    "dtype": "float32, bfloat16 or float16",
    "max_new_tokens": "answer length in tokens",
    "budget": "retrieved tokens per layer and step (the sparse methods share it)",
    "window": "local window tokens",
    "sink": "attention-sink tokens",
    "chunk_size": "tokens per prefill step (default: 2048 on a GPU, 1024 on the CPU)",
    "index_vectors": "the ltri method's index vectors: keys or bounds",
    "query_dims": "the ltri method's query dimensions: all or long_range",
    "refresh_every": "answer tokens per retrieval (0: the question's spans for the whole answer)",
    "vote": "how the queries' weights over spans pool into one vote per span: mean or max",
    "reading_vote": "the same for the text's long chunks, which vote with mean queries (default: as --vote)",
    "reread": "the ltri method reads the window again with the question's spans before answering (default: on)",
    "reread_evidence": "with --reread, stored tokens read again with the window: those the question's retrieval "
    "(or the draft's) held most",
    "draft_tokens": "with --reread-evidence, a greedy draft answer of up to this many tokens chooses the evidence, "
    "then is forgotten",
    "selector": "the ltri method's token selection at decode steps: none, loki or sparq (each KV head keeps its "
    "--select-tokens best of the --budget's tokens)",
    "select_tokens": "with --selector, the retrieved tokens each KV head keeps a decode step (below --budget)",
    "select_rank": "with --selector, the dimensions its approximate scores use",
    "echo_tokens": "of the --reread-evidence, up to this many stored tokens around where the question's own words "
    "recur in the text",
}
