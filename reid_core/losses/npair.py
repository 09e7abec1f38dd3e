"""N-pair loss, tripletwise variant (supplementary B; docs/design.md, "The losses")."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import MetricLoss, check_count


class NPairLoss(MetricLoss):
    """The hardest positive and the ``k`` hardest negatives, whatever their identity.

    loss = log(1 + Σ_{j≤k} exp(d⁺ − d⁻_j)). An anchor with fewer than ``k`` negatives uses those it has.
    """

    def __init__(self, k: int = 15) -> None:
        super().__init__()
        self.k = check_count("npair k", k, 1)

    def compute(self, dist: Tensor, pos: Tensor, neg: Tensor, max_pos: int | None = None):
        k = min(self.k, dist.shape[1])
        with torch.no_grad():
            d_pos, i_pos = torch.where(pos, dist, -float("inf")).max(dim=1)
            # topk of size k only; entries off the mask are +inf and come last.
            d_neg, i_neg = torch.where(neg, dist, float("inf")).topk(k, dim=1, largest=False, sorted=False)
            present = d_neg < float("inf")  # [B, k]: fewer than k negatives leaves +inf slots
            n_neg = present.sum(1, dtype=torch.int32)
            valid = (d_pos > -float("inf")) & (n_neg > 0)
        picked = dist.gather(1, torch.cat([i_pos.unsqueeze(1), i_neg], dim=1))  # [B, 1 + k]
        logits = (picked[:, :1] - picked[:, 1:]).masked_fill(~present, -float("inf"))
        # log(1 + Σ exp z) as a logsumexp with a leading 0; an all -inf row gives exactly 0, gradient 0.
        loss = torch.logsumexp(torch.cat([logits.new_zeros(logits.shape[0], 1), logits], dim=1), dim=1)
        loss = torch.where(valid, loss, 0.0)
        return loss, valid.to(dist.dtype), n_neg, valid

    def extra_repr(self) -> str:
        return f"k={self.k}"
