"""Study platform: where a trial's time goes, what the driver's callbacks cost, the quickstart's training
share, and (full run) what ASHA saves against a full-budget grid.

- **Trial timeline**: for every trial of the quickstart (``search_spaces/quickstart.yaml``, run as
  ``make demo`` runs it), the driver records when Tune started it, when each result arrived and when it
  ended; the trial's results carry its own timings (``study.trial.worker.TIMING_KEYS``). A trial's wall time
  splits into launch (Tune start to the training loop entered: trial process, or Train controller and
  worker group), imports, build (data, model, optimizer), restore, training, evaluation, checkpoints,
  report hand-over, teardown (last result to Tune's end of the trial) and the rest. **Overhead** is the
  trial's wall time minus its epochs' own time (training + evaluation).
- **Quickstart share**: the core-seconds the quickstart's trials spent training and evaluating over the
  core-seconds its wall time offered (wall time x trials at once), Ray's start and the report included.
- **Callbacks**: the driver's own Tune callbacks (``results.csv``, TensorBoard, console) fed with real
  Tune ``Trial`` objects and worker-shaped results, at 10, 100 and 300 trials: milliseconds per result
  for each callback, and the cost of one whole ``results.csv`` rewrite.
- **ASHA vs grid** (full run only): two studies of the same configurations, with ASHA and to the full
  budget: epochs trained, wall time, best mAP, whether ASHA kept the grid's best configuration.

``python -m benchmarks --only study [--quick]``; quick: the quickstart and the callbacks (about 5 minutes
on 2 cores), full: also ASHA vs grid (4 configurations x 8 epochs).
"""
from __future__ import annotations

import io
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from study.driver.study import run_study
from study.space import load_space, parse_space
from study.driver.storage import StudyStorage

QUICKSTART = "quickstart"
CALLBACK_TRIALS = (10, 100, 300)
CALLBACK_ROUNDS = 4  # results per trial in the callback benchmark


@dataclass
class TrialTimeline:
    """Where one trial's wall time went (seconds). Phases the trial did not report stay NaN."""

    trial_id: str
    wall_s: float
    epochs: int
    epoch_s: float  # training + evaluation, as the trial measured them
    eval_s: float = math.nan
    launch_s: float = math.nan
    import_s: float = math.nan
    build_s: float = math.nan
    restore_s: float = math.nan
    checkpoint_s: float = math.nan  # save, all but the last epoch's (reported with the next result)
    report_s: float = math.nan  # report calls, likewise
    teardown_s: float = math.nan

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.epoch_s

    @property
    def train_s(self) -> float:
        return self.epoch_s - (0.0 if math.isnan(self.eval_s) else self.eval_s)

    @property
    def other_s(self) -> float:
        known = [self.launch_s, self.import_s, self.build_s, self.restore_s, self.checkpoint_s, self.report_s,
                 self.teardown_s]
        return self.overhead_s - sum(v for v in known if not math.isnan(v))


