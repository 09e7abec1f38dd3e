"""Search spaces: the parts of a space (parameters, constraints, scheduler, resources), sampling within
the constraints, and a trial's Config from the base and its values. Parsing is :mod:`study.space.parse`,
the trial plan :mod:`study.space.plan`.

A search space is a YAML file (schema in ``search_spaces/README.md``) that names a base Config (dotted or
nested overrides), the parameters to search, constraints between them, a searcher (Optuna TPE or an
explicit grid/random plan), a scheduler (ASHA or none), the metric, seeds and default resources.

:func:`load_space` parses and validates a file; every error is a :class:`SpaceError` that names the file
and the bad key or value, raised before any trial starts. A parameter is one of

- ``uniform`` / ``loguniform`` (floats in ``[low, high]``), ``int`` (integers in ``[low, high]``,
  optionally ``log: true``): sampled (by Optuna, or by the seeded random plan);
- ``choice`` (one of ``values``, sampled) and ``grid`` (every one of ``values``, an axis of the grid).

A ``grid``/``choice`` parameter whose name is not a config key is a *bundle*: each value is a mapping of
dotted keys set together (one row of an ablation table, e.g. ``{model.ibn: true, model.non_local: false}``).

Constraints are ``"<key> <op> <key or number>"`` with ``op`` in ``< <= > >=`` (``loss.beta < loss.alpha``).
They are enforced while sampling, by narrowing each parameter's range with the values already drawn
(the define-by-run way Optuna recommends), after a static interval check that rejects a constraint that
can never hold.
"""
from __future__ import annotations

import itertools
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from reid_core.config import Config

