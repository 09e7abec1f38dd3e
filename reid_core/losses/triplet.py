"""Triplet loss: batch-hard mining, or FastReID's softmax-weighted mining (DESIGN sections 3 and 11)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MetricLoss, as_float, check_nonneg, masked_max, masked_min, row_dot

MININGS = ("hard", "weighted")


def margin_loss(diff: Tensor, margin: float) -> Tensor:
    """``max(0, diff + margin)``, or ``softplus(diff)`` (soft margin) when ``margin == 0``."""
    return F.softplus(diff) if margin == 0 else F.relu(diff + margin)


class TripletLoss(MetricLoss):
    """loss = max(0, d⁺ − d⁻ + margin), or softplus(d⁺ − d⁻) when ``margin = 0`` (soft margin).

    ``mining="hard"``: d⁺ = max over positives, d⁻ = min over negatives (batch-hard; ``stats`` report one
    positive and one negative). ``mining="weighted"`` (the weighted example mining of FastReID, used by
    the authors' VeRi-Wild recipe): d⁺ = Σ_p w_p·d_p with w = softmax(d) over the positives and
    d⁻ = Σ_n w_n·d_n with w = softmax(−d) over the negatives (temperature 1); the gradient flows through
    the weights too; ``stats`` report every positive and negative as used.
    """

    def __init__(self, margin: float = 0.3, mining: str = "hard") -> None:
        super().__init__()
        self.margin = check_nonneg("triplet margin", margin)
        if mining not in MININGS:
            raise ValueError(f"triplet mining must be one of {', '.join(MININGS)}; got {mining!r}")
        self.mining = mining

    def compute(self, dist: Tensor, pos: Tensor, neg: Tensor):
        if self.mining == "weighted":
            return self._weighted(dist, pos, neg)
        with torch.no_grad():
            d_pos, i_pos = torch.where(pos, dist, -float("inf")).max(dim=1)
            d_neg, i_neg = torch.where(neg, dist, float("inf")).min(dim=1)
            valid = (d_pos > -float("inf")) & (d_neg < float("inf"))
        # Gathering the two chosen entries keeps the backward to one sparse scatter into [B, M].
        pair = dist.gather(1, torch.stack([i_pos, i_neg], dim=1))
        loss = torch.where(valid, margin_loss(pair[:, 0] - pair[:, 1], self.margin), 0.0)
        ones = valid.to(dist.dtype)
        return loss, ones, ones, valid

    def _weighted(self, dist: Tensor, pos: Tensor, neg: Tensor):
        """D = Σ_j w_j d_j with w = softmax(s·d) over a set (s = +1 positives, −1 negatives) has
        dD/dd_j = w_j·(1 + s·(d_j − D)): the difference D⁺ − D⁻ is one weighted row sum."""
        with torch.no_grad():
            _, d_far = masked_max(dist, pos)
            _, d_near = masked_min(dist, neg)
            valid = (d_far > -float("inf")) & (d_near < float("inf"))
            zero = torch.zeros_like(d_far)
            # Exponents shifted by the set's extreme are <= 0 on the set (clamped elsewhere, then masked),
            # and the extreme itself weighs exp(0) = 1, so a non-empty set sums to >= 1.
            shift_p = torch.where(valid, d_far, zero).unsqueeze(1)
            shift_n = torch.where(valid, d_near, zero).unsqueeze(1)
            w_p = (dist - shift_p).clamp_max_(0).exp_().mul_(as_float(pos, dist.dtype))
            w_n = (shift_n - dist).clamp_max_(0).exp_().mul_(as_float(neg, dist.dtype))
            n_pos, n_neg = pos.sum(1).to(dist.dtype), neg.sum(1).to(dist.dtype)
            w_p.div_(w_p.sum(1, keepdim=True).clamp_min(1.0))
            w_n.div_(w_n.sum(1, keepdim=True).clamp_min(1.0))
            big_p = torch.linalg.vecdot(w_p, dist, dim=1).unsqueeze(1)
            big_n = torch.linalg.vecdot(w_n, dist, dim=1).unsqueeze(1)
            grad_coef = w_p * (1 + (dist - big_p)) - w_n * (1 - (dist - big_n))
            coef = w_p.sub_(w_n)
        loss = torch.where(valid, margin_loss(row_dot(dist, coef, grad_coef), self.margin), 0.0)
        return loss, n_pos, n_neg, valid

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}"
