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
import sys
import threading
import time
from typing import Any, Iterable, Mapping, TextIO

from ray.tune import Callback, Stopper
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from reid_core.config import flatten
from study.hparams import experiment_summary, hparam_keys, run_name
from study.preflight import TRIAL_ERROR_KEY
from study.space import SearchSpace, trial_config
from study.storage import StudyStorage
from study.trainable import trial_params

EVAL_KEYS = ("mAP", "R1", "R5", "R10", "mINP")
FIXED_COLUMNS = ("study", "trial_id", "status", "epochs",
                 *(f"final_{k}" for k in EVAL_KEYS), *(f"best_{k}" for k in EVAL_KEYS),
                 "best_epoch", "cmc", "searched", "skipped_images", "error")
RESULTS_FILE = "results.csv"
TENSORBOARD_DIR = "tensorboard"
# results.csv is rewritten for epoch results at most this often (seconds); trial starts and ends at once.
CSV_WRITE_PERIOD_S = 2.0
# TensorBoard event files of running trials reach the disk at most this many seconds late (the writer's
# background thread flushes them), at once when a trial ends; a remote study URI gets copies as often.
TB_FLUSH_PERIOD_S = 10.0
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


# The study stops when this many trials (or all, when fewer) failed on one deterministic error and
# none has finished: the rest would fail the same way.
SAME_ERROR_TRIALS = 2


def failure_reason(trial: Trial) -> str:
    """Why a trial failed, in one line: a deterministic error's message as the trial reported it, else
    the last line of the exception and where the full traceback is."""
    message = (trial.last_result or {}).get(TRIAL_ERROR_KEY)
    if message:
        return str(message)
    try:
        path = trial.error_file
    except AttributeError:  # a trial that never had storage (it did not start)
        path = None
    lines: list[str] = []
    if path:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = [line.strip() for line in fh if line.strip()]
        except OSError:
            pass
    last = lines[-1] if lines else "unknown error"
    return f"{last} (traceback: {path})" if path else last


class NoRetryOnTrialError(Callback):
    """A trial that reported a deterministic error (:data:`~study.preflight.TRIAL_ERROR_KEY`) is not
    retried by Tune: its failure budget is spent, so the failure that follows ends it as ERROR."""

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        if result.get(TRIAL_ERROR_KEY):
            trial.max_failures = 0


