"""Straightforward per-query NumPy evaluation, as the re-ID toolboxes compute it (docs/design.md, "Evaluation protocol").

It is the yardstick that :func:`reid_core.evaluation.evaluate_rank` must agree with (to 1e-6), and the
baseline of the evaluation benchmark. One loop iteration per query:

1. order the gallery by distance with a stable sort (ties keep gallery order);
2. drop gallery entries with the query's identity AND camera (same-camera shots are not re-ID);
3. skip the query if no true match is left;
4. AP = mean over true matches of the precision at the match's rank; CMC@k = [first match rank <= k];
   INP = number of true matches / rank of the last true match (ranks 1-based).
"""
from __future__ import annotations

import numpy as np


def evaluate_rank_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> dict:
    """``distmat`` float[Q, G]; pids and camids int arrays of length Q (query) and G (gallery).

    Returns ``{"mAP": float, "cmc": float64[max_rank], "mINP": float, "num_valid": int}`` (fractions in
    [0, 1]); ``cmc[k - 1]`` is CMC@k. Raises ValueError if no query has a true match.
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        hits = (g_pids[order] == q_pids[q])[keep]  # true matches along the kept ranking
        if not hits.any():
            continue
        found = hits.cumsum()  # true matches within the top r, r = 1..len
        cmc = np.minimum(found, 1)[:max_rank].astype(np.float64)
        if cmc.size < max_rank:  # fewer kept gallery entries than max_rank: CMC stays at its last value
            cmc = np.concatenate([cmc, np.full(max_rank - cmc.size, cmc[-1])])
        all_cmc.append(cmc)
        ranks = np.arange(1, hits.size + 1)
        all_ap.append(float((found / ranks)[hits].mean()))
        last = np.flatnonzero(hits)[-1]
        all_inp.append(found[last] / (last + 1.0))
    if not all_cmc:
        raise ValueError("no query has a true match in the gallery (after removing same-identity, "
                         "same-camera entries)")
    return {"mAP": float(np.mean(all_ap)), "cmc": np.mean(all_cmc, axis=0), "mINP": float(np.mean(all_inp)),
            "num_valid": len(all_cmc)}
