"""Driver-side Tune callbacks: ``results.csv``, TensorBoard with HParams, and terminal progress.

They run in the driver process, so their files land in the study folder even when the trials run on a
cluster (a remote study URI gets a copy after every rewrite, see :mod:`study.storage`).

Status of a trial in ``results.csv``: ``RUNNING`` (started or retrying), ``TERMINATED`` (ran its full
budget of ``train.epochs``), ``STOPPED`` (stopped early by the scheduler), ``ERROR`` (failed after its
retries).
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from typing import Any, Iterable, Mapping

from ray.tune import Callback
from ray.tune.experiment import Trial

from reid_core.config import flatten
from study.hparams import experiment_summary, hparam_keys, run_name
from study.space import SearchSpace, trial_config
from study.storage import StudyStorage
from study.trainable import trial_params

EVAL_KEYS = ("mAP", "R1", "R5", "R10", "mINP")
FIXED_COLUMNS = ("study", "trial_id", "status", "epochs",
                 *(f"final_{k}" for k in EVAL_KEYS), *(f"best_{k}" for k in EVAL_KEYS),
                 "best_epoch", "cmc", "searched")
RESULTS_FILE = "results.csv"
TENSORBOARD_DIR = "tensorboard"
# Result keys that are Tune / Train bookkeeping, not metrics.
_NOT_METRICS = {"epoch", "eval_epoch", "best_epoch", "start_epoch", "world_size", "training_iteration", "timestamp",
                "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore",
                "pid", "done", "checkpoint_dir_name", "should_checkpoint", "trial_id"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _cell(value: Any) -> str:
    """A metric (percent) with 4 decimals; empty when missing."""
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _config_cell(value: Any) -> str:
    """A config value, exactly (``repr`` of a float keeps 1e-06)."""
    return repr(value) if isinstance(value, float) else str(value)


class TrialInfo:
    """The Config of a trial, derived once from its Tune config and the study base."""

    def __init__(self, base: Mapping[str, Any], searched: Iterable[str]) -> None:
        self.base = dict(base)
        self.searched = list(searched)
        self._flat: dict[str, dict[str, Any]] = {}

    def flat(self, trial: Trial) -> dict[str, Any]:
        if trial.trial_id not in self._flat:
            self._flat[trial.trial_id] = flatten(trial_config(self.base, trial_params(trial.config)))
        return self._flat[trial.trial_id]

    def epochs(self, trial: Trial) -> int:
        """The trial's budget (``train.epochs``)."""
        return int(self.flat(trial)["train.epochs"])


