"""The study's console: a line per trial event and a study-wide progress bar."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from study.trial.errors import TRIAL_ERROR_KEY
from study.record.common import TrialInfo, config_cell, failure_reason, finite_number


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
        return " ".join(f"{k}={config_cell(flat[k])}" for k in self.info.searched) or "(base config)"

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
            self._say(f"{trial.trial_id} failed (not retried: it would fail the same way again): "
                      f"{result[TRIAL_ERROR_KEY]}", trials)
            return
        epoch = int(result.get("epoch", 0) or 0)
        self.epochs_done[trial.trial_id] = epoch
        value = finite_number(result.get(self.metric))
        if value is None or int(result.get("eval_epoch", 0) or 0) != epoch or epoch == 0:
            self._redraw(trials)  # one line per evaluation; other epochs only move the bar
            return
        line = f"{trial.trial_id} epoch {epoch}/{self.info.epochs(trial)}"
        loss = finite_number(result.get("loss/total"))
        if loss is not None:
            line += f"  loss {loss:.3f}"
        line += f"  {self.metric} {value:.2f}"
        best = finite_number(result.get(f"best_{self.metric}"))
        if best is not None:
            line += f" (best {best:.2f} @ {int(result.get('best_epoch', 0))})"
        seconds = finite_number(result.get("epoch_s"))
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
        best = finite_number(result.get(f"best_{self.metric}"))
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
