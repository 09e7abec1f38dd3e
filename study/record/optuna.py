"""The Optuna recorder: writes each Tune trial's intermediate values and final state into its Optuna trial
of the study's record (:class:`~study.search.optuna_record.OptunaRecord`, which the searcher fills with
the trials it creates)."""
from __future__ import annotations

import math
from typing import Any

from optuna.trial import FrozenTrial, TrialState
from ray.tune import Callback
from ray.tune.experiment import Trial

from study.search.optuna_record import CELL_KEY, OptunaRecord


class OptunaRecorder(Callback):
    """Writes each Tune trial's intermediate values and final state into its Optuna trial (see the module
    docstring). Runs in the driver, after the searcher, for every trial the searcher created."""

    def __init__(self, record: OptunaRecord, metric: str, budgets: Any) -> None:
        """``budgets``: ``budget(trial) -> int``, a trial's ``train.epochs``."""
        self.record = record
        self.metric = metric
        self.budget = budgets
        self._checked = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_checked": False}

    def _optuna_trial(self, trial: Trial) -> tuple[int, FrozenTrial] | None:
        cell = trial.config.get(CELL_KEY)
        if cell is None:
            return None
        found = self.record.find(int(cell), trial.trial_id)
        return (int(cell), found) if found is not None else None

    def _live(self, trial: Trial) -> tuple[int, FrozenTrial] | None:
        """The Tune trial's Optuna trial, RUNNING; a FAIL one (a retried errored trial) gets a RUNNING
        successor with the same parameters. None when it already finished otherwise (the driver died
        after recording it: nothing to write twice)."""
        pair = self._optuna_trial(trial)
        if pair is None:
            return None
        cell, frozen = pair
        if frozen.state == TrialState.RUNNING:
            return pair
        if frozen.state != TrialState.FAIL:
            return None
        attrs = {k: v for k, v in frozen.user_attrs.items() if k != "note"}
        successor = self.record.add_running(cell, frozen.params, frozen.distributions,
                                            {**attrs, "retry_of": frozen.number})
        return cell, successor

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._checked:
            return
        self._checked = True  # a resumed study: trials Tune finished while the record missed it
        for trial in trials:
            if trial.status in (Trial.TERMINATED, Trial.ERROR):
                pair = self._optuna_trial(trial)
                if pair is not None and pair[1].state == TrialState.RUNNING:
                    self._end(trial, error=trial.status == Trial.ERROR)

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        epoch = int(result.get("epoch", 0) or 0)
        value = result.get(self.metric)
        if int(result.get("eval_epoch", 0) or 0) != epoch or epoch <= 0 or not finite(value):
            return
        pair = self._live(trial)
        if pair is not None:
            self.record.report(pair[1], epoch, float(value))

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, error=True)

    def _end(self, trial: Trial, *, error: bool) -> None:
        pair = self._live(trial)
        if pair is None:
            return
        cell, frozen = pair
        result = trial.last_result or {}
        epochs = int(result.get("epoch", 0) or 0)
        value = result.get(self.metric)
        for key in (f"best_{self.metric}", "best_epoch"):
            if finite(result.get(key)):
                self.record.set_attr(frozen, key, float(result[key]))
        self.record.set_attr(frozen, "epochs", epochs)
        if error:
            state = TrialState.FAIL
        elif epochs >= self.budget(trial) and finite(value):
            state = TrialState.COMPLETE
        else:
            state = TrialState.PRUNED
        self.record.finish(cell, frozen, state, float(value) if state == TrialState.COMPLETE else None)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Trials the database holds as RUNNING that no Tune trial carries on are marked FAIL."""
        unfinished = {t.trial_id for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR)}
        for cell in sorted({self.record.names.index(n) for n in self.record.unique_names()}):
            for frozen in self.record.orphans(cell, unfinished):
                self.record.set_attr(frozen, "note", "never ran: the driver stopped before Tune recorded it")
                self.record.finish(cell, frozen, TrialState.FAIL)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
