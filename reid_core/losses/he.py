"""Hard-distance Elastic loss (the paper's contribution; DESIGN section 3 is our definition)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import MetricLoss, as_float, check_count, check_nonneg, check_positive, masked_max, masked_min, row_dot
from .triplet import margin_loss

WEIGHTINGS = ("mean", "softmax")


def _keep_hardest(hard: Tensor, filled: Tensor, cap: int, largest: bool) -> Tensor:
    """``hard`` restricted to the ``cap`` hardest entries of ``filled`` per row (topk of size cap only)."""
    index = filled.topk(min(cap, filled.shape[1]), dim=1, largest=largest, sorted=False).indices
    return hard & torch.zeros_like(hard).scatter_(1, index, True)


class HardDistanceElasticLoss(MetricLoss):
    """HE: several hard samples per set, how many adapting to the anchor.

    With p* the hardest positive and n* the hardest negative:
    P_h = {p : d_p ≥ d_n* − δ} ∪ {p*}, N_h = {n : d_n ≤ d_p* + δ} ∪ {n*} (δ = ``slack``).
    D⁺ and D⁻ are the means over P_h and N_h (``weighting="mean"``) or the softmax(±d/τ)-weighted means
    (``"softmax"``, harder samples weigh more; the gradient flows through the weights too).
    ``max_pos`` / ``max_neg`` (0 = no cap) keep only the hardest ones. loss = max(0, D⁺ − D⁻ + margin), or
    softplus(D⁺ − D⁻) when margin = 0. With |P_h| = |N_h| = 1 this is the batch-hard triplet loss.

    The sets are thresholds against d_n* and d_p*, so nothing over M is sorted. Samples tied exactly with
    p* (or n*) join the set with it; the loss value is unchanged by such ties.
    """

    def __init__(self, margin: float = 0.3, slack: float = 0.1, weighting: str = "mean", tau: float = 0.1,
                 max_pos: int = 0, max_neg: int = 0) -> None:
        super().__init__()
        self.margin = check_nonneg("he margin", margin)
        self.slack = check_nonneg("he slack", slack)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"he weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        self.weighting = weighting
        self.tau = check_positive("he tau", tau)
        self.max_pos = check_count("he max_pos", max_pos, 0)
        self.max_neg = check_count("he max_neg", max_neg, 0)

    def compute(self, dist: Tensor, pos: Tensor, neg: Tensor):
        inf = float("inf")
        with torch.no_grad():
            filled_p, d_p = masked_max(dist, pos)
            filled_n, d_n = masked_min(dist, neg)
            valid = (d_p > -inf) & (d_n < inf)
            # Invalid rows get thresholds that select nothing, so their coefficients are all 0.
            thr_p = torch.where(valid, torch.minimum(d_n - self.slack, d_p), inf).unsqueeze(1)
            thr_n = torch.where(valid, torch.maximum(d_p + self.slack, d_n), -inf).unsqueeze(1)
            hard_p = filled_p >= thr_p
            hard_n = filled_n <= thr_n
            if self.max_pos:
                hard_p = _keep_hardest(hard_p, filled_p, self.max_pos, largest=True)
            if self.max_neg:
                hard_n = _keep_hardest(hard_n, filled_n, self.max_neg, largest=False)
            # The filled buffers are no longer needed: they receive the 0/1 set indicators.
            in_p, in_n = as_float(hard_p, out=filled_p), as_float(hard_n, out=filled_n)
            n_pos, n_neg = in_p.sum(1), in_n.sum(1)
            if self.weighting == "mean":
                # coef = 1/|P_h| on P_h, -1/|N_h| on N_h (the masks are disjoint): D⁺ − D⁻ = Σ coef·d.
                coef = in_p.mul_((1.0 / n_pos.clamp_min(1)).unsqueeze(1))
                coef.addcmul_(in_n, (1.0 / n_neg.clamp_min(1)).unsqueeze(1), value=-1.0)
                grad_coef = None
            else:
                coef, grad_coef = self._softmax_coefficients(dist, d_p, d_n, valid, in_p, in_n)
        loss = torch.where(valid, margin_loss(row_dot(dist, coef, grad_coef), self.margin), 0.0)
        return loss, n_pos, n_neg, valid

    def _softmax_coefficients(self, dist: Tensor, d_p: Tensor, d_n: Tensor, valid: Tensor, in_p: Tensor,
                              in_n: Tensor) -> tuple[Tensor, Tensor]:
        """Weights w⁺ = softmax(d/τ) over P_h, w⁻ = softmax(−d/τ) over N_h, and their gradient coefficients.

        D = Σ w_j d_j with w = softmax(s·d/τ) has dD/dd_j = w_j·(1 + s·(d_j − D)/τ).
        """
        tau = self.tau
        zero = torch.zeros_like(d_p)
        # Exponents shifted by the hardest distance are <= 0 on the set (clamped elsewhere, then masked),
        # and each valid set holds its hardest sample with weight exp(0) = 1, so its sum is >= 1.
        shift_p = torch.where(valid, d_p, zero).unsqueeze(1)
        shift_n = torch.where(valid, d_n, zero).unsqueeze(1)
        e_p = ((dist - shift_p) / tau).clamp_max_(0).exp_().mul_(in_p)
        e_n = ((shift_n - dist) / tau).clamp_max_(0).exp_().mul_(in_n)
        w_p = e_p / e_p.sum(1, keepdim=True).clamp_min(1.0)
        w_n = e_n / e_n.sum(1, keepdim=True).clamp_min(1.0)
        big_d_p = (w_p * dist).sum(1, keepdim=True)
        big_d_n = (w_n * dist).sum(1, keepdim=True)
        coef = w_p - w_n
        grad_coef = w_p * (1 + (dist - big_d_p) / tau) - w_n * (1 - (dist - big_d_n) / tau)
        return coef, grad_coef

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, slack={self.slack}, weighting={self.weighting!r}, tau={self.tau}, "
                f"max_pos={self.max_pos}, max_neg={self.max_neg}")
