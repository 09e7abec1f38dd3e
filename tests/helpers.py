"""Helpers shared by test files (imported as ``helpers``: ``tests/`` is on ``sys.path`` through
``tests/conftest.py``). Test files never import from one another."""
from __future__ import annotations

import csv
import os
import shlex
import signal
import socket
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent

# Tiny ResNet-18 trials on tiny synthetic data (8 identities, 2 cameras, 32x16 images, 2 iterations per epoch).
TINY_BASE = {
    "data": {"dataset": "synthetic", "height": 32, "width": 16, "batch_size": 8, "num_instance": 4, "workers": 0,
             "random_erasing": 0.0,
             "synthetic": {"ids": 8, "cams": 2, "images_per_id_cam": 2, "height": 32, "width": 16, "seed": 0}},
    "model": {"arch": "resnet18"},
    "framework": {"dict_size": 64},
    "train": {"iters_per_epoch": 2, "eval_period": 1, "device": "cpu", "log_every": 1},
    "eval": {"batch_size": 16},
}


def write_space(folder: Path, name: str, epochs: int, parameters: dict, iters_per_epoch: int | None = None,
                **fields) -> Path:
    """A study of TINY_BASE trials; ``iters_per_epoch`` lengthens epochs where a test must act inside one."""
    base = yaml.safe_load(yaml.safe_dump(TINY_BASE))
    base["train"]["epochs"] = epochs
    if iters_per_epoch:
        base["train"]["iters_per_epoch"] = iters_per_epoch
    space = {"name": name, "description": "test", "base": base, "parameters": parameters, "searcher": "grid",
             "scheduler": {"type": "none"},
             "resources": {"max_concurrent": 1, "workers_per_trial": 1, "cpus_per_worker": 1}, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trial_progress(study: Path, trial_id: str) -> pd.DataFrame:
    """Tune's per-trial progress.csv (every result the trial reported)."""
    (folder,) = [p for p in study.iterdir() if p.is_dir() and f"_{trial_id}_" in p.name]
    return pd.read_csv(folder / "progress.csv")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, []))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_leftovers(pids: list[int], timeout: float) -> None:
    """Wait for processes this test started to exit; kill (by pid) any still there after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.5)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def ray_starts(commands: list[str]) -> list[tuple[dict[str, str], list[str], str]]:
    """Each `ray start` in a list of shell commands: (its VAR=value prefix, its arguments, the whole command)."""
    found = []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part)
            env = {}
            while words and "=" in words[0] and not words[0].startswith("-"):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words[:2] == ["ray", "start"]:
                found.append((env, words[2:], command))
    return found
