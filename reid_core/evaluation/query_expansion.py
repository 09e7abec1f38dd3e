"""Alpha-weighted average query expansion (as FastReID offers it), one round, memory-bounded.

Every feature, query and gallery alike, is replaced by the mean over its ``k`` most cosine-similar
features among queries and gallery together (itself included; ties: lower index first) of
``feature * max(similarity, 0) ** alpha``. Similarities below 0 count as 0 (a negative similarity to
a fractional power has no real value). Rows are done a chunk at a time: never the full N x N.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reid_core.evaluation.tensors import ROWS_PAIRS, smallest_k


def average_query_expansion(q_feats: Tensor, g_feats: Tensor, k: int = 10, alpha: float = 3.0,
                            memory_budget_mb: float = 1024) -> tuple[Tensor, Tensor]:
    """float[Q, D], float[G, D] (same device and dtype) -> the expanded (float[Q, D], float[G, D])."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"query expansion k must be a positive integer, got {k!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"query expansion alpha must be a non-negative number, got {alpha!r}")
    feats = torch.cat([q_feats, g_feats])
    unit = F.normalize(feats, dim=1)
    n = feats.shape[0]
    k = min(k, n)
    rows = max(1, min(int(memory_budget_mb * 2**20) // (n * 16), max(1, ROWS_PAIRS // n)))
    out = torch.empty_like(feats)
    with torch.no_grad():
        for first in range(0, n, rows):
            neg_sim = torch.mm(unit[first:first + rows], unit.t()).neg_()
            nearest = smallest_k(neg_sim, k)
            weight = neg_sim.gather(1, nearest).neg_().clamp_min_(0.0).pow_(alpha)
            out[first:first + rows] = torch.bmm(weight[:, None, :], feats[nearest]).squeeze(1).div_(k)
    return out[:q_feats.shape[0]], out[q_feats.shape[0]:]
