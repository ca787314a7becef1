"""Span segmentation of many blocks at once: the blocks of all layers of one prefill chunk.

``ltri.spans.segment`` on one (n, n) block is launch-bound on a GPU (hundreds of small kernels and
several host syncs, mostly greedy NMS and the theta bisection). ``segment_many`` runs the same steps
(``ltri.spans.segment_blocks``) with a leading block dimension, so that each kernel does the work of
every block: thresholds, prefix-sum tables, the dense candidate grid (no sync to find the positive
candidates) and each NMS round for all blocks together; then one transfer brings every block's kept
spans to the host, where token claiming and gap filling run for all blocks together.

On the CPU there are no launches to save, and the batched pass is the slower one (benchmarks/speed/
segmentation.py, 32 planted 512-token blocks, one thread: 0.60-0.63 s against 0.42-0.43 s for the loop):
its (n_blocks, n, n) float64 tables no longer stay in the cache, and every NMS round goes through the
dense grid of every block (up to the most rounds any block needs; many when nms_iou > 0). So by
default the CPU segments one block after the other.
Vocabulary: n_blocks blocks of n tokens each.
"""

from __future__ import annotations

from torch import Tensor

from ltri.spans import Segmentation, segment, segment_blocks


def segment_many(
    attention: Tensor,
    theta: float | Tensor | None = None,
    min_len: int = 8,
    max_len: int = 128,
    nms_iou: float = 0.0,
    batched: bool | None = None,
) -> list[Segmentation]:
    """``[segment(a, theta, min_len, max_len, nms_iou) for a in attention]``, batched on an accelerator.

    attention: (n_blocks, n, n) causal attention blocks of one size, on any device; theta: a float,
    None (default_theta per block, window max_len) or a (n_blocks, n) per-row tensor. Returns one
    Segmentation per block, on the attention's device, the same as segment's (same spans, same scores).
    batched: one pass for all blocks (True) or one block after the other (False); None: batched on
    any device but the CPU (see the module docstring). A batched pass syncs with the device once for
    the kept spans and once for the gains of gaps shorter than min_len (when any block has one), whatever
    n_blocks; with nms_iou > 0 also once per ``ltri.spans.NMS_ROUNDS_PER_CHECK`` NMS rounds.
    """
    if attention.dim() != 3:
        raise ValueError(f"attention must be (n_blocks, n, n), got {tuple(attention.shape)}")
    if batched is None:
        batched = attention.device.type != "cpu"
    if batched:
        return segment_blocks(attention, theta, min_len, max_len, nms_iou, dense=True)
    thetas = theta if isinstance(theta, Tensor) else [theta] * attention.shape[0]
    return [
        segment(block, row_theta, min_len, max_len, nms_iou) for block, row_theta in zip(attention, thetas, strict=True)
    ]
