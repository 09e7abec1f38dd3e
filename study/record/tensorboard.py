"""TensorBoard with HParams: per trial a run of per-epoch scalars and the HParams session records, and the
study's experiment summary in ``tensorboard/`` itself."""
from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from reid_core.config import EVAL_METRICS
from study.driver.storage import StudyStorage
from study.layout import TENSORBOARD_DIR
from study.record.common import TrialInfo, finite_number
from study.trial.errors import TRIAL_ERROR_KEY
from study.record.hparams import experiment_summary, hparam_keys, run_name
from study.space import SearchSpace

# TensorBoard event files of running trials reach the disk at most this many seconds late (the writer's
# background thread flushes them), at once when a trial ends; a remote study URI gets copies as often.
TB_FLUSH_PERIOD_S = 10.0
# Result keys that are Tune / Train bookkeeping, not metrics.
_NOT_METRICS = {"epoch", "eval_epoch", "best_epoch", "start_epoch", "world_size", "training_iteration", "timestamp",
                "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore",
                "pid", "done", "checkpoint_dir_name", "should_checkpoint", "trial_id"}


def session_end_summary(success: bool) -> Any:
    """The HParams plugin's session-end record (``tensorboard.plugins.hparams.summary.session_end_pb``
    needs TensorFlow; this builds the same protobuf from the plugin's metadata helpers)."""
    status = api_pb2.Status.Value("STATUS_SUCCESS" if success else "STATUS_FAILURE")
    data = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time()))
    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(data),
                      tensor=metadata.NULL_TENSOR)
    return summary


def add_summary(writer: Any, summary: Any, step: int = 0) -> None:
    """Queue a Summary protobuf as one event of ``writer`` (an ``EventFileWriter``)."""
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))


class TensorBoardHParams(Callback):
    """Per trial ``tensorboard/<run name>/`` (:func:`study.record.hparams.run_name`: ``003 lr=0.001 name=he``):
    per-epoch scalars (training metrics under their own names, evaluations under ``eval/``, the best so far
    under ``best/``; x axis: epochs) and the HParams plugin's session start/end records in the same run;
    ``tensorboard/`` itself holds the experiment summary (:func:`study.record.hparams.experiment_summary`), so that
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
        if not any(self.storage.path(TENSORBOARD_DIR).glob("events.out.tfevents.*")):
            writer = EventFileWriter(str(self.storage.path(TENSORBOARD_DIR)))
            add_summary(writer, experiment_summary(self.space))
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
            writer = EventFileWriter(str(self.storage.path(f"{TENSORBOARD_DIR}/{self.run(trial)}")),
                                     flush_secs=TB_FLUSH_PERIOD_S)
            add_summary(writer, summary_v2.hparams_pb(self.hparams(trial), trial_id=self.run(trial),
                                                       start_time_secs=time.time()))
            self._writers[trial.trial_id] = writer
        return writer

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._writer(trial).flush()
        self.storage.upload(f"{TENSORBOARD_DIR}/{self.run(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        """All of an epoch's scalars go in one event (one summary with a value per tag)."""
        writer = self._writer(trial)
        epoch = int(result.get("epoch", 0) or 0)
        evaluated_now = int(result.get("eval_epoch", 0) or 0) == epoch and epoch > 0
        values: list[tuple[str, float]] = []
        for key, value in result.items():
            number = finite_number(value)
            if number is None or key in _NOT_METRICS or key.startswith(("config", "time_", "best_")):
                continue
            if key in EVAL_METRICS or key.removesuffix("_rerank") in EVAL_METRICS:
                if evaluated_now:
                    values.append((f"eval/{key}", number))
                continue
            values.append((key, number))
        if evaluated_now:
            for key in EVAL_METRICS:
                number = finite_number(result.get(f"best_{key}"))
                if number is not None:
                    values.append((f"best/{key}", number))
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=number)
                                             for tag, number in values])
        add_summary(writer, summary, step=epoch)
        now = time.monotonic()
        if self.storage.remote and now - self._flushed.get(trial.trial_id, -math.inf) >= TB_FLUSH_PERIOD_S:
            writer.flush()  # a remote copy needs the events on disk first
            self._flushed[trial.trial_id] = now
            self.storage.upload(f"{TENSORBOARD_DIR}/{self.run(trial)}")

    def _end(self, trial: Trial, success: bool) -> None:
        writer = self._writer(trial)
        add_summary(writer, session_end_summary(success))
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
