"""The global batch: ``data.batch_size`` images per optimizer step over all workers, as FastReID's
``SOLVER.IMS_PER_BATCH``.

Each of W workers loads ``batch_size / W`` images, whole identities only (K = ``data.num_instance`` images
each), so the batch must divide by ``W x K``. :func:`check_global_batch` says so before any work starts
(the study driver calls it before Ray starts; :func:`reid_core.data.build_train_loader` calls it too).
Imports no torch.
"""
from __future__ import annotations

from typing import Any

from reid_core.config import ConfigError, DataConfig


def _data(cfg: Any) -> DataConfig:
    return cfg.data if hasattr(cfg, "data") else cfg


def per_worker_batch(cfg: Any, world_size: int) -> int:
    """Images each of ``world_size`` workers loads per step (``data.batch_size / world_size``); checked."""
    check_global_batch(cfg, world_size)
    return _data(cfg).batch_size // world_size


def check_global_batch(cfg: Any, world_size: int) -> None:
    """Raise :class:`ConfigError` unless ``data.batch_size`` splits into ``world_size`` equal shares of
    whole identities (divisible by ``world_size x data.num_instance``); the message names the numbers and
    the settings that would work. ``cfg``: a :class:`~reid_core.config.Config` or its ``DataConfig``."""
    d = _data(cfg)
    batch, k = d.batch_size, d.num_instance
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"the number of workers must be a positive integer, got {world_size!r}")
    unit = world_size * k
    if batch >= 1 and batch % unit == 0:
        return
    fixes = []
    lower, upper = (batch // unit) * unit, (batch // unit + 1) * unit
    fixes.append(f"data.batch_size={upper}" + (f" or {lower}" if lower > 0 else ""))
    workers = [w for w in range(world_size - 1, 0, -1) if batch % (w * k) == 0]
    if workers:
        fixes.append(f"{workers[0]} worker(s) (batch {batch} = {workers[0]} x {batch // workers[0]} images)")
    raise ConfigError(f"data.batch_size {batch} is not divisible by workers x K = {world_size} x {k} = {unit}: "
                      f"data.batch_size is the global batch of one step, split into equal shares of whole "
                      f"identities (K = data.num_instance images each) over the workers; use "
                      + ", or ".join(fixes))
