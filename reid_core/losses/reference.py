"""Straightforward per-anchor reference implementations of the metric losses.

One Python loop over anchors with boolean indexing, written from docs/design.md, "The losses" as literally as
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


def triplet(dist: Tensor, pos: Tensor, neg: Tensor, margin: float = 0.3, mining: str = "hard") -> Tensor:
    def one(d_p: Tensor, d_n: Tensor) -> Tensor:
        if mining == "hard":
            return _margin(d_p.max() - d_n.min(), margin)
        big_p = (torch.softmax(d_p, 0) * d_p).sum()  # softmax-weighted, gradient through the weights
        big_n = (torch.softmax(-d_n, 0) * d_n).sum()
        return _margin(big_p - big_n, margin)

    return _per_anchor(dist, pos, neg, one)


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


def he(dist: Tensor, pos: Tensor, neg: Tensor, margin: float = 0.0, scale: float = 1.0, norm: str = "none") -> Tensor:
    """The equation itself: min over t of Σ_p max(d_p + m/2 − t, 0) + Σ_n max(t − d_n + m/2, 0).

    The function of t is convex and piecewise linear with breakpoints d_p + m/2 and d_n − m/2, so its
    minimum is taken over every breakpoint (brute force, no closed form). ``norm``'s elastic count is the
    number of violating pairs of the sorted sets, counted here the straightforward way.
    """
    half = margin / 2

    def one(d_p: Tensor, d_n: Tensor) -> Tensor:
        t = torch.cat([d_p + half, d_n - half])
        per_t = (F.relu(d_p[None, :] + half - t[:, None]).sum(1) + F.relu(t[:, None] - d_n[None, :] + half).sum(1))
        value = per_t.min()
        if norm == "elastic":
            pairs = min(len(d_p), len(d_n))
            far = torch.sort(d_p, descending=True).values[:pairs]
            near = torch.sort(d_n).values[:pairs]
            value = value / max(int((far - near + margin > 0).sum()), 1)
        elif norm == "positives":
            value = value / len(d_p)
        return scale * value

    return _per_anchor(dist, pos, neg, one)


def he_sorted(dist: Tensor, pos: Tensor, neg: Tensor, margin: float = 0.0, scale: float = 1.0,
              norm: str = "none") -> Tensor:
    """HE's closed form the straightforward way: sort both sets in full, pair them, sum the violations.

    The brute force :func:`he` holds a |P ∪ N|² matrix per anchor, too large at M = 65,536; the benchmark
    compares against this one instead.
    """
    def one(d_p: Tensor, d_n: Tensor) -> Tensor:
        pairs = min(len(d_p), len(d_n))
        far = torch.sort(d_p, descending=True).values[:pairs]
        near = torch.sort(d_n).values[:pairs]
        violation = F.relu(far - near + margin)
        value = violation.sum()
        if norm == "elastic":
            value = value / max(int((far - near + margin > 0).sum()), 1)
        elif norm == "positives":
            value = value / len(d_p)
        return scale * value

    return _per_anchor(dist, pos, neg, one)


REFERENCES = {"triplet": triplet, "npair": npair, "ranked_list": ranked_list, "he": he}
# What the benchmark times the vectorized losses against (the brute force is quadratic per anchor).
BENCH_REFERENCES = {**REFERENCES, "he": he_sorted}
