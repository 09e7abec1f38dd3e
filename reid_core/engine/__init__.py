"""Training engine: optimizer and schedule, the Trainer (single process or DDP), TensorBoard, checkpoints."""
from __future__ import annotations

from typing import Any

from reid_core.engine.optim import WarmupCosineLR, build_optimizer, build_scheduler, lr_at

__all__ = ["Trainer", "WarmupCosineLR", "build_optimizer", "build_scheduler", "lr_at"]


def __getattr__(name: str) -> Any:
    # Trainer pulls in data, models, losses and evaluation; import it only when asked for.
    if name == "Trainer":
        from reid_core.engine.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'reid_core.engine' has no attribute {name!r}")
