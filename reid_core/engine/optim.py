"""Optimizer, per-iteration learning-rate schedule and backbone freezing.

The schedule is a function of the optimizer-step index ``it`` (0-based):

* warmup: for ``it < warmup_iters`` the lr is multiplied by a factor rising linearly from
  ``warmup_factor`` (at ``it = 0``) to 1 (at ``it = warmup_iters``);
* constant ``base_lr`` until ``delay_iters = cosine_delay_epochs * iters_per_epoch``;
* cosine annealing from ``base_lr`` at ``delay_iters`` down to ``eta_min`` at the last iteration
  ``total_iters - 1``.

Warmup multiplies whatever the main schedule gives, so a delay shorter than the warmup still works.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from reid_core.config import Config, OptimConfig


def trainable_parameters(framework: nn.Module) -> list[nn.Parameter]:
    """Parameters the optimizer updates: every framework parameter that requires grad, i.e. f_q
    (``framework.encoder``) and any learnable loss parameter. f_k's parameters do not require grad
    (the momentum update moves them), nor does the BNNeck bias (fixed at 0)."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for p in framework.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def build_optimizer(cfg: Config, framework: nn.Module) -> torch.optim.Optimizer:
    """Adam, or SGD with Nesterov momentum, over :func:`trainable_parameters` with
    ``cfg.optim.weight_decay`` on every parameter (as in FastReID's default recipes)."""
    o: OptimConfig = cfg.optim
    params = trainable_parameters(framework)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.momentum > 0)
    raise ValueError(f"optim.name must be adam or sgd, got {o.name!r}")


def lr_at(it: int, base_lr: float, *, total_iters: int, warmup_iters: int, warmup_factor: float,
          delay_iters: int, eta_min: float) -> float:
    """Learning rate of optimizer step ``it`` (0-based) under the warmup/delay/cosine schedule."""
    if it < delay_iters or total_iters - 1 <= delay_iters:
        main = base_lr
    else:
        progress = min(1.0, (it - delay_iters) / (total_iters - 1 - delay_iters))
        main = eta_min + (base_lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if it < warmup_iters:
        main *= warmup_factor + (1.0 - warmup_factor) * it / warmup_iters
    return main


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Per-iteration schedule (see the module docstring). Call :meth:`step` after every
    optimizer step; ``last_epoch`` counts optimizer steps taken."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, total_iters: int, warmup_iters: int = 0,
                 warmup_factor: float = 0.1, delay_iters: int = 0, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.delay_iters = int(delay_iters)
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [lr_at(self.last_epoch, base, total_iters=self.total_iters, warmup_iters=self.warmup_iters,
                      warmup_factor=self.warmup_factor, delay_iters=self.delay_iters, eta_min=self.eta_min)
                for base in self.base_lrs]


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, iters_per_epoch: int) -> WarmupCosineLR:
    """The schedule of ``cfg.optim`` over ``cfg.train.epochs * iters_per_epoch`` optimizer steps."""
    o = cfg.optim
    return WarmupCosineLR(optimizer, total_iters=cfg.train.epochs * iters_per_epoch,
                          warmup_iters=o.warmup_iters, warmup_factor=o.warmup_factor,
                          delay_iters=o.cosine_delay_epochs * iters_per_epoch, eta_min=o.eta_min)


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters frozen during ``optim.freeze_iters``: those of ``model.backbone``
    (everything else, i.e. pooling, BNNeck and classifier, keeps training)."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{type(model).__name__} has no 'backbone' submodule to freeze")
    return list(backbone.parameters())


def drop_grads(params: Iterable[nn.Parameter]) -> None:
    """Set the gradients of ``params`` to None so that the optimizer skips them entirely
    (no step, no weight decay, no change to Adam/SGD state).

    Dropping gradients after backward, rather than toggling ``requires_grad``, keeps the set of
    parameters that receive gradients fixed, which DistributedDataParallel requires."""
    for p in params:
        p.grad = None



class BackboneFreeze:
    """FastReID's layer freeze (``MODEL.FREEZE_LAYERS: [backbone]`` for ``SOLVER.FREEZE_ITERS``).

    For optimizer steps ``0 .. iters - 1`` the frozen backbones are in eval mode (BatchNorm normalizes
    with its running statistics and does not update them) and f_q's backbone parameters get no update:
    their gradients are dropped before the optimizer step, so Adam/SGD skip them entirely (no weight
    decay, no momentum, no optimizer state). From step ``iters`` on they are back in train mode.

    The frozen modules are f_q's ``backbone`` and, for MoReID, f_k's: f_k is f_q's momentum copy, and with
    it in train mode each key would be normalized with batch statistics while its query uses running
    ones. Call :meth:`before_step` before the forward pass and :meth:`after_backward` before the
    optimizer step, with the index of the step being taken.
    """

    def __init__(self, backbones: list[nn.Module], params: list[nn.Parameter], iters: int) -> None:
        self.backbones = backbones
        self.params = params
        self.iters = int(iters)
        self._frozen = False  # whether the backbones were put in eval mode by this object

    @classmethod
    def for_framework(cls, framework: nn.Module, model: nn.Module, iters: int) -> "BackboneFreeze":
        """The freeze of ``model.backbone`` (f_q) and of ``framework.key_encoder.backbone`` where there is one."""
        backbones = [getattr(model, "backbone", None)]
        if iters > 0:
            key_encoder = getattr(getattr(framework, "module", framework), "key_encoder", None)
            backbones.append(getattr(key_encoder, "backbone", None))
        params = backbone_parameters(model) if iters > 0 else []
        return cls([b for b in backbones if isinstance(b, nn.Module)], params, iters)

    def frozen(self, iteration: int) -> bool:
        return iteration < self.iters

    def before_step(self, iteration: int) -> None:
        """Eval mode during the freeze (again each step: the trainer sets train mode per epoch), train
        mode at the first step after it."""
        if self.frozen(iteration):
            for backbone in self.backbones:
                if backbone.training:
                    backbone.eval()
            self._frozen = True
        elif self._frozen:
            for backbone in self.backbones:
                backbone.train()
            self._frozen = False

    def after_backward(self, iteration: int) -> None:
        """Drop the frozen parameters' gradients during the freeze (after DDP's all-reduce, so every rank
        drops the same)."""
        if self.frozen(iteration):
            drop_grads(self.params)
