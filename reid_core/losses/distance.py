"""Anchor-to-reference distance matrices (docs/design.md, "The losses": distances).

``euclidean``: d(x, y) = ||x - y||_2, computed with the matmul expansion
|x|^2 + |y|^2 - 2 x.y, clamped at 1e-12 before the square root so that the value and the gradient stay
finite when x == y (the gradient is exactly 0 there where the expansion cancels exactly; in float32 a
rounding residual of about 1e-7 |x|^2 can survive the clamp at near-identical points). ``cosine``: d(x, y) = -x̂ᵀŷ (range [-1, 1]).
``normalize=True`` L2-normalizes the features before either metric.

Frameworks that keep references across steps (the MoReID dictionary) store them already prepared with
:func:`prepare_features` and call :func:`prepared_distance`, so the 65k stored keys are never
re-normalized.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from reid_core.config import DISTANCES

_EPS_SQ = 1e-12  # squared distances are clamped here before the square root
_EPS = _EPS_SQ ** 0.5


def _check_metric(metric: str) -> None:
    if metric not in DISTANCES:
        raise ValueError(f"distance metric must be one of {', '.join(DISTANCES)}; got {metric!r}")


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"features must be 2-D [N, D]; got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: x has {x.shape[1]}, y has {y.shape[1]}")


class _Euclidean(torch.autograd.Function):
    """sqrt(max(|x|^2 + |y|^2 - 2 x yᵀ, eps)) with a hand-written backward.

    Saves only x, y and the [B, M] result (autograd of the expression would keep two [B, M]
    intermediates and spend several more passes over them in the backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        # vector_norm is one fused pass; y.pow(2).sum(1) would materialize a second [M, D] array.
        y_sq = torch.linalg.vector_norm(y, dim=1).square_().unsqueeze(0)
        sq = torch.addmm(y_sq, x, y.t(), beta=1.0, alpha=-2.0)
        sq.add_(torch.linalg.vector_norm(x, dim=1, keepdim=True).square_()).clamp_min_(_EPS_SQ).sqrt_()
        ctx.save_for_backward(x, y, sq)
        return sq

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, y, dist = ctx.saved_tensors
        # d(dist)/d(sq) = 1 / (2 dist), 0 where the clamp was active; the 2 cancels the 2 of d(sq)/dx.
        g = torch.div(grad, dist).masked_fill_(dist <= _EPS, 0.0)
        grad_x = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(x * g.sum(1, keepdim=True), g, y, beta=1.0, alpha=-1.0)
        if ctx.needs_input_grad[1]:
            grad_y = torch.addmm(y * g.sum(0).unsqueeze(1), g.t(), x, beta=1.0, alpha=-1.0)
        return grad_x, grad_y


def euclidean_distance(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distances ``[B, M]`` between rows of ``x [B, D]`` and ``y [M, D]`` (feature units)."""
    _check_pair(x, y)
    return _Euclidean.apply(x, y)


def prepare_features(x: Tensor, metric: str, normalize: bool) -> Tensor:
    """Features ``[N, D]`` in the form :func:`prepared_distance` expects.

    L2-normalized when ``normalize`` is set or the metric is cosine (which is defined on unit vectors),
    unchanged otherwise.
    """
    _check_metric(metric)
    if normalize or metric == "cosine":
        return F.normalize(x, dim=1)
    return x


def prepared_distance(x: Tensor, y: Tensor, metric: str) -> Tensor:
    """Distances ``[B, M]`` between features already passed through :func:`prepare_features`."""
    _check_metric(metric)
    _check_pair(x, y)
    if metric == "euclidean":
        return _Euclidean.apply(x, y)
    return -(x @ y.t())


def pairwise_distance(x: Tensor, y: Tensor, metric: str = "euclidean", normalize: bool = False) -> Tensor:
    """Distance matrix ``[B, M]`` from anchors ``x [B, D]`` to references ``y [M, D]``.

    ``metric`` is ``euclidean`` or ``cosine`` (-x̂ᵀŷ); ``normalize`` L2-normalizes both sides first.
    """
    _check_metric(metric)
    _check_pair(x, y)
    return prepared_distance(prepare_features(x, metric, normalize), prepare_features(y, metric, normalize), metric)
