"""What TensorBoard shows of a study, as a person reads it in the browser (the writer itself:
:class:`study.record.tensorboard.TensorBoardHParams`).

``tensorboard/`` holds one run per trial, named readably (``003 lr=0.001 framework.name=moreid``, the
number in the order trials started) rather than by Tune's 8-character trial id, with per-epoch scalars
(training metrics under their own names, evaluations under ``eval/``, the best so far under ``best/``;
x axis: epochs) and the trial's session start/end records. The folder itself holds the *experiment
summary*: the searched hyperparameters (only those: constant config keys would crowd the table) and the
study's metrics, mAP first. Without it TensorBoard takes every scalar as a metric and shows the first
five alphabetically, which hides mAP.
"""
from __future__ import annotations

import re
import time
from typing import Any, Mapping

from tensorboard.plugins.hparams import summary_v2 as hp

from study.space import SearchSpace, expand

# Shown when a study searches nothing (a single configuration), so the table still says what ran.
DEFAULT_HPARAMS = ("loss.name", "framework.name")
# (tag, display name) of the experiment's metrics, in the table's column order.
HPARAMS_METRICS = (("eval/mAP", "mAP"), ("best/mAP", "best mAP"), ("eval/R1", "R1"), ("eval/mINP", "mINP"),
           ("loss/total", "loss"))
RUN_NAME_CHARS = 90


def hparam_keys(space: SearchSpace) -> list[str]:
    return list(space.searched_keys) or list(DEFAULT_HPARAMS)


def short_names(keys: list[str]) -> dict[str, str]:
    """A key's last part where no other key shares it (``optim.lr`` -> ``lr``), else the whole key."""
    tails = [k.split(".")[-1] for k in keys]
    return {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails)}


def run_name(number: int, values: Mapping[str, Any]) -> str:
    """``003 lr=0.001 name=he``: a folder name TensorBoard lists readably (no ``/``, bounded length)."""
    shown = short_names(list(values))
    text = " ".join(f"{shown[k]}={f'{v:.3g}' if isinstance(v, float) else v}" for k, v in values.items())
    text = re.sub(r"[/\\:*?\"<>|]", "-", text)[:RUN_NAME_CHARS].rstrip()
    return f"{number:03d} {text}".rstrip()


def _domain(space: SearchSpace, key: str) -> Any:
    """The HParams domain of a searched key (a range or its discrete values), or None when mixed."""
    for param in space.params:
        if param.numeric and param.name == key:
            if param.type == "int":
                return hp.IntInterval(int(param.low), int(param.high))
            return hp.RealInterval(float(param.low), float(param.high))
    values = list(space.seeds) if key == "train.seed" else []
    for param in space.params:
        if key in param.keys:
            values.extend(expand(param, v).get(key, space.base.get(key)) for v in param.values)
    values = list(dict.fromkeys(values))
    kinds = {bool if isinstance(v, bool) else float if isinstance(v, (int, float)) else type(v) for v in values}
    if not values or len(kinds) != 1 or not kinds <= {bool, float, str}:
        return None
    return hp.Discrete([float(v) if kinds == {float} else v for v in values])


def experiment_summary(space: SearchSpace) -> Any:
    """The HParams experiment summary (a ``Summary`` protobuf) of ``space``."""
    hparams = [hp.HParam(key, _domain(space, key)) for key in hparam_keys(space)]
    metrics = [hp.Metric(tag, display_name=name) for tag, name in HPARAMS_METRICS]
    return hp.hparams_config_pb(hparams=hparams, metrics=metrics, time_created_secs=time.time())
