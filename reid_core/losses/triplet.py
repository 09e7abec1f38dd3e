"""Batch-hard triplet loss (DESIGN section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MetricLoss, check_nonneg


def margin_loss(diff: Tensor, margin: float) -> Tensor:
    """``max(0, diff + margin)``, or ``softplus(diff)`` (soft margin) when ``margin == 0``."""
    return F.softplus(diff) if margin == 0 else F.relu(diff + margin)


class TripletLoss(MetricLoss):
    """d⁺ = max over positives, d⁻ = min over negatives; loss = max(0, d⁺ − d⁻ + margin).

    ``margin = 0`` selects the soft margin softplus(d⁺ − d⁻). One hard positive and one hard negative per
    anchor (``stats`` reports 1 and 1).
    """

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = check_nonneg("triplet margin", margin)

    def compute(self, dist: Tensor, pos: Tensor, neg: Tensor):
        with torch.no_grad():
            d_pos, i_pos = torch.where(pos, dist, -float("inf")).max(dim=1)
            d_neg, i_neg = torch.where(neg, dist, float("inf")).min(dim=1)
            valid = (d_pos > -float("inf")) & (d_neg < float("inf"))
        # Gathering the two chosen entries keeps the backward to one sparse scatter into [B, M].
        pair = dist.gather(1, torch.stack([i_pos, i_neg], dim=1))
        loss = torch.where(valid, margin_loss(pair[:, 0] - pair[:, 1], self.margin), 0.0)
        ones = valid.to(dist.dtype)
        return loss, ones, ones, valid

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
