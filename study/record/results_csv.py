"""``results.csv``: one row per trial, rewritten atomically as trials start, report, end and fail.

Status of a trial: ``RUNNING`` (started or retrying), ``TERMINATED`` (ran its full budget of
``train.epochs``), ``STOPPED`` (stopped early by the scheduler), ``ERROR`` (failed after its retries).
"""
from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
from typing import Any, Mapping

from ray.tune import Callback
from ray.tune.experiment import Trial

from reid_core.config import EVAL_METRICS
from study.driver.storage import StudyStorage
from study.trial.errors import TRIAL_ERROR_KEY
from study.layout import RESULTS_FILE
from study.record.common import (FIXED_COLUMNS, RUN_COLUMNS, TrialInfo, config_cell, failure_reason, metric_cell,
                                 finite_number)

# results.csv is rewritten for epoch results at most this often (seconds); trial starts and ends at once.
CSV_WRITE_PERIOD_S = 2.0


class ResultsCsv(Callback):
    """Keeps one row per trial and rewrites ``results.csv`` atomically (temporary file, fsync, rename: tens
    of ms on a busy disk). A trial's start, end or failure rewrites it at once; epoch results at most every
    :data:`CSV_WRITE_PERIOD_S` seconds, in a background thread, so that a result costs the driver well under
    a millisecond whatever the number of trials (the file lags the latest results by a few seconds). Writes
    carry a version number, and an older text never replaces a newer one."""

    def __init__(self, storage: StudyStorage, study: str, info: TrialInfo) -> None:
        self.storage = storage
        self.study = study
        self.info = info
        self.rows: dict[str, dict[str, str]] = {}
        self.order: list[str] = []
        self._columns: dict[str, None] = {}  # columns beyond FIXED_COLUMNS, in first-seen order
        self._dirty = False
        self._written_at = -math.inf
        self._version = 0  # of the rows; the file holds _stored
        self._stored = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"], state["_thread"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---- state across driver restarts (Tune checkpoints it with the experiment) ----
    def get_state(self) -> dict | None:
        return {"rows": self.rows, "order": self.order}

    def set_state(self, state: dict) -> None:
        self.rows, self.order = dict(state["rows"]), list(state["order"])
        self._index_columns()

    def _index_columns(self) -> None:
        self._columns = {}
        for trial_id in self.order:
            self._add_columns(self.rows[trial_id])

    def _add_columns(self, row: Mapping[str, str]) -> None:
        """Columns of ``row`` not seen yet (a trial's first result may bring some its start had not:
        eval.rerank metrics), in first-seen order."""
        for key in row:
            if key not in self._columns and key not in FIXED_COLUMNS:
                self._columns[key] = None

    def setup(self, **info: Any) -> None:
        if not self.rows:  # a resumed study without callback state: take the rows already written
            text = self.storage.read_text(RESULTS_FILE)
            if text:
                for row in csv.DictReader(io.StringIO(text)):
                    self.rows[row["trial_id"]] = dict(row)
                    self.order.append(row["trial_id"])
            self._index_columns()

    # ---- events ----
    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._update(trial, "RUNNING", trial.last_result or {})
        self.write()

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        if result.get(TRIAL_ERROR_KEY):  # its failure follows (unless the study stops it first): ERROR now
            self._update(trial, "ERROR", result, error=str(result[TRIAL_ERROR_KEY]))
            return
        self._update(trial, "RUNNING", result)
        self._maybe_write()

    def on_trial_recover(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._update(trial, "RUNNING", trial.last_result or {})
        self.write()

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get(TRIAL_ERROR_KEY):  # stopped (the study ending) between its error and its failure
            self._update(trial, "ERROR", result, error=str(result[TRIAL_ERROR_KEY]))
            return
        epochs = int(result.get("epoch", 0) or 0)
        self._update(trial, "TERMINATED" if epochs >= self.info.epochs(trial) else "STOPPED", result)
        self.write()

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._update(trial, "ERROR", trial.last_result or {}, error=failure_reason(trial))
        self.write()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._maybe_write()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._dirty or self._stored < self._version:
            self.write()

    def _update(self, trial: Trial, status: str, result: Mapping[str, Any], error: str = "") -> None:
        row = self.rows.get(trial.trial_id, {})
        row.update(self.row(trial, status, result) if result.get("epoch") or not row else {"status": status})
        row["error"] = error
        if trial.trial_id not in self.rows:
            self.order.append(trial.trial_id)
        self._add_columns(row)
        self.rows[trial.trial_id] = row
        self._dirty = True
        self._version += 1

    def _maybe_write(self) -> None:
        """Rewrite the file in the background when results arrived and the last rewrite is
        :data:`CSV_WRITE_PERIOD_S` old (and the previous background write is done)."""
        if not self._dirty or time.monotonic() - self._written_at < CSV_WRITE_PERIOD_S:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        text, version = self.text(), self._version
        self._dirty, self._written_at = False, time.monotonic()
        self._thread = threading.Thread(target=self._store, args=(text, version), name="results.csv", daemon=True)
        self._thread.start()

    def _store(self, text: str, version: int) -> None:
        with self._lock:
            if version > self._stored:
                self.storage.write_text(RESULTS_FILE, text)
                self._stored = version

    def row(self, trial: Trial, status: str, result: Mapping[str, Any]) -> dict[str, str]:
        evaluated = int(result.get("eval_epoch", 0) or 0) > 0
        row = {"study": self.study, "trial_id": trial.trial_id, "status": status,
               "epochs": str(int(result.get("epoch", 0) or 0))}
        reranked = [f"{k}_rerank" for k in EVAL_METRICS if f"{k}_rerank" in result]  # with eval.rerank
        for key in (*EVAL_METRICS, *reranked):
            row[f"final_{key}"] = metric_cell(finite_number(result.get(key))) if evaluated else ""
            row[f"best_{key}"] = metric_cell(finite_number(result.get(f"best_{key}"))) if evaluated else ""
        row["best_epoch"] = str(int(result["best_epoch"])) if evaluated and result.get("best_epoch") else ""
        cmc = result.get("best_cmc") or []
        row["cmc"] = json.dumps([round(float(c), 4) for c in cmc]) if evaluated and cmc else ""
        row["searched"] = ";".join(self.info.searched)
        skipped = finite_number(result.get("skipped_images"))
        row["skipped_images"] = str(int(skipped)) if skipped is not None else ""
        row.update({key: str(result[key]) for key in RUN_COLUMNS if key in result})
        row.update({key: config_cell(value) for key, value in self.info.flat(trial).items()})
        return row

    def columns(self) -> list[str]:
        extra = list(self._columns)
        reranked = [k for k in extra if k.endswith("_rerank")]  # eval.rerank metrics: beside the plain ones
        return [*FIXED_COLUMNS, *reranked, *(k for k in extra if not k.endswith("_rerank"))]

    def text(self) -> str:
        """The whole CSV text of the rows."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns(), restval="", lineterminator="\n")
        writer.writeheader()
        for trial_id in self.order:
            writer.writerow(self.rows[trial_id])
        return buffer.getvalue()

    def write(self) -> None:
        """Rewrite ``results.csv`` now, atomically (a temporary file renamed into place)."""
        self._version += 1  # newer than anything a background write holds
        text, version = self.text(), self._version
        self._dirty, self._written_at = False, time.monotonic()
        self._store(text, version)
