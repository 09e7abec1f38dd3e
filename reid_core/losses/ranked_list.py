"""Ranked List loss (Wang et al., CVPR 2019; supplementary B; docs/design.md, "The losses")."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import MetricLoss, as_float, check_nonneg, check_positive, has_any, row_dot

_BIG = 1e30  # added to distances outside the hard-negative set before taking the row minimum


class RankedListLoss(MetricLoss):
    """Hard positives d > α − β, hard negatives d < α.

    L_P = mean over hard positives of (d − (α − β)); L_N = Σ w·(α − d) / Σ w over hard negatives with
    w = exp(T_n·(α − d)); loss = (1 − λ)·L_P + λ·L_N (λ = ``imbalance``). An empty hard set gives 0 for its
    term. The weights w are constants for the gradient, as in Wang et al.'s derivation, so once the hard
    sets are known the loss is linear in the distances and is evaluated as one weighted row sum.
    """

    def __init__(self, alpha: float = 1.2, beta: float = 0.4, tn: float = 10.0, imbalance: float = 0.5) -> None:
        super().__init__()
        self.alpha = check_positive("ranked_list alpha", alpha)
        self.beta = check_positive("ranked_list beta", beta)
        if self.beta >= self.alpha:
            raise ValueError(f"ranked_list beta ({beta}) must be smaller than alpha ({alpha})")
        self.tn = check_nonneg("ranked_list tn", tn)
        self.imbalance = check_nonneg("ranked_list imbalance", imbalance)
        if self.imbalance > 1:
            raise ValueError(f"ranked_list imbalance must be in [0, 1]; got {imbalance!r}")

    def compute(self, dist: Tensor, pos: Tensor, neg: Tensor, max_pos: int | None = None):
        lam, pos_edge = self.imbalance, self.alpha - self.beta
        with torch.no_grad():
            valid = has_any(pos) & has_any(neg)
            hard_p = dist > pos_edge
            hard_p &= pos
            hard_n = dist < self.alpha
            hard_n &= neg
            in_p, in_n = as_float(hard_p, dist.dtype), as_float(hard_n, dist.dtype)
            n_pos, n_neg = in_p.sum(1), in_n.sum(1)
            if self.tn > 0:
                # w ∝ exp(T_n·(d_min − d)), d_min the row's smallest hard-negative distance: exponents
                # are <= 0 on the set (clamped to 0 elsewhere, then masked), so nothing overflows.
                work = as_float(~hard_n, dist.dtype)
                d_min = torch.add(dist, work, alpha=_BIG, out=work).amin(1, keepdim=True)
                weight = torch.add(d_min * self.tn, dist, alpha=-self.tn, out=work)
                weight.clamp_max_(0.0).exp_().mul_(in_n)
            else:
                weight = in_n
            w_sum = weight.sum(1)
            scale_n = torch.where(valid & (n_neg > 0), lam / w_sum, 0.0).unsqueeze(1)
            scale_p = torch.where(valid & (n_pos > 0), (1 - lam) / n_pos.clamp_min(1), 0.0).unsqueeze(1)
            # loss = Σ coef·d + const: coef = (1−λ)/|P| on hard positives, −λ·w/Σw on hard negatives.
            coef = in_p.mul_(scale_p).addcmul_(weight, scale_n, value=-1.0)
            has_n, has_p = (n_neg > 0).to(dist.dtype), (n_pos > 0).to(dist.dtype)
            const = torch.where(valid, lam * self.alpha * has_n - (1 - lam) * pos_edge * has_p, 0.0)
        loss = row_dot(dist, coef) + const
        return loss, n_pos, n_neg, valid

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, tn={self.tn}, imbalance={self.imbalance}"