SPACES_DIR = Path(__file__).resolve().parent.parent.parent / "search_spaces"
PARAM_TYPES = ("uniform", "loguniform", "int", "choice", "grid")
SEARCHERS = ("optuna", "grid", "random")
SCHEDULERS = ("asha", "none")
TOP_KEYS = ("name", "description", "base", "parameters", "constraints", "searcher", "scheduler", "metric",
            "mode", "num_samples", "seeds", "resources", "retries")
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}
CONSTRAINT_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|<|>)\s*([A-Za-z_][\w.]*|[-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Floats are drawn with strict constraints as ``x <= bound - _STRICT * scale``.
_STRICT = 1e-6


class SpaceError(ValueError):
    """A search space that cannot be run; the message names the file and the bad key or value."""


# ---- parts of a space ------------------------------------------------------------------------------------

@dataclass
class Param:
    """One searched parameter. ``values`` for choice/grid; ``low``/``high``/``log`` for ranges.
    A bundle (``bundle=True``) has mapping values of dotted keys."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: list[Any] = field(default_factory=list)
    bundle: bool = False

    @property
    def numeric(self) -> bool:
        return self.type in ("uniform", "loguniform", "int")

    @property
    def keys(self) -> list[str]:
        """The dotted config keys this parameter sets."""
        if not self.bundle:
            return [self.name]
        return sorted({key for value in self.values for key in value})

    def describe(self) -> str:
        if self.numeric:
            scale = " (log)" if self.log or self.type == "loguniform" else ""
            return f"{self.type} [{format_value(self.low)}, {format_value(self.high)}]{scale}"
        shown = [format_bundle(v) if self.bundle else format_value(v) for v in self.values]
        return f"{self.type} {{{', '.join(shown)}}}"


@dataclass(frozen=True)
class Constraint:
    """``left op right``; ``right`` is a dotted key or a number."""

    left: str
    op: str
    right: str | float
    text: str

    def holds(self, values: Mapping[str, Any]) -> bool:
        right = values[self.right] if isinstance(self.right, str) else self.right
        return bool(OPS[self.op](values[self.left], right))

    def keys(self) -> list[str]:
        return [self.left] + ([self.right] if isinstance(self.right, str) else [])

    def facing(self, key: str) -> tuple[str, str | float] | None:
        """The constraint as ``key op other`` (op flipped when ``key`` is on the right), or None."""
        if self.left == key:
            return self.op, self.right
        if self.right == key:
            return _FLIP[self.op], self.left
        return None


@dataclass
class Scheduler:
    type: str = "none"
    grace_epochs: int = 1
    max_epochs: int = 0  # = train.epochs of the base config
    reduction_factor: float = 2.0

    def milestones(self) -> list[int]:
        """Epochs at which ASHA compares trials (its rungs): grace * rf^k up to max_epochs."""
        if self.type != "asha":
            return []
        rungs = int(math.log(self.max_epochs / self.grace_epochs) / math.log(self.reduction_factor) + 1)
        return sorted({int(math.ceil(self.grace_epochs * self.reduction_factor ** k - 1e-9))
                       for k in range(rungs)})


@dataclass
class Resources:
    max_concurrent: int = 1
    workers_per_trial: int = 1
    gpus_per_worker: float = 0.0  # below 1: one-worker trials only, whose CUDA memory is capped to the share
    cpus_per_worker: float = 1.0

    def gpu_share_problem(self, gpus_from_cli: bool) -> str | None:
        """Why the GPUs per worker cannot run, or None. A trial of several workers needs whole GPUs (NCCL
        puts one rank on one GPU; two ranks on one GPU fail); above 1 Ray reserves whole GPUs only.
        ``gpus_from_cli``: the value came from ``--gpus-per-worker`` (else from the space's resources)."""
        gpus = self.gpus_per_worker
        if gpus == int(gpus):
            return None
        where = "--gpus-per-worker" if gpus_from_cli else "--gpus-per-worker (the space's resources.gpus_per_worker)"
        if gpus > 1:
            return f"{where} {gpus:g}: more than one GPU per worker must be a whole number"
        if self.workers_per_trial > 1:
            return (f"{where} {gpus:g} with {self.workers_per_trial} workers per trial: a trial of several "
                    f"workers needs whole GPUs (NCCL cannot put two ranks on one GPU); give --gpus-per-worker "
                    f"1, or --workers-per-trial 1 to share GPUs between one-worker trials")
        return None


@dataclass
class Retries:
    """Retries of a failed trial. Errors that repeat on every attempt (config, data, a non-finite loss,
    CUDA out-of-memory) are never retried, and a collective (NCCL) error at most once, whatever these say
    (:mod:`study.trial.errors`)."""

    workers: int = 2  # Ray Train restarts of a trial's worker group (from its last checkpoint)
    trials: int = 1  # Ray Tune retries of a failed trial (from its last checkpoint)


@dataclass
class SearchSpace:
    """A validated search space. ``base`` is the flattened base Config (every dotted key)."""

    name: str
    description: str
    source: str
    base: dict[str, Any]
    params: list[Param]
    constraints: list[Constraint]
    searcher: str
    searcher_seed: int
    scheduler: Scheduler
    metric: str
    mode: str
    num_samples: int
    seeds: list[int]
    resources: Resources
    retries: Retries

    # ---- derived ---------------------------------------------------------------
    @property
    def grid_params(self) -> list[Param]:
        return [p for p in self.params if p.type == "grid"]

    @property
    def sampled_params(self) -> list[Param]:
        return [p for p in self.params if p.type != "grid"]

    @property
    def searched_keys(self) -> list[str]:
        """Dotted keys that differ between trials (``train.seed`` when several seeds)."""
        keys = [key for p in self.params for key in p.keys]
        if len(self.seeds) > 1:
            keys.append("train.seed")
        return list(dict.fromkeys(keys))

    @property
    def epochs(self) -> int:
        return int(self.base["train.epochs"])

    def cells(self) -> list[dict[str, Any]]:
        """Grid cells: every combination of grid values (bundles expanded) x seeds that satisfies the
        constraints among fixed keys. Optuna runs one search per cell; the plan repeats each cell."""
        axes = [[(p, v) for v in p.values] for p in self.grid_params]
        out: list[dict[str, Any]] = []
        for combo in itertools.product(*axes):
            cell: dict[str, Any] = {}
            for param, value in combo:
                cell.update(expand(param, value))
            for seed in self.seeds:
                full = dict(cell, **({"train.seed": seed} if len(self.seeds) > 1 else {}))
                if self._fixed_constraints_hold(full):
                    out.append(full)
        return out

    def _fixed_constraints_hold(self, cell: Mapping[str, Any]) -> bool:
        sampled = {key for p in self.sampled_params for key in p.keys}
        values = {**self.base, **cell}
        return all(c.holds(values) for c in self.constraints if not set(c.keys()) & sampled)

    def total_trials(self) -> int:
        return len(self.cells()) * self.num_samples

    def config_for(self, params: Mapping[str, Any]) -> Config:
        """The validated Config of a trial: the base with the trial's dotted values."""
        return trial_config(self.base, params)

    def sample(self, trial: "Suggester", cell: Mapping[str, Any]) -> dict[str, Any]:
        """Draw the sampled parameters of one trial in ``cell`` (define-by-run): each parameter's range is
        its static range narrowed by the constraints against values already known. Returns dotted keys."""
        known: dict[str, Any] = {**self.base, **cell}
        drawn: dict[str, Any] = {}
        statics = self._static_ranges()
        pending = {key for p in self.sampled_params for key in p.keys}
        for param in self.sampled_params:
            pending -= set(param.keys)
            value = self._draw(trial, param, statics, known, pending)
            values = expand(param, value)
            known.update(values)
            drawn.update(values)
        for constraint in self.constraints:
            if not constraint.holds(known):
                raise SpaceError(f"{self.source}: constraint {constraint.text!r} does not hold for "
                                 f"{format_bundle(drawn)}; the constraints cannot be met together")
        return drawn

    def _draw(self, trial: "Suggester", param: Param, statics: dict[str, tuple[float, float]],
              known: Mapping[str, Any], pending: set[str]) -> Any:
        """One parameter's value; ``pending``: sampled keys not drawn yet (their constraints wait)."""
        if param.numeric:
            low, high = statics[param.name]
            strict_low = strict_high = False
            for constraint in self.constraints:
                facing = constraint.facing(param.name)
                if facing is None:
                    continue
                op, other = facing
                if isinstance(other, str) and other in pending:
                    continue  # not known yet; the static range already leaves it room
                bound = float(known[other]) if isinstance(other, str) else float(other)
                if op in ("<", "<=") and bound <= high:
                    high, strict_high = bound, op == "<"
                elif op in (">", ">=") and bound >= low:
                    low, strict_low = bound, op == ">"
            if param.type == "int":
                low_i = math.floor(low) + 1 if strict_low and float(low).is_integer() else math.ceil(low)
                high_i = math.ceil(high) - 1 if strict_high and float(high).is_integer() else math.floor(high)
                if low_i > high_i:
                    raise SpaceError(f"{self.source}: no integer value of {param.name} is left between "
                                     f"{format_value(low)} and {format_value(high)} by the constraints")
                return trial.suggest_int(param.name, int(low_i), int(high_i), log=param.log)
            scale = _STRICT * max(abs(high - low), 1e-12)
            low, high = low + (scale if strict_low else 0.0), high - (scale if strict_high else 0.0)
            if low > high:
                raise SpaceError(f"{self.source}: no value of {param.name} is left by the constraints")
            return trial.suggest_float(param.name, low, high, log=param.type == "loguniform" or param.log)
        allowed = [i for i, value in enumerate(param.values)
                   if self._value_allowed(param, value, known, pending)]
        if not allowed:
            raise SpaceError(f"{self.source}: no value of {param.name} satisfies the constraints")
        if param.bundle:
            return param.values[trial.suggest_categorical(param.name, allowed)]
        return trial.suggest_categorical(param.name, [param.values[i] for i in allowed])

    def _value_allowed(self, param: Param, value: Any, known: Mapping[str, Any], pending: set[str]) -> bool:
        values = {**known, **expand(param, value)}
        for constraint in self.constraints:
            keys = constraint.keys()
            if any(key in pending for key in keys):
                continue
            if set(keys) & set(param.keys) and not constraint.holds(values):
                return False
        return True

    def _static_ranges(self) -> dict[str, tuple[float, float]]:
        """Each numeric parameter's ``[low, high]`` narrowed by the constraints (interval propagation)."""
        return propagate_ranges(self)

    def describe(self) -> str:
        lines = [f"space {self.name} ({self.source})"] + ([f"  {self.description}"] if self.description else [])
        lines.append(f"  searcher {self.searcher} (seed {self.searcher_seed}), scheduler {self.scheduler.type}"
                     + (f" (grace {self.scheduler.grace_epochs}, max {self.scheduler.max_epochs} epochs, "
                        f"reduction factor {format_value(self.scheduler.reduction_factor)}, rungs at epochs "
                        f"{self.scheduler.milestones()})" if self.scheduler.type == "asha" else "")
                     + f", metric {self.mode} {self.metric}")
        for p in self.params:
            lines.append(f"  {p.name}: {p.describe()}")
        for c in self.constraints:
            lines.append(f"  constraint: {c.text}")
        r = self.resources
        lines.append(f"  seeds {self.seeds}, {self.num_samples} sample(s) per cell, {len(self.cells())} cell(s): "
                     f"{self.total_trials()} trial(s); {r.max_concurrent} at a time, {r.workers_per_trial} "
                     f"worker(s) per trial x ({format_value(r.cpus_per_worker)} CPU, {format_value(r.gpus_per_worker)} GPU)")
        return "\n".join(lines)


class Suggester(Protocol):
    """The subset of ``optuna.Trial`` that sampling uses (also implemented by :class:`RandomSuggester`)."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


class RandomSuggester:
    """Seeded uniform / log-uniform draws with the Optuna ``suggest_*`` interface; ``forced`` pins a
    categorical parameter to one of its choices (validation visits every choice that way)."""

    def __init__(self, rng: np.random.Generator, forced: Mapping[str, Any] | None = None) -> None:
        self.rng = rng
        self.forced = dict(forced or {})

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        if log:
            return float(math.exp(self.rng.uniform(math.log(low), math.log(high))))
        return float(self.rng.uniform(low, high))

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int:
        if log:
            return int(min(high, max(low, round(math.exp(self.rng.uniform(math.log(low), math.log(high + 1)) - 1e-9)))))
        return int(self.rng.integers(low, high + 1))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        if name in self.forced and self.forced[name] in choices:
            return self.forced[name]
        return choices[int(self.rng.integers(len(choices)))]


# ---- planning -------------------------------------------------------------------------------------------


def expand(param: Param, value: Any) -> dict[str, Any]:
    """The dotted keys a parameter value sets."""
    return dict(value) if param.bundle else {param.name: value}


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> Config:
    """``base`` (flattened config) with ``params`` (dotted) applied, validated."""
    return Config().replace({**base, **params})


def static_bounds(space: SearchSpace, key: str) -> tuple[float, float] | None:
    """Static [min, max] of a key over the space (a fixed key: its base value); None when not numeric."""
    for p in space.params:
        if key in p.keys:
            if p.numeric:
                return p.low, p.high
            values = [expand(p, v).get(key, space.base[key]) for v in p.values]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return float(min(values)), float(max(values))
            return None
    value = space.base[key]
    return (float(value), float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def propagate_ranges(space: SearchSpace) -> dict[str, tuple[float, float]]:
    ranges = {key: static_bounds(space, key) for c in space.constraints for key in c.keys()}
    ranges.update({p.name: (p.low, p.high) for p in space.params if p.numeric})
    for _ in range(len(space.constraints) + 1):
        changed = False
        for c in space.constraints:
            a = ranges.get(c.left)
            b = ranges.get(c.right) if isinstance(c.right, str) else (c.right, c.right)
            if a is None or b is None:
                continue
            (alo, ahi), (blo, bhi) = a, b
            gap = _gap(space, c.left, a, b) if c.op in ("<", ">") else 0.0
            if c.op in ("<", "<="):
                ahi, blo = min(ahi, bhi - gap), max(blo, alo + gap)
            else:
                alo, bhi = max(alo, blo + gap), min(bhi, ahi - gap)
            if (alo, ahi) != a:
                ranges[c.left], changed = (alo, ahi), True
            if isinstance(c.right, str) and (blo, bhi) != b:
                ranges[c.right], changed = (blo, bhi), True
        if not changed:
            break
    return {k: v for k, v in ranges.items() if v is not None}


def _gap(space: SearchSpace, key: str, a: tuple[float, float], b: tuple[float, float]) -> float:
    """The smallest step a strict constraint keeps between two values: 1 for integers, else a sliver."""
    if isinstance(space.base.get(key), int) and not isinstance(space.base.get(key), bool):
        return 1.0
    return 4 * _STRICT * max(a[1] - a[0], b[1] - b[0], 1e-12)



def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_bundle(values: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={format_value(v)}" for k, v in values.items()) + "}"
