"""Study platform: Ray's per-trial start-up cost, and what ASHA saves against a full-budget grid.

Two studies of the same configurations (learning rate x loss, ResNet-18 on small synthetic data, one CPU
worker per trial) run on a local Ray: one with ASHA, one to the full budget (no scheduler).

- **Start-up**: for every trial, the driver-side time from Tune starting the trial to its first result,
  minus the worker's own time for that epoch (training + evaluation, ``epoch_s``): what a trial pays for
  its Tune actor, Train controller, worker group, process group, data and model set-up before training.
- **ASHA vs grid**: epochs trained in total, wall time, and the best mAP each found (and whether ASHA
  kept the grid's best configuration).

``python -m benchmarks --only study [--quick]``; quick: 4 configurations x 4 epochs (about 4 minutes on
2 cores), full: 8 configurations x 8 epochs.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from study.run import run_study
from study.space import parse_space
from study.storage import StudyStorage


class TrialTimer(Callback):
    """Driver-side times: trial start, first result (with the worker's epoch seconds), completion."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.first: dict[str, tuple[float, float]] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id not in self.first:
            self.first[trial.trial_id] = (time.time(), float(result.get("epoch_s", 0.0)))

    def startup_seconds(self) -> list[float]:
        return [first - epoch_s - self.started[tid] for tid, (first, epoch_s) in self.first.items()
                if tid in self.started]


def space_dict(name: str, quick: bool, asha: bool) -> dict[str, Any]:
    lrs = [3e-3, 1e-3] if quick else [3e-3, 1e-3, 3e-4, 1e-4]
    epochs = 4 if quick else 8
    return {
        "name": name,
        "description": "benchmark: learning rate x loss",
        "base": {
            "data": {"dataset": "synthetic", "height": 64, "width": 32, "batch_size": 16, "num_instance": 4,
                     "workers": 0, "random_erasing": 0.0,
                     "synthetic": {"ids": 24, "cams": 2, "images_per_id_cam": 4, "height": 64, "width": 32}},
            "model": {"arch": "resnet18"},
            "framework": {"name": "moreid", "dict_size": 256},
            "train": {"epochs": epochs, "iters_per_epoch": 4, "eval_period": 1, "device": "cpu"},
            "eval": {"batch_size": 64},
        },
        "parameters": {"optim.lr": {"type": "grid", "values": lrs},
                       "loss.name": {"type": "grid", "values": ["triplet", "he"]}},
        "searcher": "grid",
        "scheduler": {"type": "asha", "grace_epochs": 1, "reduction_factor": 2} if asha else {"type": "none"},
        "resources": {"max_concurrent": 2, "workers_per_trial": 1, "cpus_per_worker": 1},
    }


def run_one(root: Path, quick: bool, asha: bool) -> dict[str, Any]:
    name = "asha" if asha else "grid"
    space = parse_space(space_dict(name, quick, asha), source=f"benchmark:{name}")
    timer = TrialTimer()
    start = time.perf_counter()
    status = run_study(space, StudyStorage(root, name), resume=False, address=None, extra_callbacks=[timer])
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"benchmark study {name} failed (exit status {status}); see the output above")
    table = pd.read_csv(root / name / "results.csv")
    best = table.loc[table["best_mAP"].idxmax()]
    return {"wall_s": wall, "epochs": int(table["epochs"].sum()), "trials": len(table),
            "stopped": int((table["status"] == "STOPPED").sum()), "best_mAP": float(best["best_mAP"]),
            "best_config": (float(best["optim.lr"]), str(best["loss.name"])), "startup": timer.startup_seconds()}


def run(quick: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="moreid-bench-study-") as tmp:
        root = Path(tmp)
        grid = run_one(root, quick, asha=False)
        asha = run_one(root, quick, asha=True)
    startup = grid["startup"] + asha["startup"]
    rows = [("grid (full budget)", grid), ("ASHA", asha)]
    print(f"\n{'study':20s} {'trials':>6s} {'stopped':>7s} {'epochs':>6s} {'wall s':>7s} {'best mAP':>8s}  best config")
    for label, r in rows:
        print(f"{label:20s} {r['trials']:6d} {r['stopped']:7d} {r['epochs']:6d} {r['wall_s']:7.1f} "
              f"{r['best_mAP']:8.2f}  lr={r['best_config'][0]:g} loss={r['best_config'][1]}")
    print(f"Ray per-trial start-up (first result minus its epoch's work), {len(startup)} trials, 2 at a time: "
          f"median {statistics.median(startup):.1f} s, min {min(startup):.1f} s, max {max(startup):.1f} s")
    return {
        "study_trial_startup_s": statistics.median(startup),
        "study_grid_epochs": float(grid["epochs"]),
        "study_asha_epochs": float(asha["epochs"]),
        "study_asha_epoch_fraction": asha["epochs"] / grid["epochs"],
        "study_grid_wall_s": grid["wall_s"],
        "study_asha_wall_s": asha["wall_s"],
        "study_grid_best_mAP": grid["best_mAP"],
        "study_asha_best_mAP": asha["best_mAP"],
        "study_asha_kept_best_config": float(asha["best_config"] == grid["best_config"]),
    }


if __name__ == "__main__":
    print(run(quick=True))
