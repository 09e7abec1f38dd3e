"""What the driver-side records share: the study folder's file names, the columns of ``results.csv``, a
trial's Config as the records see it (:class:`TrialInfo`), number formatting and a failed trial's reason.

The records (:mod:`.results_csv`, :mod:`.tensorboard`, :mod:`.console`, :mod:`.optuna`) are Tune callbacks
that run in the driver process, so their files land in the study folder even when the trials run on a
cluster (a remote study URI gets a copy after every rewrite, see :mod:`study.driver.storage`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from reid_core.config import EVAL_METRICS, Config, flatten
from study.space.plan import params_key, trial_params
from study.space.schema import trial_config
from study.trial.errors import TRIAL_ERROR_KEY

if TYPE_CHECKING:  # only annotations: the driver's checks read this module's file names before Ray is imported
    from ray.tune.experiment import Trial

# Reported by every trial with its results (study.trial.worker): the global batch of a step, the workers
# sharing it and each one's share; what model.pretrained loaded (empty for random init: no file).
RUN_COLUMNS = ("batch_global", "workers", "batch_per_worker", "pretrained/form", "pretrained/loaded",
               "pretrained/skipped", "pretrained/missing_non_local", "pretrained/path")
FIXED_COLUMNS = ("study", "trial_id", "status", "epochs",
                 *(f"final_{k}" for k in EVAL_METRICS), *(f"best_{k}" for k in EVAL_METRICS),
                 "best_epoch", "cmc", "searched", "skipped_images", *RUN_COLUMNS, "error")


def finite_number(value: Any) -> float | None:
    """A finite int or float as a float; None for anything else (missing, NaN, a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def metric_cell(value: Any) -> str:
    """A metric (percent) with 4 decimals; empty when missing."""
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def config_cell(value: Any) -> str:
    """A config value, exactly (``repr`` of a float keeps 1e-06)."""
    return repr(value) if isinstance(value, float) else str(value)


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


class TrialInfo:
    """The flattened Config of a trial as the records see it: the one the plan validated for a planned trial
    (``planned``: :func:`study.space.planned_configs`), else built once from its Tune config and the base."""

    def __init__(self, base: Mapping[str, Any], searched: Iterable[str],
                 planned: Mapping[str, Config] | None = None) -> None:
        self.base = dict(base)
        self.searched = list(searched)
        self.planned = dict(planned or {})
        self._flat: dict[str, dict[str, Any]] = {}

    def flat(self, trial: Trial) -> dict[str, Any]:
        if trial.trial_id not in self._flat:
            cfg = self.planned.get(params_key(trial.config))
            if cfg is None:
                cfg = trial_config(self.base, trial_params(trial.config))
            self._flat[trial.trial_id] = flatten(cfg)
        return self._flat[trial.trial_id]

    def epochs(self, trial: Trial) -> int:
        """The trial's budget (``train.epochs``)."""
        return int(self.flat(trial)["train.epochs"])
