"""The metric-loss interface and the masked reductions every loss shares.

A metric loss maps ``dist [B, M]`` (anchor-to-reference distances), ``pos [B, M]`` and ``neg [B, M]``
(boolean masks, disjoint) to a per-anchor loss ``[B]``. An anchor with no positive or no negative gives 0
and is counted as invalid. Everything is vectorized over B and M: masked maxima and minima use
``torch.where`` against ±inf, hard-set coefficients are 0/1 float arithmetic, and no [B, M] boolean
indexing (no data-dependent shape) happens. Selections are made without gradient; the gradient flows
only through a gather of the chosen entries or one weighted row sum (:func:`row_dot`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

_INF = float("inf")


class MetricLoss(nn.Module):
    """Base class: subclasses implement :meth:`compute`.

    After each call, :attr:`stats` holds Python floats ``hard_pos`` and ``hard_neg`` (mean number of hard
    positives / negatives used per valid anchor) and ``valid`` (anchors with at least one positive and one
    negative). They are kept as device tensors and converted on first read, so a step that never reads
    them never synchronizes with the device.
    """

    def __init__(self) -> None:
        super().__init__()
        self._raw: Tensor | None = None  # [3]: hard_pos, hard_neg, valid (device tensor)
        self._stats: dict[str, float] | None = None

    # Whether the framework should count each anchor itself as one of its positives (at distance 0).
    anchor_is_positive = False

    def compute(self, dist: Tensor, pos: Tensor, neg: Tensor,
                max_pos: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(loss [B], n_pos [B], n_neg [B], valid bool[B])``; ``loss`` is 0 where not valid."""
        raise NotImplementedError

    def forward(self, dist: Tensor, pos: Tensor, neg: Tensor, max_pos: int | None = None) -> Tensor:
        """Per-anchor loss ``[B]`` for ``dist [B, M]`` with masks ``pos``, ``neg`` (bool ``[B, M]``).

        ``max_pos``: an upper bound on any row's number of positives, known to the caller (K, the
        images per identity of a P x K batch), for the losses that take a top-k over the positives
        (HE, weighted triplet). Without it they read the largest count from the device, one host
        synchronization. A row with more positives than ``max_pos`` uses its ``max_pos`` farthest.
        """
        check_inputs(dist, pos, neg)
        if max_pos is not None and (isinstance(max_pos, bool) or not isinstance(max_pos, int) or max_pos < 0):
            raise ValueError(f"max_pos must be an integer >= 0; got {max_pos!r}")
        loss, n_pos, n_neg, valid = self.compute(dist, pos, neg, max_pos)
        with torch.no_grad():
            n_valid = valid.sum()
            denom = n_valid.clamp_min(1).to(dist.dtype)
            self._raw = torch.stack([(n_pos.to(dist.dtype) * valid).sum() / denom,
                                     (n_neg.to(dist.dtype) * valid).sum() / denom,
                                     n_valid.to(dist.dtype)])
        self._stats = None
        return loss

    def stats_tensor(self) -> Tensor:
        """``[3]`` device tensor (hard_pos, hard_neg, valid) of the last call, for batched syncing."""
        if self._raw is None:
            return torch.zeros(3)
        return self._raw

    @property
    def stats(self) -> dict[str, float]:
        if self._stats is None:
            hard_pos, hard_neg, valid = self.stats_tensor().tolist()
            self._stats = {"hard_pos": hard_pos, "hard_neg": hard_neg, "valid": valid}
        return self._stats


def check_inputs(dist: Tensor, pos: Tensor, neg: Tensor) -> None:
    """Raise ``ValueError`` naming the argument whose shape or dtype is wrong."""
    if dist.dim() != 2:
        raise ValueError(f"dist must be a 2-D [B, M] tensor; got shape {tuple(dist.shape)}")
    if not dist.is_floating_point():
        raise ValueError(f"dist must be floating point; got {dist.dtype}")
    for name, mask in (("pos", pos), ("neg", neg)):
        if mask.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool mask; got {mask.dtype}")
        if mask.shape != dist.shape:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}, dist has {tuple(dist.shape)}")


def masked_max(dist: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(filled [B, M], max [B])`` of ``dist`` over ``mask``; ``filled`` is -inf off the mask.

    A row with an empty mask gives -inf. No gradient (call under ``torch.no_grad``).
    """
    filled = torch.where(mask, dist, -_INF)
    return filled, filled.amax(dim=1)


def masked_min(dist: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(filled [B, M], min [B])`` of ``dist`` over ``mask``; ``filled`` is +inf off the mask."""
    filled = torch.where(mask, dist, _INF)
    return filled, filled.amin(dim=1)


def as_float(mask: Tensor, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """A bool mask as 0/1 floats of ``dtype``, or written into ``out`` (e.g. a no longer needed buffer).

    Through a uint8 view: a plain vectorized conversion. Selecting with ``torch.where`` on a
    data-dependent mask (the hard sets) branches per element on CPU and is several times slower
    when the mask is irregular, so hard-set coefficients are built with float arithmetic instead.
    """
    if out is None:
        return mask.view(torch.uint8).to(dtype)
    return out.copy_(mask.view(torch.uint8))


def has_any(mask: Tensor) -> Tensor:
    """``bool [B]``: rows of ``mask [B, M]`` with at least one True (a uint8 reduction, fast on CPU)."""
    return mask.view(torch.uint8).any(1).to(torch.bool)


def top_k_size(n_pos: Tensor, max_pos: int | None, width: int) -> int:
    """Top-k size over the positives of ``[B, width]`` rows: ``max_pos`` when given (no host
    synchronization), else the largest count in ``n_pos [B]`` (one), never above ``width``."""
    if n_pos.shape[0] == 0:
        return 0
    k = int(n_pos.max()) if max_pos is None else max_pos
    return min(k, width)


def check_nonneg(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == _INF:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == _INF:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


class _RowDot(torch.autograd.Function):
    """out[i] = Σ_j coef[i, j]·dist[i, j]; d out[i] / d dist[i, j] = grad_coef[i, j] (``coef`` if None)."""

    @staticmethod
    def forward(ctx, dist: Tensor, coef: Tensor, grad_coef: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(coef if grad_coef is None else grad_coef)
        return torch.linalg.vecdot(coef, dist, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (grad_coef,) = ctx.saved_tensors
        return grad_coef * grad.unsqueeze(1), None, None


def row_dot(dist: Tensor, coef: Tensor, grad_coef: Tensor | None = None) -> Tensor:
    """Per-row weighted sum ``[B]`` of ``dist [B, M]`` with constant weights ``coef [B, M]``.

    Losses that are linear in the distances once their hard sets and weights are fixed use it: one read
    pass forward, one write pass backward. ``grad_coef`` overrides the gradient coefficients (for weights
    that themselves depend on the distances).
    """
    return _RowDot.apply(dist, coef, grad_coef)
