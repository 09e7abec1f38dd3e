"""How trials are matched to table cells, and which trials of a cell are reported.

A cell is a set of conditions on config columns (``{"loss.name": "he", "framework.name": "moreid"}``).
Its trials are the counted ones (TERMINATED / STOPPED with a metric) that meet every condition.

Those trials are grouped by *configuration*: every config key that can change the result, that is every
key except

- the seed (``train.seed``): trials that differ only in it are seeds of one configuration;
- bookkeeping keys that do not change what is learned (:data:`BOOKKEEPING`: output folder, device,
  data root, worker counts, logging and checkpoint periods, evaluation chunking);
- keys the trial does not use (:func:`unused_keys`): the knobs of the other losses, the MoReID knobs of a
  baseline trial, ``data.autoaug_prob`` without AutoAugment, ``model.gem_p`` with average pooling, the
  synthetic generator's keys on a real dataset.

When a cell holds several configurations, the one with the highest mean mAP is reported (mean +- std
over its seeds) and a footnote names it by the keys where the configurations differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from reid_core.config import LOSSES, LossConfig, config_keys

CONFIG_KEYS = frozenset(config_keys())
SEED_KEY = "train.seed"
BOOKKEEPING = frozenset({
    "train.output_dir", "train.device", "train.log_every", "train.checkpoint_period",
    "data.root", "data.workers", "eval.chunk_size", "eval.memory_budget_mb", "eval.batch_size",
})
_LOSS_KNOBS = {name: {f"loss.{key}" for key in LossConfig.KNOBS[name]} for name in LOSSES}
_ALL_LOSS_KNOBS = frozenset().union(*_LOSS_KNOBS.values())
_MOREID_KNOBS = frozenset({"framework.momentum", "framework.dict_size", "framework.include_past_positives",
                           "framework.test_encoder"})
_FLOAT_TOL = 1e-6


def unused_keys(config: Mapping[str, Any]) -> set[str]:
    """Config keys that a trial with this flattened config does not use."""
    unused = set(_ALL_LOSS_KNOBS - _LOSS_KNOBS.get(config.get("loss.name"), set()))
    if config.get("framework.name") == "baseline":
        unused |= _MOREID_KNOBS
    if config.get("data.autoaug") is False:
        unused.add("data.autoaug_prob")
    if config.get("model.pooling") == "avg":
        unused.add("model.gem_p")
    if config.get("data.dataset") not in (None, "synthetic"):
        unused |= {key for key in CONFIG_KEYS if key.startswith("data.synthetic.")}
    return unused


def configuration(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The identity of a trial's configuration: sorted (key, value) pairs of the keys that matter."""
    skip = unused_keys(config) | BOOKKEEPING | {SEED_KEY}
    return tuple((key, _canonical(config.get(key))) for key in sorted(CONFIG_KEYS - skip))


def add_config_column(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with ``_config`` holding :func:`configuration` of each row."""
    keys = sorted(CONFIG_KEYS & set(frame.columns))
    out = frame.copy()
    out["_config"] = [configuration(dict(zip(keys, values)))
                      for values in frame[keys].itertuples(index=False, name=None)]
    return out


def same_value(a: Any, b: Any) -> bool:
    """Config values equal, floats to within 1e-6 (grid values come back as 1.2000000000000002)."""
    if a is None or b is None or _isnan(a) or _isnan(b):
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= _FLOAT_TOL
    return a == b


def where_mask(frame: pd.DataFrame, where: Mapping[str, Any]) -> pd.Series:
    """Rows of ``frame`` that meet every condition; a condition is a value or a tuple of allowed values."""
    mask = pd.Series(True, index=frame.index)
    for key, wanted in where.items():
        if key not in frame.columns:
            raise KeyError(f"no column {key!r} in the results")
        options = wanted if isinstance(wanted, tuple) else (wanted,)
        mask &= frame[key].map(lambda v: any(same_value(v, option) for option in options)).astype(bool)
    return mask


@dataclass(frozen=True)
class Selection:
    """The trials reported for one cell: the seeds of its best configuration."""

    trials: pd.DataFrame  # rows of the chosen configuration
    n_configs: int  # configurations the cell held
    differing: dict[str, Any]  # chosen values of the keys where the configurations differ

    def values(self, column: str) -> np.ndarray:
        """The chosen trials' values of ``column`` (e.g. ``best_mAP``), NaN dropped."""
        return self.trials[column].dropna().to_numpy(dtype=float)


def select(trials: pd.DataFrame, kind: str) -> Selection | None:
    """The best configuration (highest mean ``<kind>_mAP``) among a cell's counted trials; None if empty."""
    if trials.empty:
        return None
    score = f"{kind}_mAP"
    members: dict[tuple, list] = {}
    for index, config in trials["_config"].items():
        members.setdefault(config, []).append(index)
    groups = {config: trials.loc[index] for config, index in members.items()}
    # Ties go to the configuration whose printed form sorts first, so the choice does not depend on row order.
    best = max(groups, key=lambda c: (groups[c][score].mean(), _negated_order(c, groups)))
    differing: dict[str, Any] = {}
    if len(groups) > 1:
        dicts = [dict(config) for config in groups]
        chosen = dict(best)
        for key in chosen:
            # A key another configuration does not use (the knobs of another loss) is not a difference.
            if any(key in other and not _equal_or_both_none(chosen[key], other[key]) for other in dicts):
                differing[key] = chosen[key]
    return Selection(trials=groups[best], n_configs=len(groups), differing=differing)


def describe(values: Mapping[str, Any]) -> str:
    """``{"loss.k": 15}`` -> ``"loss.k=15"``; keys a configuration does not use print as ``unused``."""
    return ", ".join(f"{key}={'unused' if value is None else value}" for key, value in values.items())


def _negated_order(config: tuple, groups: Mapping[tuple, Any]) -> int:
    ordered = sorted(groups, key=repr)
    return -ordered.index(config)


def _equal_or_both_none(a: Any, b: Any) -> bool:
    return (a is None and b is None) or same_value(a, b)


def _canonical(value: Any) -> Any:
    if value is None or _isnan(value):
        return None
    if isinstance(value, float):
        return round(value, 9)
    return value


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
