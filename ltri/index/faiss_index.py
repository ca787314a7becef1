"""Exact span search with FAISS: one IndexIDMap2(IndexFlatIP) per KV head, on a GPU when FAISS has one.

Vector ids in FAISS are the vectors' insertion numbers 0..n_vectors-1, distinct as IndexIDMap2 needs
(its reverse map, used by reconstruct and its consistency check, breaks on repeated ids); a side array
maps them to span slots. A search asks FAISS for k' = k * (most vectors any span has) candidates, which
always holds k distinct spans when the index has that many, then keeps the best vector per span with
base.best_spans, the same code the torch backend uses.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from ltri.errors import LtriError
from ltri.index.base import SpanIndex, SpanSlots, best_spans, pad_results

GPU_MAX_K = 2048  # the most neighbours FAISS's GPU k-selection returns per query
_gpu_resources: dict[int, object] = {}  # one StandardGpuResources per GPU, shared by every layer's index


def uses_faiss_gpu(device: torch.device) -> bool:
    """FAISS runs on the GPU when the layer lives on CUDA and this FAISS build sees a GPU."""
    return device.type == "cuda" and faiss.get_num_gpus() > 0


def _gpu_id(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _shared_gpu_resources(gpu_id: int) -> object:
    if gpu_id not in _gpu_resources:
        _gpu_resources[gpu_id] = faiss.StandardGpuResources()
    return _gpu_resources[gpu_id]


class FaissSpanIndex(SpanIndex):
    def __init__(
        self, nheads_kv: int, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> None:
        """dtype is accepted for the common signature; FAISS keeps float32 vectors."""
        self.nheads_kv = nheads_kv
        self.dim = dim
        self.device = torch.device(device)
        self.on_gpu = uses_faiss_gpu(self.device)
        self._flats = [self._new_flat() for _ in range(nheads_kv)]  # kept alive here: the maps point at them
        self._maps = [faiss.IndexIDMap2(flat) for flat in self._flats]
        self._slots = SpanSlots()
        self._vector_slots = np.empty(0, dtype=np.int64)  # (n_vectors,) span slot of each FAISS id

    @property
    def n_spans(self) -> int:
        return self._slots.n_spans

    @property
    def n_vectors(self) -> int:
        return self._vector_slots.size

    def add(self, vectors: torch.Tensor, span_ids: torch.Tensor) -> None:
        self._check_add(vectors, span_ids)
        slots = self._slots.assign(span_ids).numpy()
        vector_ids = np.arange(self.n_vectors, self.n_vectors + slots.size, dtype=np.int64)
        host_vectors = vectors.detach().to("cpu", torch.float32).contiguous().numpy()  # (nheads_kv, n, dim)
        for head, index in enumerate(self._maps):
            index.add_with_ids(host_vectors[head], vector_ids)
        self._vector_slots = np.concatenate([self._vector_slots, slots])

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_search(queries, k)
        if self.n_vectors == 0:
            empty = torch.empty(self.nheads_kv, queries.shape[1], 0, device=queries.device)
            return pad_results(empty, empty.long(), k)
        n_candidates = min(self.n_vectors, k * self._slots.max_vectors_per_span())
        if self.on_gpu and n_candidates > GPU_MAX_K:
            raise LtriError(
                f"FAISS on the GPU returns at most {GPU_MAX_K} neighbours but this search needs {n_candidates}; "
                "retrieve fewer spans, use fewer index vectors per span, or choose the torch index backend."
            )
        host_queries = queries.detach().to("cpu", torch.float32).contiguous().numpy()  # (nheads_kv, n_queries, dim)
        scores, slots = self._candidates(host_queries, n_candidates)
        top_scores, top_ids = best_spans(scores, slots, self._slots.slot_span_ids, k)
        return top_scores.to(queries.device), top_ids.to(queries.device)

    def _candidates(self, host_queries: np.ndarray, n_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and span slots (nheads_kv, n_queries, n_candidates) of each head's best vectors."""
        results = [index.search(host_queries[head], n_candidates) for head, index in enumerate(self._maps)]
        scores = np.stack([head_scores for head_scores, _ in results])
        vector_ids = np.stack([head_ids for _, head_ids in results])
        missing = vector_ids < 0  # FAISS pads with id -1 when it has fewer vectors than asked
        scores[missing] = -np.inf
        slots = self._vector_slots[np.where(missing, 0, vector_ids)]
        return torch.from_numpy(scores), torch.from_numpy(slots)

    def _raw_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_vectors == 0:
            return torch.empty(self.nheads_kv, 0, self.dim), torch.empty(0, dtype=torch.long)
        vectors = np.stack([flat.reconstruct_n(0, self.n_vectors) for flat in self._flats])
        span_ids = self._slots.slot_span_ids[torch.from_numpy(self._vector_slots)]
        return torch.from_numpy(vectors), span_ids

    def _new_flat(self) -> faiss.Index:
        flat = faiss.IndexFlatIP(self.dim)
        if self.on_gpu:
            gpu_id = _gpu_id(self.device)
            flat = faiss.index_cpu_to_gpu(_shared_gpu_resources(gpu_id), gpu_id, flat)
        return flat