class TrialTimer(Callback):
    """Driver-side times of every trial (start, each result with its timing keys, end)."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.results: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self.ended: dict[str, float] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        keep = {k: result[k] for k in ("epoch", "epoch_s", "eval_s", "entered_at", "import_s", "build_s",
                                       "restore_s", "checkpoint_s", "report_s") if k in result}
        self.results.setdefault(trial.trial_id, []).append((time.time(), keep))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = time.time()

    def timelines(self) -> list[TrialTimeline]:
        out = []
        for trial_id, results in self.results.items():
            if trial_id not in self.started or trial_id not in self.ended:
                continue
            start, end = self.started[trial_id], self.ended[trial_id]
            first = results[0][1]
            line = TrialTimeline(trial_id, wall_s=end - start, epochs=len(results),
                                 epoch_s=sum(r.get("epoch_s", 0.0) for _, r in results),
                                 teardown_s=end - results[-1][0])
            if "entered_at" in first:  # a trial that reports its own timings
                line.launch_s = first["entered_at"] - start
                line.import_s, line.build_s, line.restore_s = first["import_s"], first["build_s"], first["restore_s"]
                line.eval_s = sum(r["eval_s"] for _, r in results)
                line.checkpoint_s = sum(r["checkpoint_s"] for _, r in results)
                line.report_s = sum(r["report_s"] for _, r in results)
            out.append(line)
        return out


PHASES = ("launch_s", "import_s", "build_s", "restore_s", "checkpoint_s", "report_s", "teardown_s", "other_s")


def print_breakdown(title: str, lines: list[TrialTimeline]) -> dict[str, float]:
    """A table of the median seconds per phase over ``lines``; returns the medians."""
    def median(name: str) -> float:
        values = [getattr(line, name) for line in lines]
        values = [v for v in values if not math.isnan(v)]
        return statistics.median(values) if values else math.nan

    figures = {name: median(name) for name in ("wall_s", "epoch_s", "train_s", "eval_s", "overhead_s", *PHASES)}
    print(f"\n{title}: median seconds per trial over {len(lines)} trials")
    print(f"  {'wall':>10s} {figures['wall_s']:7.2f}")
    print(f"  {'training':>10s} {figures['train_s']:7.2f}")
    print(f"  {'evaluation':>10s} {figures['eval_s']:7.2f}")
    print(f"  {'overhead':>10s} {figures['overhead_s']:7.2f}   (wall minus the epochs' own time), of which:")
    for name in PHASES:
        print(f"  {name[:-2]:>10s} {figures[name]:7.2f}")
    return figures


def timed_study(space: Any, root: Path, address: str | None = None) -> tuple[float, TrialTimer]:
    """Run ``space`` as ``python -m study.run`` does (Ray start and report included) into ``root/<name>``;
    returns its wall seconds and the trial timer. Raises when the study fails."""
    timer = TrialTimer()
    start = time.perf_counter()
    status = run_study(space, StudyStorage(root, space.name), resume=False, address=address, extra_callbacks=[timer])
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"benchmark study {space.name} failed (exit status {status}); see the output above")
    return wall, timer


# ---- the quickstart -------------------------------------------------------------------------------------

def untrained_map(space: Any, searched: list[str]) -> dict[tuple, float]:
    """Test mAP (%) of every planned trial's model before its first step, keyed by its searched values:
    the trial's Trainer (same seed, so the same initial weights and data) evaluated at once."""
    from reid_core.config import flatten
    from reid_core.engine import Trainer
    from study.space import plan, trial_config

    out: dict[tuple, float] = {}
    for planned in plan(space):
        cfg = trial_config(space.base, planned.params)
        flat = flatten(cfg)
        with tempfile.TemporaryDirectory(prefix="moreid-untrained-") as tmp:
            with Trainer(cfg.replace({"train.output_dir": tmp}), log_dir=Path(tmp) / "tb") as trainer:
                out[tuple(str(flat[k]) for k in searched)] = float(trainer.evaluate()["mAP"])
    return out


def run_quickstart(root: Path) -> dict[str, Any]:
    """Run the quickstart as ``make demo`` does with a trial timer; then each trial's best mAP over its
    untrained mAP (the quickstart's promise: at least 2x for every trial)."""
    space = load_space(QUICKSTART)
    wall, timer = timed_study(space, root)
    lines = timer.timelines()
    slots = space.resources.max_concurrent
    busy = sum(line.epoch_s for line in lines)
    table = pd.read_csv(root / QUICKSTART / "results.csv", dtype={k: str for k in space.searched_keys})
    untrained = untrained_map(space, space.searched_keys)
    gains = []
    print("\nquickstart: best mAP against the same model untrained (%)")
    for _, row in table.iterrows():
        key = tuple(str(row[k]) for k in space.searched_keys)
        before = untrained[key]
        gains.append(float(row["best_mAP"]) / before)
        print(f"  {' '.join(f'{k}={v}' for k, v in zip(space.searched_keys, key)):70s} "
              f"untrained {before:5.2f}  best {float(row['best_mAP']):5.2f}  x{gains[-1]:.2f}")
    return {"wall_s": wall, "slots": slots, "share": busy / (wall * slots), "lines": lines,
            "trials": len(table), "best_mAP": float(table["best_mAP"].max()), "min_gain": min(gains)}


# ---- callbacks ------------------------------------------------------------------------------------------

