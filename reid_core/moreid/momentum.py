"""The forward-only key encoder f_k and its momentum update θ_k ← m·θ_k + (1 − m)·θ_q (docs/design.md, "The method")."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from reid_core.ddp import unwrap


def make_key_encoder(query_encoder: nn.Module) -> nn.Module:
    """A deep copy of f_q for f_k: no gradients, normalization layers frozen against its own forward.

    f_k's BatchNorm layers normalize with batch statistics in train mode, like f_q, but their momentum
    is 0 so f_k's own forward never changes its running statistics: only the EMA from f_q does.
    """
    key_encoder = copy.deepcopy(unwrap(query_encoder))
    for param in key_encoder.parameters():
        param.requires_grad_(False)
    for module in key_encoder.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            module.momentum = 0.0
    return key_encoder


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, m: float) -> None:
    """In place: θ_k ← m·θ_k + (1 − m)·θ_q for every parameter and floating buffer (BN running stats);
    integer buffers (BN batch counters) are copied. Either encoder may be wrapped in DDP.

    Under a process group f_k stays identical on every worker when f_q is: DDP keeps f_q's parameters
    identical, and each worker's BN running statistics, which move with its own batch, are made rank 0's
    by the caller first (:meth:`Framework.after_optimizer_step` broadcasts them, the one buffer broadcast
    of a step; the trainer's DDP wrapper does not broadcast them again).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m!r}")
    key, query = unwrap(key_encoder), unwrap(query_encoder)
    k_params, q_params = list(key.parameters()), list(query.parameters())
    k_buffers, q_buffers = list(key.buffers()), list(query.buffers())
    if len(k_params) != len(q_params) or len(k_buffers) != len(q_buffers):
        raise ValueError("key and query encoders differ in structure: "
                         f"{len(k_params)} vs {len(q_params)} parameters, {len(k_buffers)} vs {len(q_buffers)} buffers")
    float_k = k_params + [b for b in k_buffers if b.is_floating_point()]
    float_q = [p.detach() for p in q_params] + [b for b in q_buffers if b.is_floating_point()]
    for k, q in zip(float_k, float_q):
        if k.shape != q.shape:
            raise ValueError(f"key and query encoders differ in shape: {tuple(k.shape)} vs {tuple(q.shape)}")
    if float_k:
        # lerp: θ_k + (1 − m)·(θ_q − θ_k) = m·θ_k + (1 − m)·θ_q, one fused kernel per tensor group.
        torch._foreach_lerp_(float_k, float_q, 1.0 - m)
    for k, q in zip(k_buffers, q_buffers):
        if not k.is_floating_point():
            k.copy_(q)
