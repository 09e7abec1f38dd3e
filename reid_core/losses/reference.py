"""Straightforward per-anchor reference implementations of the metric losses.

One Python loop over anchors with boolean indexing, written from DESIGN section 3 as literally as
possible. They are slow on purpose: the tests check the vectorized losses against them and the benchmark
measures the vectorized losses against them. Same signature as the losses: ``(dist, pos, neg) -> [B]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _margin(diff: Tensor, margin: float) -> Tensor:
    return F.softplus(diff) if margin == 0 else F.relu(diff + margin)


def _per_anchor(dist: Tensor, pos: Tensor, neg: Tensor, one) -> Tensor:
    out = []
    for i in range(dist.shape[0]):
        d_p, d_n = dist[i][pos[i]], dist[i][neg[i]]
        out.append(one(d_p, d_n) if len(d_p) and len(d_n) else dist[i].sum() * 0)
    return torch.stack(out)


def triplet(dist: Tensor, pos: Tensor, neg: Tensor, margin: float = 0.3) -> Tensor:
    return _per_anchor(dist, pos, neg, lambda d_p, d_n: _margin(d_p.max() - d_n.min(), margin))


def npair(dist: Tensor, pos: Tensor, neg: Tensor, k: int = 15) -> Tensor:
    def one(d_p: Tensor, d_n: Tensor) -> Tensor:
        hardest = torch.topk(d_n, min(k, len(d_n)), largest=False).values
        return torch.log(1 + torch.exp(d_p.max() - hardest).sum())

    return _per_anchor(dist, pos, neg, one)


def ranked_list(dist: Tensor, pos: Tensor, neg: Tensor, alpha: float = 1.2, beta: float = 0.4,
                tn: float = 10.0, imbalance: float = 0.5) -> Tensor:
    def one(d_p: Tensor, d_n: Tensor) -> Tensor:
        hp, hn = d_p[d_p > alpha - beta], d_n[d_n < alpha]
        l_p = (hp - (alpha - beta)).mean() if len(hp) else d_p.sum() * 0
        if len(hn):
            w = torch.exp(tn * (alpha - hn)).detach()
            l_n = (w * (alpha - hn)).sum() / w.sum()
        else:
            l_n = d_n.sum() * 0
        return (1 - imbalance) * l_p + imbalance * l_n

    return _per_anchor(dist, pos, neg, one)


def he(dist: Tensor, pos: Tensor, neg: Tensor, margin: float = 0.3, slack: float = 0.1, weighting: str = "mean",
       tau: float = 0.1, max_pos: int = 0, max_neg: int = 0) -> Tensor:
    def one(d_p: Tensor, d_n: Tensor) -> Tensor:
        p_star, n_star = d_p.argmax(), d_n.argmin()
        in_p = d_p >= d_n[n_star] - slack
        in_p[p_star] = True
        in_n = d_n <= d_p[p_star] + slack
        in_n[n_star] = True
        hp = torch.sort(d_p[in_p], descending=True).values
        hn = torch.sort(d_n[in_n]).values
        if max_pos:
            hp = hp[:max_pos]
        if max_neg:
            hn = hn[:max_neg]
        if weighting == "mean":
            big_p, big_n = hp.mean(), hn.mean()
        else:
            big_p = (torch.softmax(hp / tau, 0) * hp).sum()
            big_n = (torch.softmax(-hn / tau, 0) * hn).sum()
        return _margin(big_p - big_n, margin)

    return _per_anchor(dist, pos, neg, one)


REFERENCES = {"triplet": triplet, "npair": npair, "ranked_list": ranked_list, "he": he}