class SameErrorStopper(Stopper):
    """Stops the study once its first ``limit`` trials reported the same deterministic error and no trial
    has trained an epoch (each trial reports one result before it fails)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.errors: dict[str, str] = {}
        self.trained = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        message = result.get(TRIAL_ERROR_KEY)
        if message:
            self.errors[trial_id] = str(message)
        elif int(result.get("epoch", 0) or 0) > 0:
            self.trained = True
        return False

    def stop_all(self) -> bool:
        return (not self.trained and len(self.errors) >= self.limit
                and len(set(self.errors.values())) == 1)


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


def _add_summary(writer: Any, summary: Any, step: int = 0) -> None:
    """Queue a Summary protobuf as one event of ``writer`` (an ``EventFileWriter``)."""
    from tensorboard.compat.proto import event_pb2

    writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))


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
        reranked = [f"{k}_rerank" for k in EVAL_KEYS if f"{k}_rerank" in result]  # with eval.rerank
        for key in (*EVAL_KEYS, *reranked):
            row[f"final_{key}"] = _cell(_number(result.get(key))) if evaluated else ""
            row[f"best_{key}"] = _cell(_number(result.get(f"best_{key}"))) if evaluated else ""
        row["best_epoch"] = str(int(result["best_epoch"])) if evaluated and result.get("best_epoch") else ""
        cmc = result.get("best_cmc") or []
        row["cmc"] = json.dumps([round(float(c), 4) for c in cmc]) if evaluated and cmc else ""
        row["searched"] = ";".join(self.info.searched)
        skipped = _number(result.get("skipped_images"))
        row["skipped_images"] = str(int(skipped)) if skipped is not None else ""
        row.update({key: _config_cell(value) for key, value in self.info.flat(trial).items()})
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
        self._flushed: dict[str, float] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_writers"] = {}
        state["_flushed"] = {}
        return state

    def get_state(self) -> dict | None:
        return {"runs": self.runs}

    def set_state(self, state: dict) -> None:
        self.runs = dict(state["runs"])

    def setup(self, **info: Any) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        if not any(self.storage.path(TENSORBOARD_DIR).glob("events.out.tfevents.*")):
            writer = EventFileWriter(str(self.storage.path(TENSORBOARD_DIR)))
            _add_summary(writer, experiment_summary(self.space))
            writer.close()
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
        """The trial's event file writer (TensorBoard's own: it queues events for a background thread, so
        adding one costs microseconds; torch's SummaryWriter would cost about 1 ms per scalar)."""
        writer = self._writers.get(trial.trial_id)
        if writer is None:
            from tensorboard.plugins.hparams import summary_v2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            writer = EventFileWriter(str(self.storage.path(f"{TENSORBOARD_DIR}/{self.run(trial)}")),
                                     flush_secs=TB_FLUSH_PERIOD_S)
            _add_summary(writer, summary_v2.hparams_pb(self.hparams(trial), trial_id=self.run(trial),
                                                       start_time_secs=time.time()))
            self._writers[trial.trial_id] = writer
        return writer

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._writer(trial).flush()
        self.storage.upload(f"{TENSORBOARD_DIR}/{self.run(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        """All of an epoch's scalars go in one event (one summary with a value per tag)."""
        from tensorboard.compat.proto import summary_pb2

        writer = self._writer(trial)
        epoch = int(result.get("epoch", 0) or 0)
        evaluated_now = int(result.get("eval_epoch", 0) or 0) == epoch and epoch > 0
        values: list[tuple[str, float]] = []
        for key, value in result.items():
            number = _number(value)
            if number is None or key in _NOT_METRICS or key.startswith(("config", "time_", "best_")):
                continue
            if key in EVAL_KEYS or key.removesuffix("_rerank") in EVAL_KEYS:
                if evaluated_now:
                    values.append((f"eval/{key}", number))
                continue
            values.append((key, number))
        if evaluated_now:
            for key in EVAL_KEYS:
                number = _number(result.get(f"best_{key}"))
                if number is not None:
                    values.append((f"best/{key}", number))
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=number)
                                             for tag, number in values])
        _add_summary(writer, summary, step=epoch)
        now = time.monotonic()
        if self.storage.remote and now - self._flushed.get(trial.trial_id, -math.inf) >= TB_FLUSH_PERIOD_S:
            writer.flush()  # a remote copy needs the events on disk first
            self._flushed[trial.trial_id] = now
            self.storage.upload(f"{TENSORBOARD_DIR}/{self.run(trial)}")

    def _end(self, trial: Trial, success: bool) -> None:
        writer = self._writer(trial)
        _add_summary(writer, session_end_summary(success))
        writer.close()
        del self._writers[trial.trial_id]
        self._flushed.pop(trial.trial_id, None)
        self.storage.upload(f"{TENSORBOARD_DIR}/{self.run(trial)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, not (trial.last_result or {}).get(TRIAL_ERROR_KEY))

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class Progress(Callback):
    """The study's console: one line when a trial starts, per evaluation, when it ends and when it fails or
    is retried (then with its error: a config or data error's message, else the exception's last line and
    where its traceback is), and a study-wide bar
    (trials done, running, elapsed, ETA). On a terminal the bar is the last line, redrawn in place; in a
    log file it closes every trial's start and end line instead.

    ETA: the time since the first trial started, scaled by the work left (finished trials count whole,
    running ones by the fraction of their epochs done)."""

    BAR_WIDTH = 24

    def __init__(self, info: TrialInfo, metric: str, total: int, stream: TextIO | None = None) -> None:
        self.info = info
        self.metric = metric
        self.total = total
        self.stream = stream
        self.start = time.time()
        self.first_trial_at: float | None = None
        self.epochs_done: dict[str, int] = {}  # running trials
        self.finished = 0
        self._bar_drawn = False
        self.checkpointed: set[str] = set()  # trials with a checkpoint to retry from
        self.ended: set[str] = set()  # trials whose end this callback has seen

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["stream"] = None
        return state

    def setup(self, **info: Any) -> None:
        self.start = time.time()

    # ---- output ----
    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def _tty(self) -> bool:
        return bool(getattr(self._out(), "isatty", lambda: False)())

    def _clock(self, seconds: float) -> str:
        seconds = max(0, int(seconds))
        return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
            f"{seconds // 60:02d}:{seconds % 60:02d}"

    def bar(self, trials: list) -> str:
        """``[#####.....] 3/8 done, 2 running, 00:41 elapsed, ETA 01:05``."""
        # Tune calls on_trial_complete / on_trial_error before it changes the trial's status
        running = sum(1 for t in trials if t.status == Trial.RUNNING and t.trial_id not in self.ended)
        done = sum(1 for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR) or t.trial_id in self.ended)
        partial = sum(min(1.0, e / max(1, self._budget(tid, trials))) for tid, e in self.epochs_done.items())
        fraction = min(1.0, (done + partial) / max(1, self.total))
        filled = int(round(fraction * self.BAR_WIDTH))
        text = f"[{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {done}/{self.total} done, {running} running"
        if self.first_trial_at is not None:
            elapsed = time.time() - self.first_trial_at
            text += f", {self._clock(elapsed)} elapsed"
            if 0 < fraction < 1:
                text += f", ETA {self._clock(elapsed * (1 - fraction) / fraction)}"
        return text

    def _budget(self, trial_id: str, trials: list) -> int:
        for t in trials:
            if t.trial_id == trial_id:
                return self.info.epochs(t)
        return 1

    def _say(self, text: str, trials: list | None = None, *, bar_inline: bool = False) -> None:
        """Print one line (with the bar after it: redrawn on a terminal, appended when ``bar_inline``)."""
        out = self._out()
        elapsed = time.time() - self.start
        line = f"[{self._clock(elapsed)}] {text}"
        if self._tty():
            out.write("\r\x1b[K" + line + "\n")
            if trials is not None:
                out.write(self.bar(trials))
                self._bar_drawn = True
        else:
            if bar_inline and trials is not None:
                line += f"  | {self.bar(trials)}"
            out.write(line + "\n")
        out.flush()

    def _redraw(self, trials: list) -> None:
        if self._tty():
            self._out().write("\r\x1b[K" + self.bar(trials))
            self._out().flush()
            self._bar_drawn = True

    def _values(self, trial: Trial) -> str:
        flat = self.info.flat(trial)
        return " ".join(f"{k}={_config_cell(flat[k])}" for k in self.info.searched) or "(base config)"

    # ---- events ----
    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        if self.first_trial_at is None:
            self.first_trial_at = time.time()
        self.epochs_done.setdefault(trial.trial_id, 0)
        self.ended.discard(trial.trial_id)  # a resumed errored trial runs again
        self._say(f"{trial.trial_id} started: {self._values(trial)}", trials, bar_inline=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        if result.get(CHECKPOINT_PATH_KEY) or trial.checkpoint:  # a checkpoint, the one a retry starts from
            self.checkpointed.add(trial.trial_id)
        if result.get(TRIAL_ERROR_KEY):
            self._say(f"{trial.trial_id} failed (not retried: a config or data error): {result[TRIAL_ERROR_KEY]}",
                      trials)
            return
        epoch = int(result.get("epoch", 0) or 0)
        self.epochs_done[trial.trial_id] = epoch
        value = _number(result.get(self.metric))
        if value is None or int(result.get("eval_epoch", 0) or 0) != epoch or epoch == 0:
            self._redraw(trials)  # one line per evaluation; other epochs only move the bar
            return
        line = f"{trial.trial_id} epoch {epoch}/{self.info.epochs(trial)}"
        loss = _number(result.get("loss/total"))
        if loss is not None:
            line += f"  loss {loss:.3f}"
        line += f"  {self.metric} {value:.2f}"
        best = _number(result.get(f"best_{self.metric}"))
        if best is not None:
            line += f" (best {best:.2f} @ {int(result.get('best_epoch', 0))})"
        seconds = _number(result.get("epoch_s"))
        if seconds is not None:
            line += f"  {seconds:.1f} s"
        if int(result.get("start_epoch", 0) or 0) > 0 and epoch == int(result["start_epoch"]) + 1:
            line += f"  (resumed from the epoch-{int(result['start_epoch'])} checkpoint)"
        self._say(line, trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self.epochs_done.pop(trial.trial_id, None)
        self.ended.add(trial.trial_id)
        result = trial.last_result or {}
        if result.get(TRIAL_ERROR_KEY):
            self._say(f"{trial.trial_id} ERROR: {result[TRIAL_ERROR_KEY]}", trials, bar_inline=True)
            return
        epochs = int(result.get("epoch", 0) or 0)
        how = "finished" if epochs >= self.info.epochs(trial) else f"stopped early by the scheduler at epoch {epochs}"
        best = _number(result.get(f"best_{self.metric}"))
        tail = f", best {self.metric} {best:.2f}" if best is not None else ""
        self._say(f"{trial.trial_id} {how}{tail}", trials, bar_inline=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        saved = trial.checkpoint or trial.trial_id in self.checkpointed
        how = "retrying from its last checkpoint" if saved else "retrying from the start (no checkpoint yet)"
        self._say(f"{trial.trial_id} failed; {how}: {failure_reason(trial)}", trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self.epochs_done.pop(trial.trial_id, None)
        self.ended.add(trial.trial_id)
        self._say(f"{trial.trial_id} ERROR: {failure_reason(trial)}", trials, bar_inline=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._tty() and self._bar_drawn:
            self._out().write("\r\x1b[K" + self.bar(trials) + "\n")
            self._out().flush()
