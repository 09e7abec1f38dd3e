"""Collectives across data-parallel workers: all-gathers, so that the in-batch metric loss sees the global
batch, and the one per-step broadcast of BatchNorm statistics.

Under ``torch.distributed`` each of W workers holds ``b = B / W`` samples of a global batch of B. The
metric loss takes this worker's ``b`` anchors against the ``B`` references of all workers, in rank order
(the order one worker would hold the same global batch in). With no process group (or W = 1) every
function here returns its input.

Gradients (:func:`gather_with_grad`): worker r's loss L_r is the mean over its own anchors, and the
global loss is L = (1/W)·Σ_r L_r, which is what DDP's gradient averaging computes. The gradient of L_r
reaches every worker's references, so the backward all-reduces (sums) the gradient of the gathered tensor
and keeps this worker's slice: Σ_r ∂L_r/∂x_local; DDP's averaging then divides by W. The result equals
one worker's gradient for the whole global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(tensor: Tensor) -> Tensor:
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: every worker's ``[b, ...]`` concatenated in rank order. Backward: the sum over workers of
    the gradient of that concatenation, this worker's slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, ctx.rank * ctx.n, ctx.n)


def gather_with_grad(tensor: Tensor) -> Tensor:
    """``[W·b, ...]``: ``tensor [b, ...]`` of every worker in rank order, differentiable (see the module
    docstring). Every worker must pass the same shape."""
    if world()[1] == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather(tensor: Tensor) -> Tensor:
    """``[W·b, ...]``: ``tensor [b, ...]`` of every worker in rank order, without gradient (labels, keys)."""
    if world()[1] == 1:
        return tensor
    return _all_gather(tensor)


@torch.no_grad()
def broadcast_float_buffers_(module: torch.nn.Module) -> None:
    """Overwrite ``module``'s floating-point buffers (BatchNorm running statistics) with rank 0's, in place,
    in one broadcast. Integer buffers (BatchNorm's batch counters) are left alone: every worker counts the
    same forwards."""
    if world()[1] == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    if len({b.dtype for b in buffers}) > 1:
        raise ValueError(f"buffers of several floating dtypes: {sorted({str(b.dtype) for b in buffers})}")
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.broadcast(flat, src=0)
    for buf, part in zip(buffers, torch.split(flat, [b.numel() for b in buffers])):
        buf.copy_(part.view_as(buf))
