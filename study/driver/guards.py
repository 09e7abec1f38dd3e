"""The driver's guards over trials that fail on a deterministic error (:mod:`study.trial.errors`: a config
or data error, a non-finite loss or key, CUDA out-of-memory, a collective error after its one retry): such a
trial is not retried, and the study stops when its first trials all failed on the same one."""
from __future__ import annotations

from typing import Any

from ray.tune import Callback, Stopper
from ray.tune.experiment import Trial

from study.trial.errors import TRIAL_ERROR_KEY

# The study stops when this many trials (or all, when fewer) failed on one deterministic error and
# none has finished: the rest would fail the same way.
SAME_ERROR_TRIALS = 2


class NoRetryOnTrialError(Callback):
    """A trial that reported a deterministic error (:data:`~study.trial.errors.TRIAL_ERROR_KEY`) is not
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
