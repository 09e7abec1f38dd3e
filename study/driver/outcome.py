"""How a study ended: the outcome read from ``results.csv``, the closing summary printed on the console and
the report (``results.md``, plots, parameter importances) written into the study folder."""
from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from study.driver.guards import SAME_ERROR_TRIALS
from study.driver.storage import StudyStorage
from study.layout import RESULTS_FILE, TENSORBOARD_DIR
from study.results import write_report as report
from study.results.importance import append_importances
from study.results.summary import closing_summary
from study.space import SearchSpace


@dataclass
class Outcome:
    """How a study's trials ended, from results.csv: ``finished`` ran to their end (TERMINATED or
    STOPPED by the scheduler), ``errors`` failed; ``same_error``: the message when the study stopped
    because its first trials all failed on one deterministic error."""

    total: int
    finished: int = 0
    errors: int = 0
    same_error: str = ""

    @property
    def complete(self) -> bool:
        return self.finished == self.total

    @property
    def interrupted(self) -> bool:
        return self.finished + self.errors < self.total and not self.same_error


def study_outcome(storage: StudyStorage, total: int) -> Outcome:
    out = Outcome(total)
    path = storage.path(RESULTS_FILE)
    if not path.is_file():
        return out
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    out.finished = int(table["status"].isin(["TERMINATED", "STOPPED"]).sum())
    failed = table[table["status"] == "ERROR"]
    out.errors = len(failed)
    messages = set(failed.get("error", pd.Series(dtype=str)))
    if (not out.finished and out.errors >= min(total, SAME_ERROR_TRIALS) and len(messages) == 1
            and "traceback:" not in next(iter(messages))):
        out.same_error = next(iter(messages))
    return out


def print_summary(space: SearchSpace, storage: StudyStorage, seconds: float, outcome: Outcome | None = None,
                  record: Any = None) -> None:
    path = storage.path(RESULTS_FILE)
    how = "done" if outcome is None or outcome.complete else (
        f"ended with {outcome.finished} of {outcome.total} trials finished" + (f", {outcome.errors} failed"
                                                                              if outcome.errors else ""))
    print(f"\nstudy {storage.name} {how} in {seconds / 60:.1f} min", flush=True)
    if path.is_file():
        table = pd.read_csv(path)
        metric = f"best_{space.metric}"
        tails = [k.split(".")[-1] for k in space.searched_keys]
        short = {k: (t if tails.count(t) == 1 else k) for k, t in zip(space.searched_keys, tails)}
        columns = ["trial_id", "status", "epochs", *space.searched_keys, f"final_{space.metric}", metric,
                   "best_R1", "best_mINP", "best_epoch"]
        if "skipped_images" in table and (pd.to_numeric(table["skipped_images"], errors="coerce") > 0).any():
            columns.append("skipped_images")
        if "error" in table and table["error"].notna().any():
            columns.append("error")
        shown = table[[c for c in columns if c in table.columns]].rename(columns=short)
        shown = shown.sort_values(metric, ascending=space.mode == "min", na_position="last")
        metrics = {c for c in shown.columns if c.startswith(("final_", "best_")) and c != "best_epoch"}
        formatters = {c: (lambda v: "" if pd.isna(v) else f"{v:.2f}") if c in metrics else
                      (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)) for c in shown.columns}
        print(shown.to_string(index=False, formatters=formatters))
        print("\n" + "\n".join(closing_summary(table, space.searched_keys, space.metric, space.mode,
                                                   study=storage.location())))
    print(f"\nresults table : {storage.location(RESULTS_FILE)}")
    print(f"TensorBoard   : {storage.location(TENSORBOARD_DIR)}   (tensorboard --logdir {storage.location(TENSORBOARD_DIR)})")
    print(f"Tune folder   : {storage.uri}   (trials, checkpoints; resume with --resume)")
    if record is not None:
        print(f"Optuna record : optuna-dashboard {record.url}")
    if storage.remote:
        print(f"local copy    : {storage.local}")


def write_study_report(storage: StudyStorage, partial: str = "", record: Any = None) -> None:
    """``study.results.write_report`` (results.md and plots). ``partial``:
    a line that heads results.md when not every trial finished. ``record``: the study's Optuna record,
    whose parameter importances are appended."""
    try:
        path = report(storage.local)
        if record is not None:
            append_importances(record, path)
    except Exception:  # the study itself succeeded: report the failure loudly and keep the exit status
        traceback.print_exc()
        print(f"results.md NOT written: study.results.write_report({storage.local}) failed (traceback above)",
              file=sys.stderr, flush=True)
        return
    if partial and Path(path).is_file():
        Path(path).write_text(f"**{partial}**\n\n{Path(path).read_text()}")
    for name in ("results.md", "plots"):
        if storage.path(name).exists():
            storage.upload(name)
    print(f"report        : {storage.location(Path(path).name)}", flush=True)
