"""Evaluation of query against gallery features: ranking (:mod:`.rank`), optionally after average query
expansion (:mod:`.query_expansion`) and with k-reciprocal re-ranking (:mod:`.rerank`); this module sits above
the three (docs/design.md, Evaluation protocol)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reid_core.config import DISTANCES
from reid_core.evaluation import rank
from reid_core.evaluation.query_expansion import average_query_expansion
from reid_core.evaluation.rerank import FeatureSource, KReciprocal, check_rerank_args
from reid_core.evaluation.tensors import all_finite, as_tensor


def evaluate_features(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, metric: str = "euclidean",
                      max_rank: int = 50, chunk_size: int = 0, memory_budget_mb: int = 1024, *,
                      rerank: bool = False, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                      query_expansion: bool = False, qe_k: int = 10, qe_alpha: float = 3.0) -> dict:
    """:func:`evaluate_rank` of query features against gallery features, one chunk of queries at a time.

    ``q_feats`` float[Q, D], ``g_feats`` float[G, D] (NumPy or tensors; computed on ``g_feats``'s device).
    ``metric``: ``euclidean`` (||q - g||_2) or ``cosine`` (-q^T g of L2-normalised features), see
    :func:`~reid_core.evaluation.rank.query_gallery_distances`. ``chunk_size`` queries per chunk; 0 derives it from ``memory_budget_mb``,
    the working memory of the chunks in flight (distances, bucket ids, flags, histograms; see
    :func:`chunk_plan`); the features themselves come on top. The whole Q x G matrix is never held.

    ``query_expansion``: first replace the features by their alpha-weighted average query expansion
    (:func:`~reid_core.evaluation.query_expansion.average_query_expansion`, ``qe_k``, ``qe_alpha``).
    ``rerank``: rank by k-reciprocal re-ranked distances (``k1``, ``k2``, ``lambda_value``; see
    :mod:`reid_core.evaluation.rerank`) of the euclidean distances of the features (L2-normalised first
    under ``cosine``), built from chunked neighbour lists: O((Q + G) k1 k2) memory besides the chunks.
    """
    q = as_tensor(q_feats, "q_feats")
    g = as_tensor(g_feats, "g_feats")
    for name, x in (("q_feats", q), ("g_feats", g)):
        if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty 2-D [N, D] array, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must hold floating-point features, got {x.dtype}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature dims differ: q_feats has {q.shape[1]}, g_feats has {g.shape[1]}")
    if metric not in DISTANCES:
        raise ValueError(f"metric must be one of {', '.join(DISTANCES)}; got {metric!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size must be a non-negative integer, got {chunk_size!r}")
    if not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb!r}")
    rank._check_max_rank(max_rank)
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    q, g = q.to(g.device, dtype), g.to(dtype)
    for name, x in (("q_feats", q), ("g_feats", g)):
        if not all_finite(x):
            raise ValueError(f"{name} contains NaN or infinite values")
    with torch.no_grad():
        gp = rank._prepare(g, metric)
        if metric == "euclidean":  # |d|^2 <= 2 (|q|^2 + |g|^2): finite distances, no per-chunk check
            bound = 2 * (rank._prepare(q, metric)[1].max() + gp[1].max())
            if not bound < torch.finfo(dtype).max / 4:
                raise ValueError(f"features too large for {dtype} distances (squared norms up to {bound / 4:.3g})")
    labels = rank._Labels.build(q_pids, g_pids, q_camids, g_camids, q.shape[0], g.shape[0], g.device)
    if rerank or query_expansion:
        if rerank:
            check_rerank_args(k1, k2, lambda_value)
        with torch.no_grad():
            if query_expansion:
                q, g = average_query_expansion(q, g, qe_k, qe_alpha, memory_budget_mb)
                gp = rank._prepare(g, metric)
            if rerank:
                unit = (lambda x: F.normalize(x, dim=1)) if metric == "cosine" else (lambda x: x)
                ranker = KReciprocal(FeatureSource(unit(q), unit(g), memory_budget_mb), k1, k2, lambda_value,
                                     memory_budget_mb)

                def reranked(idx: Tensor, ws: rank.Workspace) -> Tensor:
                    return ranker.distances(idx, out=ws.take("dist", idx.numel()))

                return rank._evaluate_chunks(labels, g.shape[0], torch.float32, g.device, max_rank, chunk_size,
                                        memory_budget_mb, reranked, check_finite=False, block_rows=rank.GEMM_BLOCK_ROWS)

    def distances(idx: Tensor, ws: rank.Workspace) -> Tensor:
        return rank._distances(rank._prepare(q.index_select(0, idx), metric), gp, metric, out=ws.take("dist", idx.numel()))

    return rank._evaluate_chunks(labels, g.shape[0], dtype, g.device, max_rank, chunk_size, memory_budget_mb,
                            distances, check_finite=False, block_rows=rank.GEMM_BLOCK_ROWS)
