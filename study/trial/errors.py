"""The runtime error protocol between a trial and the driver.

A deterministic error (a config or data error: the same input gives the same error on every attempt) is
reported by the trial as one result with :data:`TRIAL_ERROR_KEY`, left in its folder as
:data:`TRIAL_ERROR_FILE` by rank 0 (Ray Train hands back only checkpointed metrics) and raised by the
trainable once its loop returned, so that neither Train nor Tune retries it (:func:`is_deterministic`).
The driver's guards (:mod:`study.driver.guards`) read the same key.
"""
from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs

from reid_core.config import ConfigError
from reid_core.data.datasets import DatasetError

TRIAL_ERROR_KEY = "trial_error"  # result key of a trial that ended on a deterministic error (its message)


class PreflightError(ValueError):
    """Bad input found before any trial: the message names the folder, file or setting and the fix."""


def is_deterministic(exc: BaseException) -> bool:
    """Config and data errors repeat on every attempt: retrying them only costs time."""
    return isinstance(exc, (ConfigError, DatasetError, PreflightError))


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


def error_line(exc: BaseException) -> str:
    """An exception as one line: its type and the last line of its message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}".rstrip(": ")