def _result(epoch: int, trial_index: int) -> dict[str, Any]:
    """A result shaped like a worker's (study.trial.worker.result_of), evaluated every epoch."""
    from study.trial.worker import empty_state, result_of, update_state

    state = empty_state()
    for e in range(1, epoch + 1):
        value = 10.0 + e + trial_index % 7
        update_state(state, {"mAP": value, "R1": value + 5, "R5": value + 9, "R10": value + 12, "mINP": value / 2,
                             "cmc": [min(100.0, value + r) for r in range(20)]}, e, "mAP", "max")
    train = {"loss/total": 3.0 / epoch, "loss/ce": 2.0, "loss/metric": 1.0 / epoch, "hard/pos": 1.0,
             "hard/neg": 10.0, "dict/fill": 0.5, "lr": 1e-3, "images_per_s": 50.0, "epoch": epoch}
    out = result_of(train, state, 0, {"world_size": 1, "ddp_backend": "none"})
    out.update(epoch_s=5.0, eval_s=1.0, time_this_iter_s=5.2, training_iteration=epoch, trial_id=str(trial_index))
    return out


def callback_costs(trial_count: int, root: Path) -> dict[str, float]:
    """Milliseconds per result of each driver callback with ``trial_count`` trials running, and of one whole
    ``results.csv`` rewrite. Real Tune ``Trial`` objects, real files under ``root``."""
    from ray.tune.experiment import Trial

    from study.record.common import TrialInfo
    from study.record.console import Progress
    from study.record.results_csv import ResultsCsv
    from study.record.tensorboard import TensorBoardHParams

    space = load_space("loss_comparison")
    storage = StudyStorage(root, f"callbacks-{trial_count}")
    info = TrialInfo(space.base, space.searched_keys)
    callbacks = {"results.csv": ResultsCsv(storage, storage.name, info),
                 "tensorboard": TensorBoardHParams(storage, info, space),
                 "console": Progress(info, "mAP", trial_count, stream=io.StringIO())}
    for cb in callbacks.values():
        cb.setup()
    trials = []
    for index in range(trial_count):
        trial = Trial("train_trial", config={"loss.name": ["triplet", "npair", "he"][index % 3],
                                             "framework.name": ["baseline", "moreid"][index % 2],
                                             "train.seed": index}, trial_id=f"t{index:05d}", stub=True)
        trial.set_status(Trial.RUNNING)
        trials.append(trial)
        for cb in callbacks.values():
            cb.on_trial_start(0, trials, trial)
    seconds = {name: [] for name in callbacks}
    for epoch in range(1, CALLBACK_ROUNDS + 1):
        for index, trial in enumerate(trials):
            result = _result(epoch, index)
            trial.update_last_result(result)
            for name, cb in callbacks.items():
                began = time.perf_counter()
                cb.on_trial_result(0, trials, trial, result)
                cb.on_step_end(0, trials)
                seconds[name].append(time.perf_counter() - began)
    csv_cb = callbacks["results.csv"]
    began = time.perf_counter()
    csv_cb.write()
    rewrite = time.perf_counter() - began
    for trial in trials:
        trial.set_status(Trial.TERMINATED)
        for cb in callbacks.values():
            cb.on_trial_complete(0, trials, trial)
    for cb in callbacks.values():
        cb.on_experiment_end(trials)
    out = {"csv_rewrite_ms": 1000 * rewrite}
    for name, values in seconds.items():
        out[f"{name}_mean_ms"] = 1000 * statistics.mean(values)
        out[f"{name}_max_ms"] = 1000 * max(values)
    return out


def print_callback_costs(costs: dict[int, dict[str, float]]) -> None:
    print(f"\ndriver callbacks, ms per result ({CALLBACK_ROUNDS} results per trial; mean / worst):")
    print(f"  {'trials':>6s} {'results.csv':>16s} {'tensorboard':>16s} {'console':>16s} {'csv rewrite':>12s}")
    for count, c in costs.items():
        cells = [f"{c[f'{n}_mean_ms']:6.2f} / {c[f'{n}_max_ms']:6.1f}" for n in ("results.csv", "tensorboard", "console")]
        print(f"  {count:6d} {cells[0]:>16s} {cells[1]:>16s} {cells[2]:>16s} {c['csv_rewrite_ms']:10.1f} ms")


# ---- ASHA vs grid ---------------------------------------------------------------------------------------

