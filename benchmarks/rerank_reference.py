"""Dense k-reciprocal re-ranking (Zhong et al., CVPR 2017) as the re-ID toolboxes run it: the reference
that the tests check :func:`reid_core.evaluation.re_ranking` against and the benchmark times.

Written here from the algorithm, step by step, with the toolboxes' data layout: the whole
(Q + G) x (Q + G) distance matrix, its full argsort, a dense V, per-row Python loops. Ties in the
argsort are broken by index (a stable sort; the toolboxes' default quicksort leaves them unspecified).
"""
from __future__ import annotations

import numpy as np


def re_ranking_dense(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """float[Q, G], float[Q, Q], float[G, G] (distances) -> float32[Q, G], the re-ranked distances."""
    q_g, q_q, g_g = (np.asarray(x) for x in (q_g_dist, q_q_dist, g_g_dist))
    num_q = q_g.shape[0]
    squared = np.power(np.block([[q_q, q_g], [q_g.T, g_g]]), 2).astype(np.float32)
    # Each column scaled by its largest value, then transposed: row i holds column i.
    original = np.transpose(squared / np.max(squared, axis=0))
    del squared
    num_all = original.shape[0]
    rank = np.argsort(original, axis=1, kind="stable").astype(np.int32)

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, :k + 1]
        backward = rank[forward, :k + 1]
        return forward[np.any(backward == i, axis=1)]

    half = int(np.around(k1 / 2.0))
    weights = np.zeros_like(original, dtype=np.float32)
    for i in range(num_all):
        core = reciprocal(i, k1)
        members = [core]
        for candidate in core:
            around = reciprocal(int(candidate), half)
            if len(np.intersect1d(around, core)) > 2.0 / 3.0 * len(around):
                members.append(around)
        expanded = np.unique(np.concatenate(members))
        w = np.exp(-original[i, expanded])
        weights[i, expanded] = w / np.sum(w)

    if k2 != 1:  # local query expansion: mean of the rows of the k2 nearest
        expanded_weights = np.zeros_like(weights)
        for i in range(num_all):
            expanded_weights[i] = np.mean(weights[rank[i, :k2]], axis=0)
        weights = expanded_weights

    rows_of_column = [np.nonzero(weights[:, c])[0] for c in range(num_all)]
    jaccard = np.zeros((num_q, num_all), dtype=np.float32)
    for i in range(num_q):
        shared = np.zeros(num_all, dtype=np.float32)
        for c in np.nonzero(weights[i])[0]:
            rows = rows_of_column[c]
            shared[rows] += np.minimum(weights[i, c], weights[rows, c])
        jaccard[i] = 1.0 - shared / (2.0 - shared)

    final = jaccard * (1.0 - lambda_value) + original[:num_q] * lambda_value
    return final[:, num_q:]
