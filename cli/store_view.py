"""`ltri info` as text: one fact per line."""

from __future__ import annotations

from ltri.cli.units import human_bytes

from ltri.store_info import StoreInfo


def store_lines(info: StoreInfo) -> list[str]:
    complete = "yes" if info.complete else "no: its writer stopped before finishing; ingest the text again"
    model = info.model or "the bundled default (SmolLM2-135M-Instruct)"
    spans = f"{info.spans:,} over {info.layers} layers" if info.layers else "none recorded"
    return [
        f"store     {info.path}",
        f"complete  {complete}",
        f"model     {model}" + (f" ({info.model_type}, {info.dtype})" if info.model_type else ""),
        f"tokens    {info.tokens:,}",
        f"spans     {spans}",
        f"size      {human_bytes(info.size_bytes)} on disk",
        f"config    {_config_line(info.config)}",
        f"saved     {info.saved_at or 'unknown'}",
    ]


def _config_line(config: dict) -> str:
    if not config:
        return "unknown"
    memory, retrieval = config.get("memory", {}), config.get("retrieval", {})
    parts = [
        f"policy {memory.get('policy')}",
        f"sink {memory.get('n_sink')}",
        f"window {memory.get('n_window')}",
        f"budget {retrieval.get('budget')}",
        f"selector {retrieval.get('selector')}",
        f"chunk {config.get('chunk_size') or 'default'}",
        f"positions {config.get('position_mode')}",
    ]
    return ", ".join(parts)
