"""Hard-distance Elastic loss, the paper's HE by its equation (docs/design.md, "The losses")."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import MetricLoss, check_nonneg, check_positive, top_k_size

NORMS = ("none", "elastic", "positives")


class HardDistanceElasticLoss(MetricLoss):
    """HE: L_q = min over t of [Σ_p max(d_p − t, 0) + Σ_n max(t − d_n, 0)].

    Evaluated in closed form: with the positives sorted far-to-near and the negatives near-to-far,
    L_q = Σ_{i ≤ min(|P|, |N|)} max(0, d⁺_(i) − d⁻_(i)), the i-th farthest positive against the i-th closest
    negative, summed while they violate. The violating pairs are the anchor's *elastic count* c: at the
    minimiser t* (the hard distance) c positives lie beyond t* and c negatives before it. Only the k
    farthest positives and k closest negatives can pair (k = the largest positive count, or a bound), so
    two top-k of size k over M are taken, never a sort over M. The subgradient is +1 on every hard
    positive and −1 on every hard negative; with one positive this is the hinge triplet loss, margin 0.

    Defaults are the authors' released config (``SCALE: 1.0``, no margin). Our extensions, off by default:
    ``margin`` m inside each pair, max(0, d⁺_(i) − d⁻_(i) + m) (t shifted by m/2 on each side);
    ``scale`` multiplies the loss; ``norm`` divides the sum by the elastic count (``"elastic"``: the mean
    violation, 0 without one) or by the anchor's positive count (``"positives"``). ``stats`` report
    hard_pos = hard_neg = the mean elastic count per valid anchor.
    """

    def __init__(self, margin: float = 0.0, scale: float = 1.0, norm: str = "none") -> None:
        super().__init__()
        self.margin = check_nonneg("he margin", margin)
        self.scale = check_positive("he scale", scale)
        if norm not in NORMS:
            raise ValueError(f"he norm must be one of {', '.join(NORMS)}; got {norm!r}")
        self.norm = norm

    def compute(self, dist: Tensor, pos: Tensor, neg: Tensor, max_pos: int | None = None):
        inf = float("inf")
        n_pos = pos.sum(1)
        # Top-k needs its size: the caller's bound (P x K batches: <= K), else read from the device.
        k = top_k_size(n_pos, max_pos, dist.shape[1])
        if k == 0:
            zero = dist.sum(1) * 0  # keeps the graph, gradient 0
            none = torch.zeros_like(zero)
            return zero, none, none, torch.zeros(dist.shape[0], dtype=torch.bool, device=dist.device)
        with torch.no_grad():
            far_p = torch.where(pos, dist, -inf).topk(k, dim=1, largest=True, sorted=True)
            near_n = torch.where(neg, dist, inf).topk(k, dim=1, largest=False, sorted=True)
            # Pair i exists while both sets still hold an i-th member (i < min(|P|, |N|)).
            paired = (far_p.values > -inf) & (near_n.values < inf)  # [B, k]
            valid = paired[:, 0]
        # One gather of the k + k chosen entries keeps the backward to one sparse scatter into [B, M].
        chosen = dist.gather(1, torch.cat([far_p.indices, near_n.indices], dim=1))
        diff = chosen[:, :k] - chosen[:, k:]
        if self.margin:
            diff = diff + self.margin
        hinge = torch.relu(diff) * paired
        with torch.no_grad():
            elastic = ((diff > 0) & paired).sum(1).to(dist.dtype)
        loss = hinge.sum(1)
        if self.norm == "elastic":
            loss = loss / elastic.clamp_min(1)
        elif self.norm == "positives":
            loss = loss / n_pos.clamp_min(1).to(dist.dtype)
        if self.scale != 1.0:
            loss = loss * self.scale
        return loss, elastic, elastic, valid

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}, norm={self.norm!r}"
