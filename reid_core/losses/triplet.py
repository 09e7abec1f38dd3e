"""Triplet loss: batch-hard mining, or FastReID's softmax-weighted mining (docs/design.md, "The losses" and "The authors' regime")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import MetricLoss, check_nonneg, masked_min, top_k_size

MININGS = ("hard", "weighted")


def margin_loss(diff: Tensor, margin: float) -> Tensor:
    """``max(0, diff + margin)``, or ``softplus(diff)`` (soft margin) when ``margin == 0``."""
    return F.softplus(diff) if margin == 0 else F.relu(diff + margin)


class _NearWeightedMean(torch.autograd.Function):
    """D[i] = Σ_j w_ij·d_ij over the mask, w = softmax(−d) on the mask; dD/dd_j = w_j·(1 − (d_j − D)).

    ``shift [B, 1]`` is the row's smallest masked distance, so exponents are <= 0 (no overflow) and a
    non-empty row's weights sum to >= 1. An empty row gives D = 0 and no gradient.
    """

    @staticmethod
    def forward(ctx, dist: Tensor, mask: Tensor, shift: Tensor) -> Tensor:  # type: ignore[override]
        e = torch.sub(shift, dist).clamp_max_(0).exp_().masked_fill_(~mask, 0.0)
        total = e.sum(1).clamp_min_(1e-30)
        mean = torch.linalg.vecdot(e, dist, dim=1).div_(total)
        ctx.save_for_backward(dist, e, mean, total)
        return mean

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        dist, e, mean, total = ctx.saved_tensors
        # w·(1 − (d − D))·g = e·((1 + D) − d)·(g / Z)
        coef = torch.sub((1 + mean).unsqueeze(1), dist).mul_(e).mul_((grad / total).unsqueeze(1))
        return coef, None, None


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

    @property
    def anchor_is_positive(self) -> bool:  # type: ignore[override]
        """FastReID's masks count the anchor itself as a positive (distance 0); its weighted mining gives
        it weight, so the weighted mining here does the same. Hard mining takes the farthest positive,
        which the anchor never is once K >= 2, so it keeps the anchor out."""
        return self.mining == "weighted"

    def compute(self, dist: Tensor, pos: Tensor, neg: Tensor, max_pos: int | None = None):
        if self.mining == "weighted":
            return self._weighted(dist, pos, neg, max_pos)
        with torch.no_grad():
            d_pos, i_pos = torch.where(pos, dist, -float("inf")).max(dim=1)
            d_neg, i_neg = torch.where(neg, dist, float("inf")).min(dim=1)
            valid = (d_pos > -float("inf")) & (d_neg < float("inf"))
        # Gathering the two chosen entries keeps the backward to one sparse scatter into [B, M].
        pair = dist.gather(1, torch.stack([i_pos, i_neg], dim=1))
        loss = torch.where(valid, margin_loss(pair[:, 0] - pair[:, 1], self.margin), 0.0)
        ones = valid.to(dist.dtype)
        return loss, ones, ones, valid

    def _weighted(self, dist: Tensor, pos: Tensor, neg: Tensor, max_pos: int | None):
        """Positives are few (<= K per anchor): their weighted mean is taken over the top-k of size max|P|
        (or the bound ``max_pos``) with plain autograd. Negatives fill the row: their weighted mean is one
        custom function with a single saved [B, M] buffer (see :class:`_NearWeightedMean`)."""
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        k = top_k_size(n_pos, max_pos, dist.shape[1])
        valid = (n_pos > 0) & (n_neg > 0)
        if k == 0:
            zero = dist.sum(1) * 0
            return zero, n_pos.to(dist.dtype), n_neg.to(dist.dtype), valid
        with torch.no_grad():
            far = torch.where(pos, dist, -float("inf")).topk(k, dim=1, sorted=False)
            present = far.values > -float("inf")
            _, d_near = masked_min(dist, neg)
            shift = torch.where(valid, d_near, 0.0).unsqueeze(1)
        d_p = dist.gather(1, far.indices)
        # Slots past an anchor's last positive get weight 0; a row without positives (loss masked to 0
        # below) gets finite uniform weights rather than NaN, which would leak into the gradient.
        logits = torch.where(present | ~present.any(1, keepdim=True), d_p, -float("inf"))
        w_p = torch.softmax(logits, dim=1)
        big_p = (w_p * d_p).sum(1)
        big_n = _NearWeightedMean.apply(dist, neg, shift)
        loss = torch.where(valid, margin_loss(big_p - big_n, self.margin), 0.0)
        return loss, n_pos.to(dist.dtype), n_neg.to(dist.dtype), valid

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}"
