"""The one place that reaches through a DistributedDataParallel wrapper."""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module