def session_end_summary(success: bool) -> Any:
    """The HParams plugin's session-end record (``tensorboard.plugins.hparams.summary.session_end_pb``
    needs TensorFlow; this builds the same protobuf from the plugin's metadata helpers)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    status = api_pb2.Status.Value("STATUS_SUCCESS" if success else "STATUS_FAILURE")
    data = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time()))
    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(data),
                      tensor=metadata.NULL_TENSOR)
    return summary


class ResultsCsv(Callback):
    """Keeps one row per trial and rewrites ``results.csv`` atomically whenever a trial reports."""

    def __init__(self, storage: StudyStorage, study: str, info: TrialInfo) -> None:
        self.storage = storage
        self.study = study
        self.info = info
        self.rows: dict[str, dict[str, str]] = {}
        self.order: list[str] = []

    # ---- state across driver restarts (Tune checkpoints it with the experiment) ----
    def get_state(self) -> dict | None:
        return {"rows": self.rows, "order": self.order}

    def set_state(self, state: dict) -> None:
        self.rows, self.order = dict(state["rows"]), list(state["order"])

    def setup(self, **info: Any) -> None:
        if not self.rows:  # a resumed study without callback state: take the rows already written
            text = self.storage.read_text(RESULTS_FILE)
            if text:
                for row in csv.DictReader(io.StringIO(text)):
                    self.rows[row["trial_id"]] = dict(row)
                    self.order.append(row["trial_id"])

    # ---- events ----
    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._update(trial, "RUNNING", trial.last_result or {})

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        self._update(trial, "RUNNING", result)

    def on_trial_recover(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._update(trial, "RUNNING", trial.last_result or {})

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        epochs = int(result.get("epoch", 0) or 0)
        self._update(trial, "TERMINATED" if epochs >= self.info.epochs(trial) else "STOPPED", result)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._update(trial, "ERROR", trial.last_result or {})

    def _update(self, trial: Trial, status: str, result: Mapping[str, Any]) -> None:
        row = self.rows.get(trial.trial_id, {})
        row.update(self.row(trial, status, result) if result.get("epoch") or not row else {"status": status})
        if trial.trial_id not in self.rows:
            self.order.append(trial.trial_id)
        self.rows[trial.trial_id] = row
        self.write()

    def row(self, trial: Trial, status: str, result: Mapping[str, Any]) -> dict[str, str]:
        evaluated = int(result.get("eval_epoch", 0) or 0) > 0
        row = {"study": self.study, "trial_id": trial.trial_id, "status": status,
               "epochs": str(int(result.get("epoch", 0) or 0))}
        reranked = [f"{k}_rerank" for k in EVAL_KEYS if f"{k}_rerank" in result]  # with eval.rerank
        for key in (*EVAL_KEYS, *reranked):
            row[f"final_{key}"] = _cell(_number(result.get(key))) if evaluated else ""
            row[f"best_{key}"] = _cell(_number(result.get(f"best_{key}"))) if evaluated else ""
        row["best_epoch"] = str(int(result["best_epoch"])) if evaluated and result.get("best_epoch") else ""
        cmc = result.get("best_cmc") or []
        row["cmc"] = json.dumps([round(float(c), 4) for c in cmc]) if evaluated and cmc else ""
        row["searched"] = ";".join(self.info.searched)
        row.update({key: _config_cell(value) for key, value in self.info.flat(trial).items()})
        return row

    def columns(self) -> list[str]:
        config_columns: list[str] = []
        for trial_id in self.order:
            config_columns.extend(k for k in self.rows[trial_id] if k not in FIXED_COLUMNS)
        extra = list(dict.fromkeys(config_columns))
        reranked = [k for k in extra if k.endswith("_rerank")]  # eval.rerank metrics: beside the plain ones
        return [*FIXED_COLUMNS, *reranked, *(k for k in extra if not k.endswith("_rerank"))]

    def write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns(), restval="", lineterminator="\n")
        writer.writeheader()
        for trial_id in self.order:
            writer.writerow(self.rows[trial_id])
        self.storage.write_text(RESULTS_FILE, buffer.getvalue())


class TensorBoardHParams(Callback):
    """Per trial ``tensorboard/<run name>/`` (:func:`study.hparams.run_name`: ``003 lr=0.001 name=he``):
    per-epoch scalars (training metrics under their own names, evaluations under ``eval/``, the best so far
    under ``best/``; x axis: epochs) and the HParams plugin's session start/end records in the same run;
    ``tensorboard/`` itself holds the experiment summary (:func:`study.hparams.experiment_summary`), so that
    TensorBoard's HPARAMS tab compares trials by their searched values and mAP."""

    def __init__(self, storage: StudyStorage, info: TrialInfo, space: SearchSpace) -> None:
        self.storage = storage
        self.info = info
        self.space = space
        self.keys = hparam_keys(space)
        self.runs: dict[str, str] = {}  # Tune trial id -> run folder name
        self._writers: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_writers"] = {}
        return state

    def get_state(self) -> dict | None:
        return {"runs": self.runs}

    def set_state(self, state: dict) -> None:
        self.runs = dict(state["runs"])

    def setup(self, **info: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if not any(self.storage.path(TENSORBOARD_DIR).glob("events.out.tfevents.*")):
            with SummaryWriter(str(self.storage.path(TENSORBOARD_DIR))) as writer:
                writer.file_writer.add_summary(experiment_summary(self.space))
            self.storage.upload(TENSORBOARD_DIR)

    def run(self, trial: Trial) -> str:
        """The trial's run folder name (numbered in the order trials start)."""
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = run_name(len(self.runs) + 1, self.hparams(trial))
        return self.runs[trial.trial_id]

    def hparams(self, trial: Trial) -> dict[str, Any]:
        flat = self.info.flat(trial)
        return {key: flat[key] for key in self.keys}

    def _writer(self, trial: Trial) -> Any:
        writer = self._writers.get(trial.trial_id)
        if writer is None:
            from tensorboard.plugins.hparams import summary_v2
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.storage.path(f"{TENSORBOARD_DIR}/{self.run(trial)}")))
            writer.file_writer.add_summary(
                summary_v2.hparams_pb(self.hparams(trial), trial_id=self.run(trial), start_time_secs=time.time()))
            self._writers[trial.trial_id] = writer
        return writer

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._writer(trial).flush()
        self.storage.upload(f"{TENSORBOARD_DIR}/{self.run(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        writer = self._writer(trial)
        epoch = int(result.get("epoch", 0) or 0)
        evaluated_now = int(result.get("eval_epoch", 0) or 0) == epoch and epoch > 0
        for key, value in result.items():
            number = _number(value)
            if number is None or key in _NOT_METRICS or key.startswith(("config", "time_", "best_")):
                continue
            if key in EVAL_KEYS or key.removesuffix("_rerank") in EVAL_KEYS:
                if evaluated_now:
                    writer.add_scalar(f"eval/{key}", number, epoch)
                continue
            writer.add_scalar(key, number, epoch)
        if evaluated_now:
            for key in EVAL_KEYS:
                number = _number(result.get(f"best_{key}"))
                if number is not None:
                    writer.add_scalar(f"best/{key}", number, epoch)
        writer.flush()
        self.storage.upload(f"{TENSORBOARD_DIR}/{self.run(trial)}")

    def _end(self, trial: Trial, success: bool) -> None:
        writer = self._writer(trial)
        writer.file_writer.add_summary(session_end_summary(success))
        writer.close()
        del self._writers[trial.trial_id]
        self.storage.upload(f"{TENSORBOARD_DIR}/{self.run(trial)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, True)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class Progress(Callback):
    """One line per event a person can follow: trial start (with its values), each epoch (loss, mAP),
    early stops, retries and errors, and a count of trials by state."""

    def __init__(self, info: TrialInfo, metric: str, total: int) -> None:
        self.info = info
        self.metric = metric
        self.total = total
        self.start = time.time()

    def setup(self, **info: Any) -> None:
        self.start = time.time()

    def _say(self, text: str) -> None:
        elapsed = time.time() - self.start
        print(f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {text}", flush=True)

    def _counts(self, trials: list) -> str:
        by: dict[str, int] = {}
        for t in trials:
            by[t.status] = by.get(t.status, 0) + 1
        parts = [f"{n} {s.lower()}" for s, n in sorted(by.items())]
        return f"trials: {', '.join(parts)} (of {self.total})"

    def _values(self, trial: Trial) -> str:
        flat = self.info.flat(trial)
        return " ".join(f"{k}={_config_cell(flat[k])}" for k in self.info.searched) or "(base config)"

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._say(f"{trial.trial_id} started: {self._values(trial)}  | {self._counts(trials)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        epoch = int(result.get("epoch", 0) or 0)
        loss = _number(result.get("loss/total"))
        line = f"{trial.trial_id} epoch {epoch}/{self.info.epochs(trial)}"
        if loss is not None:
            line += f"  loss {loss:.3f}"
        value = _number(result.get(self.metric))
        if value is not None and int(result.get("eval_epoch", 0) or 0) > 0:
            line += f"  {self.metric} {value:.2f}"
            best = _number(result.get(f"best_{self.metric}"))
            if best is not None:
                line += f" (best {best:.2f} @ {int(result.get('best_epoch', 0))})"
        seconds = _number(result.get("time_this_iter_s"))
        if seconds is not None:
            line += f"  {seconds:.1f} s"
        if int(result.get("start_epoch", 0) or 0) > 0 and epoch == int(result["start_epoch"]) + 1:
            line += f"  (resumed from the epoch-{int(result['start_epoch'])} checkpoint)"
        self._say(line)

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        epochs = int(result.get("epoch", 0) or 0)
        how = "finished" if epochs >= self.info.epochs(trial) else f"stopped early by the scheduler at epoch {epochs}"
        best = _number(result.get(f"best_{self.metric}"))
        tail = f", best {self.metric} {best:.2f}" if best is not None else ""
        self._say(f"{trial.trial_id} {how}{tail}  | {self._counts(trials)}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._say(f"{trial.trial_id} failed; retrying from its last checkpoint ({trial.error_file or 'no error file'})")

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._say(f"{trial.trial_id} ERROR (see {trial.error_file})  | {self._counts(trials)}")
