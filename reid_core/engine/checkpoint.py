"""Atomic checkpoint files and random-number-generator state capture.

A checkpoint is one ``torch.save`` file. :func:`resolve_path` accepts a file path or a directory
(then the file is ``<dir>/checkpoint.pt``), so a Ray Train checkpoint directory can hold it as is.

Checkpoints live in shared study folders, so a file there may have been written by someone else: they
are read with ``torch.load(weights_only=True)`` (tensors and plain Python values only; a pickle that
would call anything else is refused before any of it runs), and everything saved is tensor-only (the
numpy and Python RNG states are stored as tensors and ints). Files are written owner-only (0600) and the
folders created for them 0700.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid_core.files import write_atomic

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the run; the message names the file."""


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is an existing directory."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` through a temporary file in the same folder and a rename,
    so a reader never sees a half-written checkpoint. Returns the file written: mode 0600 (the
    temporary file is made by ``mkstemp``, owner-only from its creation); folders this creates are 0700."""
    path = resolve_path(path)
    make_private_dirs(path.parent)
    return write_atomic(path, lambda fh: torch.save(state, fh))


def make_private_dirs(folder: str | os.PathLike) -> None:
    """Create ``folder`` and its missing parents with mode 0700 (``mkdir -p`` gives parents the
    default mode); existing folders are left as they are."""
    folder = Path(folder)
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode passes through the umask


# Checkpoints written before they were tensor-only hold numpy's RNG state as an ndarray of uint32: those
# (and only those) numpy globals are allowed to read them, still by the restricted unpickler.
_NUMPY_ARRAY_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)
_NUMPY_ARRAY_NAMES = {f"{g.__module__}.{g.__name__}" for g in _NUMPY_ARRAY_GLOBALS}


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` onto the CPU, tensors and plain values only.

    A file that is not a ``torch.save`` archive, or whose pickle names any callable other than the ones
    ``weights_only`` allows (a planted file), raises :class:`CheckpointError` naming the file; nothing in
    it runs. Files of the earlier format (numpy RNG state as an ndarray) are read with numpy's array
    reconstruction allowed and nothing else."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a checkpoint (not a torch.save archive); it was not loaded")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error says it all
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # read, not run
            if unsafe - _NUMPY_ARRAY_NAMES:
                raise _refused(path, sorted(unsafe - _NUMPY_ARRAY_NAMES))
            allowed = list(_NUMPY_ARRAY_GLOBALS) if unsafe else []
            with torch.serialization.safe_globals(allowed):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:  # the restricted unpickler met something the scan did not list
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        raise _refused(path, found or ["an object weights_only does not build"]) from None
    except Exception as exc:  # truncated archives, missing records, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(state).__name__})")
    return state


def _refused(path: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(f"refusing checkpoint {path}: it would call {', '.join(names[:3])}, which a "
                           f"reid_core checkpoint never holds (tensors and plain values only); it was not "
                           f"written by this project and nothing in it was run")


def rng_state() -> dict[str, Any]:
    """The state of every generator training draws from: torch (CPU and CUDA), numpy, python; tensors
    and plain numbers only, so that a checkpoint holding it loads with ``weights_only=True``.
    numpy: its MT19937 key (624 uint32, as an int64 tensor) and position; python: its 625 state words."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, words, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state captured by :func:`rng_state`, or the tuples earlier checkpoints stored (CUDA only
    where both sides have it)."""
    torch.set_rng_state(state["torch"])
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["words"].tolist()), python_state["gauss_next"])
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def seed_all(seed: int) -> None:
    """Seed torch (all devices), numpy and python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
