"""The runtime error protocol between a trial and the driver.

A deterministic error (a config or data error: the same input gives the same error on every attempt) is
reported by the trial as one result with :data:`TRIAL_ERROR_KEY`, left in its folder as
:data:`TRIAL_ERROR_FILE` by rank 0 (Ray Train hands back only checkpointed metrics) and raised by the
trainable once its loop returned, so that neither Train nor Tune retries it (:func:`is_deterministic`).
The driver's guards (:mod:`study.driver.guards`) read the same key.

Deterministic too: a non-finite loss or key (``reid_core.engine.finite.NonFiniteError``: the same config
and data diverge the same way) and CUDA out-of-memory, which :func:`translate` turns into a
:class:`GpuMemoryError` naming the per-worker batch and the trial's GPU share. A collective error (NCCL,
a collective timeout: :func:`is_collective`) may be a passing fault of a node or link: it is retried once
(:data:`COLLECTIVE_RETRIES`, counted in the trial folder's :data:`COLLECTIVE_FILE` across Train and Tune
retries) and then reported like a deterministic error.
"""
from __future__ import annotations

import re
import sys
from typing import Any

import pyarrow.fs as pafs

from reid_core.config import ConfigError
from reid_core.data.datasets import DatasetError

TRIAL_ERROR_KEY = "trial_error"  # result key of a trial that ended on a deterministic error (its message)


class PreflightError(ValueError):
    """Bad input found before any trial: the message names the folder, file or setting and the fix."""


class GpuMemoryError(RuntimeError):
    """CUDA ran out of memory: the same batch on the same GPU share fails again (not retried)."""


def _non_finite_error() -> type | None:
    # An instance of NonFiniteError exists only once its module (which imports torch) is loaded: looked up
    # there, so that the driver, which imports this module, does not import torch for it.
    finite = sys.modules.get("reid_core.engine.finite")
    return getattr(finite, "NonFiniteError", None)


def is_deterministic(exc: BaseException) -> bool:
    """Config and data errors, a non-finite loss or key, CUDA out-of-memory and a collective error that
    already had its retry repeat on every attempt: retrying them only costs time."""
    non_finite = _non_finite_error()
    return (isinstance(exc, (ConfigError, DatasetError, PreflightError, GpuMemoryError))
            or (non_finite is not None and isinstance(exc, non_finite)) or is_out_of_memory(exc))


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``) or a "CUDA out of memory" message."""
    return "OutOfMemoryError" in _names(exc) or "CUDA out of memory" in str(exc)


# Messages of torch.distributed's NCCL backend and its watchdog when a collective fails or times out.
COLLECTIVE_MARKERS = ("NCCL", "Watchdog caught collective operation timeout")
COLLECTIVE_RETRIES = 1  # attempts of a trial after a collective error, whatever retries.* allow
COLLECTIVE_FILE = "collective_errors.txt"  # in a Tune trial's folder: one line per collective error


def is_collective(exc: BaseException) -> bool:
    """``torch.distributed.DistBackendError`` or an NCCL / collective-timeout message."""
    return "DistBackendError" in _names(exc) or any(marker in str(exc) for marker in COLLECTIVE_MARKERS)


def translate(exc: BaseException, *, batch_size: int, world_size: int, gpu_share: float) -> BaseException:
    """The error a trial reports for ``exc``: CUDA out-of-memory as a :class:`GpuMemoryError` naming the
    per-worker batch (``batch_size`` images over ``world_size`` workers) and the GPU share; else ``exc``."""
    if not is_out_of_memory(exc) or isinstance(exc, GpuMemoryError):
        return exc
    share = f"{gpu_share:g} GPU per worker" if gpu_share > 0 else "no GPU reserved per worker"
    return GpuMemoryError(
        f"CUDA out of memory with {batch_size // max(1, world_size)} images per worker (data.batch_size "
        f"{batch_size} over {world_size} worker(s)) on {share} (--gpus-per-worker): lower data.batch_size, "
        f"give each worker a larger GPU share, or set train.amp=true (torch: {error_line(exc)})")


def collective_errors(folder_uri: str) -> int:
    """How many collective errors earlier attempts of the trial recorded (read when an attempt starts, so
    that every rank decides alike whether the next one is final)."""
    fs, path = pafs.FileSystem.from_uri(folder_uri)
    target = f"{path}/{COLLECTIVE_FILE}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        return 0
    with fs.open_input_stream(target) as fh:
        return len(fh.read().decode("utf-8").splitlines())


def record_collective_error(folder_uri: str, exc: BaseException) -> None:
    """Add ``exc`` to the trial folder's :data:`COLLECTIVE_FILE` (rank 0 only)."""
    fs, path = pafs.FileSystem.from_uri(folder_uri)
    fs.create_dir(path, recursive=True)
    target = f"{path}/{COLLECTIVE_FILE}"
    seen = b""
    if fs.get_file_info(target).type == pafs.FileType.File:
        with fs.open_input_stream(target) as fh:
            seen = fh.read()
    with fs.open_output_stream(target) as out:
        out.write(seen + (error_line(exc) + "\n").encode("utf-8"))


class CollectiveError(RuntimeError):
    """A collective (NCCL) error that came back after its retry: reported, not retried again."""


def error_result(exc: BaseException, metric: str, epoch: int = 0) -> dict[str, Any]:
    """The one result a trial reports before it fails on a deterministic error (Tune needs the metric)."""
    return {TRIAL_ERROR_KEY: error_line(exc), "epoch": epoch, metric: float("nan")}


TRIAL_ERROR_FILE = "trial_error.txt"  # in a Tune trial's folder: the message its workers stopped on


def write_trial_error(folder_uri: str, message: str) -> None:
    """Leave ``message`` in a trial's folder (a local path or a pyarrow URI), for its trainable to raise:
    Ray Train hands back only the metrics reported with a checkpoint."""
    fs, path = pafs.FileSystem.from_uri(folder_uri)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{TRIAL_ERROR_FILE}") as out:
        out.write(message.encode("utf-8"))


def read_trial_error(folder_uri: str, remove: bool = False) -> str | None:
    """The message :func:`write_trial_error` left, or None; ``remove``: delete it (a rerun starts clean)."""
    fs, path = pafs.FileSystem.from_uri(folder_uri)
    target = f"{path}/{TRIAL_ERROR_FILE}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(target) as fh:
        message = fh.read().decode("utf-8")
    if remove:
        fs.delete_file(target)
    return message


# An object's address in a message (PIL's "<_io.BytesIO object at 0x7f...>"): it differs between processes,
# so that the same error of two trials would read as two errors (see study.driver.guards.SameErrorStopper).
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def error_line(exc: BaseException) -> str:
    """An exception as one line: its type and the last line of its message (objects' addresses left out)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = _ADDRESS.sub(">", lines[-1].strip()) if lines else ""
    return f"{type(exc).__name__}: {text}".rstrip(": ")