def space_dict(name: str, asha: bool) -> dict[str, Any]:
    return {
        "name": name,
        "description": "benchmark: learning rate x loss",
        "base": {
            "data": {"dataset": "synthetic", "height": 64, "width": 32, "batch_size": 16, "num_instance": 4,
                     "workers": 0, "random_erasing": 0.0,
                     "synthetic": {"ids": 24, "cams": 2, "images_per_id_cam": 4, "height": 64, "width": 32}},
            "model": {"arch": "resnet18"},
            "framework": {"name": "moreid", "dict_size": 256},
            "train": {"epochs": 8, "iters_per_epoch": 4, "eval_period": 1, "device": "cpu"},
            "eval": {"batch_size": 64},
        },
        "parameters": {"optim.lr": {"type": "grid", "values": [3e-3, 1e-3, 3e-4, 1e-4]},
                       "loss.name": {"type": "grid", "values": ["triplet", "he"]}},
        "searcher": "grid",
        "scheduler": {"type": "asha", "grace_epochs": 1, "reduction_factor": 2} if asha else {"type": "none"},
        "resources": {"max_concurrent": 2, "workers_per_trial": 1, "cpus_per_worker": 1},
    }


def run_one(root: Path, asha: bool) -> dict[str, Any]:
    name = "asha" if asha else "grid"
    space = parse_space(space_dict(name, asha), source=f"benchmark:{name}")
    wall, timer = timed_study(space, root)
    table = pd.read_csv(root / name / "results.csv")
    best = table.loc[table["best_mAP"].idxmax()]
    return {"wall_s": wall, "epochs": int(table["epochs"].sum()), "trials": len(table),
            "stopped": int((table["status"] == "STOPPED").sum()), "best_mAP": float(best["best_mAP"]),
            "best_config": (float(best["optim.lr"]), str(best["loss.name"])), "lines": timer.timelines()}


def asha_vs_grid(root: Path) -> dict[str, float]:
    grid = run_one(root, asha=False)
    asha = run_one(root, asha=True)
    print(f"\n{'study':20s} {'trials':>6s} {'stopped':>7s} {'epochs':>6s} {'wall s':>7s} {'best mAP':>8s}  best config")
    for label, r in (("grid (full budget)", grid), ("ASHA", asha)):
        print(f"{label:20s} {r['trials']:6d} {r['stopped']:7d} {r['epochs']:6d} {r['wall_s']:7.1f} "
              f"{r['best_mAP']:8.2f}  lr={r['best_config'][0]:g} loss={r['best_config'][1]}")
    print_breakdown("ASHA vs grid trials", grid["lines"] + asha["lines"])
    return {
        "study_grid_epochs": float(grid["epochs"]),
        "study_asha_epochs": float(asha["epochs"]),
        "study_asha_epoch_fraction": asha["epochs"] / grid["epochs"],
        "study_grid_wall_s": grid["wall_s"],
        "study_asha_wall_s": asha["wall_s"],
        "study_grid_best_mAP": grid["best_mAP"],
        "study_asha_best_mAP": asha["best_mAP"],
        "study_asha_kept_best_config": float(asha["best_config"] == grid["best_config"]),
    }


def load_average() -> float:
    return os.getloadavg()[0]


def run(quick: bool) -> dict[str, float]:
    figures: dict[str, float] = {"study_load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="moreid-bench-study-") as tmp:
        root = Path(tmp)
        costs = {count: callback_costs(count, root) for count in CALLBACK_TRIALS}
        print_callback_costs(costs)
        at_100 = costs[100]
        figures["callback_ms_per_result_100"] = max(at_100[f"{n}_mean_ms"] for n in ("results.csv", "tensorboard", "console"))
        figures["callback_worst_ms_100"] = max(at_100[f"{n}_max_ms"] for n in ("results.csv", "tensorboard", "console"))
        figures["csv_rewrite_ms_300"] = costs[300]["csv_rewrite_ms"]

        qs = run_quickstart(root)
        medians = print_breakdown("quickstart trials", qs["lines"])
        print(f"\nquickstart: {qs['trials']} trials, {qs['wall_s'] / 60:.2f} min wall ({qs['slots']} at once), "
              f"training + evaluation {100 * qs['share']:.0f}% of its core time, best mAP {qs['best_mAP']:.1f}")
        figures.update({
            "trial_overhead_s": medians["overhead_s"],
            "trial_launch_s": medians["launch_s"],
            "trial_build_s": medians["build_s"],
            "trial_teardown_s": medians["teardown_s"],
            "quickstart_train_share": qs["share"],
            "quickstart_wall_min": qs["wall_s"] / 60,
            "quickstart_min_gain_over_untrained": qs["min_gain"],
        })
        if not quick:
            figures.update(asha_vs_grid(root))
    figures["study_load_after"] = load_average()
    print(f"load average (1 min): {figures['study_load_before']:.1f} before, {figures['study_load_after']:.1f} after")
    return figures


if __name__ == "__main__":
    print(run(quick=True))
