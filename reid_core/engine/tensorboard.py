"""TensorBoard scalars for one training run (rank 0 writes; other ranks get a no-op logger).

Tags: ``train/<name>`` every ``train.log_every`` iterations (x axis: optimizer steps),
``epoch/<name>`` once per epoch and ``eval/<name>`` per evaluation (x axis: epochs), where
``<name>`` is a metric name such as ``loss/total``, ``hard/neg``, ``lr`` or ``mAP``.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

from torch.utils.tensorboard import SummaryWriter


class ScalarLogger:
    """Writes scalar dicts under a tag prefix; does nothing when ``log_dir`` is None."""

    def __init__(self, log_dir: str | os.PathLike | None) -> None:
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._writer = SummaryWriter(self.log_dir) if self.log_dir is not None else None

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, prefix: str, values: Mapping[str, object], step: int) -> None:
        """Write every finite number in ``values`` as ``{prefix}/{key}`` at ``step``; skips lists."""
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
