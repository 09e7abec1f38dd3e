"""Search-space files: schema, validation, sampling and the trial plan.

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

import copy
import difflib
import itertools
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
import yaml

from reid_core.config import Config, ConfigError, config_keys, flatten, parse_override, set_dotted

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
PARAM_TYPES = ("uniform", "loguniform", "int", "choice", "grid")
SEARCHERS = ("optuna", "grid", "random")
SCHEDULERS = ("asha", "none")
METRICS = ("mAP", "R1", "R5", "R10", "mINP")
TOP_KEYS = ("name", "description", "base", "parameters", "constraints", "searcher", "scheduler", "metric",
            "mode", "num_samples", "seeds", "resources", "retries")
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}
_CONSTRAINT_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|<|>)\s*([A-Za-z_][\w.]*|[-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
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
            return f"{self.type} [{_fmt(self.low)}, {_fmt(self.high)}]{scale}"
        shown = [_fmt_bundle(v) if self.bundle else _fmt(v) for v in self.values]
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
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


@dataclass
class Retries:
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
                                 f"{_fmt_bundle(drawn)}; the constraints cannot be met together")
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
                                     f"{_fmt(low)} and {_fmt(high)} by the constraints")
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
        return _propagate(self)

    def describe(self) -> str:
        lines = [f"space {self.name} ({self.source})"] + ([f"  {self.description}"] if self.description else [])
        lines.append(f"  searcher {self.searcher} (seed {self.searcher_seed}), scheduler {self.scheduler.type}"
                     + (f" (grace {self.scheduler.grace_epochs}, max {self.scheduler.max_epochs} epochs, "
                        f"reduction factor {_fmt(self.scheduler.reduction_factor)}, rungs at epochs "
                        f"{self.scheduler.milestones()})" if self.scheduler.type == "asha" else "")
                     + f", metric {self.mode} {self.metric}")
        for p in self.params:
            lines.append(f"  {p.name}: {p.describe()}")
        for c in self.constraints:
            lines.append(f"  constraint: {c.text}")
        r = self.resources
        lines.append(f"  seeds {self.seeds}, {self.num_samples} sample(s) per cell, {len(self.cells())} cell(s): "
                     f"{self.total_trials()} trial(s); {r.max_concurrent} at a time, {r.workers_per_trial} "
                     f"worker(s) per trial x ({_fmt(r.cpus_per_worker)} CPU, {_fmt(r.gpus_per_worker)} GPU)")
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

@dataclass
class PlannedTrial:
    cell: int
    params: dict[str, Any]  # dotted keys -> values (sampled keys absent for Optuna: chosen at run time)


def plan(space: SearchSpace) -> list[PlannedTrial]:
    """The trials a study runs, in order. Grid/random: every trial's values (seeded draws).
    Optuna: one entry per trial with the cell's fixed values; Optuna picks the sampled ones."""
    rng = np.random.default_rng(space.searcher_seed)
    suggester = RandomSuggester(rng)
    out: list[PlannedTrial] = []
    for index, cell in enumerate(space.cells()):
        for _ in range(space.num_samples):
            params = dict(cell)
            if space.searcher != "optuna":
                params.update(space.sample(suggester, cell))
            out.append(PlannedTrial(index, params))
    return out


def expand(param: Param, value: Any) -> dict[str, Any]:
    """The dotted keys a parameter value sets."""
    return dict(value) if param.bundle else {param.name: value}


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> Config:
    """``base`` (flattened config) with ``params`` (dotted) applied, validated."""
    return Config().replace({**base, **params})


# ---- loading --------------------------------------------------------------------------------------------

def resolve_path(name_or_path: str | Path) -> Path:
    """A path as given, or the file ``search_spaces/<name>.yaml``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in str(name_or_path):
        if not path.is_file():
            raise SpaceError(f"search space file not found: {path}")
        return path
    candidate = SPACES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise SpaceError(f"no search space named {str(name_or_path)!r} in {SPACES_DIR} "
                         f"(known: {', '.join(known) or 'none'}); give a name or a path to a YAML file")
    return candidate


def load_space(name_or_path: str | Path, overrides: Iterable[str] = (),
               resources: Mapping[str, Any] | None = None) -> SearchSpace:
    """Read, override and validate a search space.

    ``overrides``: ``key=value`` strings; a config key (``loss.k=5``) goes to the base (and pins the
    parameter when that key is searched), a space key (``num_samples=4``, ``scheduler.grace_epochs=2``,
    ``seeds=[0,1]``) sets that field. ``resources``: non-None values override the space's resources.
    """
    path = resolve_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"search space {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpaceError(f"search space {path} must hold a mapping at the top level, got {type(raw).__name__}")
    return parse_space(raw, source=str(path), overrides=overrides, resources=resources)


def parse_space(raw: Mapping[str, Any], *, source: str = "<space>", overrides: Iterable[str] = (),
                resources: Mapping[str, Any] | None = None) -> SearchSpace:
    """Validate a space given as a mapping (see :func:`load_space`)."""
    raw = copy.deepcopy(dict(raw))
    where = source

    def fail(message: str) -> SpaceError:
        return SpaceError(f"{where}: {message}")

    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (a space has: {', '.join(TOP_KEYS)})")
    known_keys = config_keys()

    # --set overrides: config keys to the base, space keys to the space.
    base_over: dict[str, Any] = {}
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            raise fail(str(exc)) from exc
        top = key.split(".")[0]
        if key in known_keys:
            base_over[key] = value
        elif top in TOP_KEYS and top not in ("base", "parameters", "constraints"):
            try:
                set_dotted(raw, key, value)
            except ConfigError as exc:
                raise fail(f"--set {key}: {exc}") from exc
        else:
            raise fail(f"--set {key}: not a config key nor a space setting{_suggest(key, known_keys)}")

    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise fail(f"name must be a word of letters, digits, '-' or '_' (it names the study folder), got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise fail("description must be a string")

    # base config
    base_raw = raw.get("base") or {}
    if not isinstance(base_raw, dict):
        raise fail(f"base must be a mapping of config keys, got {base_raw!r}")
    base_flat = _flat_mapping(base_raw)
    for key in base_flat:
        if key not in known_keys:
            raise fail(f"base: unknown config key {key!r}{_suggest(key, known_keys)}")

    # parameters
    params_raw = raw.get("parameters") or {}
    if not isinstance(params_raw, dict):
        raise fail(f"parameters must be a mapping of name -> spec, got {params_raw!r}")
    params = [_parse_param(str(pname), spec, known_keys, fail) for pname, spec in params_raw.items()]
    searched: dict[str, str] = {}
    for p in params:
        for key in p.keys:
            if key in searched:
                raise fail(f"{key} is set by two parameters ({searched[key]} and {p.name})")
            searched[key] = p.name
    # A --set of a searched key pins it: the parameter is dropped (a bundle keeps its other keys fixed? no:
    # a bundle cannot be pinned by one key).
    for key in list(base_over):
        if key in searched:
            owner = searched[key]
            param = next(p for p in params if p.name == owner)
            if param.bundle:
                raise fail(f"--set {key}: {key} belongs to the bundle parameter {owner!r}; pin the bundle "
                           f"by editing the space")
            params = [p for p in params if p.name != owner]
    base_flat.update(base_over)

    # scheduler and epochs
    sched_raw = raw.get("scheduler") or {"type": "none"}
    if isinstance(sched_raw, str):
        sched_raw = {"type": sched_raw}
    if not isinstance(sched_raw, dict):
        raise fail(f"scheduler must be a mapping or 'none', got {sched_raw!r}")
    scheduler = _parse_dataclass(Scheduler, sched_raw, "scheduler", fail)
    if scheduler.type not in SCHEDULERS:
        raise fail(f"scheduler.type must be one of {', '.join(SCHEDULERS)}; got {scheduler.type!r}")
    if scheduler.max_epochs:
        if "train.epochs" in searched:
            raise fail("train.epochs cannot be searched when scheduler.max_epochs sets the budget")
        base_flat["train.epochs"] = scheduler.max_epochs
    try:
        base_cfg = Config().replace(base_flat)
    except ConfigError as exc:
        # A rule between keys (loss.beta < loss.alpha) is checked against what the trials can draw, not
        # against the default of a searched key: validate_plan checks every trial's config.
        base_cfg = _unvalidated(base_flat)
        if base_cfg is None or not searched:
            raise fail(f"base: {exc}") from exc
    base = flatten(base_cfg)
    scheduler.max_epochs = base_cfg.train.epochs
    if scheduler.type == "asha":
        if "train.epochs" in searched:
            raise fail("train.epochs cannot be searched under ASHA (it is the budget, max_epochs)")
        if not 1 <= scheduler.grace_epochs < scheduler.max_epochs:
            raise fail(f"scheduler.grace_epochs must be in [1, max_epochs={scheduler.max_epochs}), "
                       f"got {scheduler.grace_epochs}")
        if not scheduler.reduction_factor > 1:
            raise fail(f"scheduler.reduction_factor must be above 1, got {scheduler.reduction_factor}")

    # searcher
    search_raw = raw.get("searcher") or {"type": "grid"}
    if isinstance(search_raw, str):
        search_raw = {"type": search_raw}
    if not isinstance(search_raw, dict):
        raise fail(f"searcher must be a mapping, got {search_raw!r}")
    unknown = sorted(set(search_raw) - {"type", "seed"})
    if unknown:
        raise fail(f"searcher: unknown key {unknown[0]!r} (known: type, seed)")
    searcher = search_raw.get("type")
    if searcher not in SEARCHERS:
        raise fail(f"searcher.type must be one of {', '.join(SEARCHERS)}; got {searcher!r}")
    searcher_seed = search_raw.get("seed", 0)
    if isinstance(searcher_seed, bool) or not isinstance(searcher_seed, int):
        raise fail(f"searcher.seed must be an integer, got {searcher_seed!r}")
    if searcher == "optuna" and not any(p.type != "grid" for p in params):
        raise fail("searcher optuna needs at least one sampled parameter (uniform, loguniform, int or choice)")
    if searcher == "grid" and any(p.type != "grid" for p in params) and not raw.get("num_samples"):
        raise fail("searcher grid with sampled parameters needs num_samples (draws per grid cell)")

    metric = raw.get("metric", "mAP")
    if metric not in METRICS:
        raise fail(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise fail(f"mode must be max or min; got {mode!r}")
    num_samples = raw.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise fail(f"num_samples must be a positive integer, got {num_samples!r}")
    seeds = raw.get("seeds", [base_cfg.train.seed])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds)):
        raise fail(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    if "train.seed" in searched:
        raise fail("train.seed is set by 'seeds'; do not search it as a parameter")
    if len(seeds) == 1:
        base["train.seed"] = seeds[0]
    if searcher == "optuna" and len(seeds) > 1:
        raise fail("searcher optuna proposes one configuration per trial: seeds must list one seed "
                   "(use searcher grid to repeat configurations over seeds)")

    res = _parse_dataclass(Resources, raw.get("resources") or {}, "resources", fail)
    for key, value in (resources or {}).items():
        if value is not None:
            setattr(res, key, value)
    if not (isinstance(res.max_concurrent, int) and res.max_concurrent >= 1):
        raise fail(f"resources.max_concurrent must be a positive integer, got {res.max_concurrent!r}")
    if not (isinstance(res.workers_per_trial, int) and res.workers_per_trial >= 1):
        raise fail(f"resources.workers_per_trial must be a positive integer, got {res.workers_per_trial!r}")
    if res.gpus_per_worker < 0 or res.cpus_per_worker < 0 or (res.gpus_per_worker == 0 and res.cpus_per_worker == 0):
        raise fail(f"resources: a worker needs CPUs or GPUs (cpus_per_worker={res.cpus_per_worker}, "
                   f"gpus_per_worker={res.gpus_per_worker})")
    retries = _parse_dataclass(Retries, raw.get("retries") or {}, "retries", fail)
    if retries.workers < -1 or retries.trials < -1:
        raise fail("retries.workers and retries.trials must be -1 (unlimited) or more")

    constraints = [_parse_constraint(c, known_keys, fail) for c in (raw.get("constraints") or [])]

    space = SearchSpace(name=name, description=description.strip(), source=source, base=base, params=params,
                        constraints=constraints, searcher=searcher, searcher_seed=searcher_seed,
                        scheduler=scheduler, metric=metric, mode=mode, num_samples=num_samples, seeds=seeds,
                        resources=res, retries=retries)
    _check_params_against_config(space, fail)
    _check_constraints(space, fail)
    return space


def validate_plan(space: SearchSpace, draws: int = 64) -> list[PlannedTrial]:
    """The plan, with every trial's Config validated; for Optuna, ``draws`` random draws per cell stand
    in for its proposals. Raises SpaceError naming the trial values that fail."""
    trials = plan(space)
    for params in checked_params(space, trials, draws):
        try:
            space.config_for(params)
        except ConfigError as exc:
            raise SpaceError(f"{space.source}: the trial {_fmt_bundle(params)} is not a valid config: {exc}") from exc
    if not trials:
        raise SpaceError(f"{space.source}: the constraints leave no grid cell to run")
    return trials


def checked_params(space: SearchSpace, trials: list[PlannedTrial], draws: int = 64) -> list[dict[str, Any]]:
    """The trial values that stand for a study in checks: the planned trials of a grid; for Optuna,
    ``draws`` random draws per cell plus one draw forcing each choice (its proposals are not known yet)."""
    checks: list[dict[str, Any]] = []
    if space.searcher == "optuna":
        rng = np.random.default_rng(space.searcher_seed)
        choices = [(p.name, i if p.bundle else v) for p in space.sampled_params if not p.numeric
                   for i, v in enumerate(p.values)]
        for cell in space.cells():
            checks.extend({**cell, **space.sample(RandomSuggester(rng), cell)} for _ in range(draws))
            checks.extend({**cell, **space.sample(RandomSuggester(rng, {name: value}), cell)}
                          for name, value in choices)
    else:
        checks = [t.params for t in trials]
    return checks


# ---- validation helpers ---------------------------------------------------------------------------------

def _unvalidated(flat: Mapping[str, Any]) -> Config | None:
    """The Config of ``flat`` with values coerced but the rules between keys not checked (None when a
    value itself is wrong)."""
    tree = Config().to_dict()
    try:
        for key, value in flat.items():
            set_dotted(tree, key, value)
        return Config.from_dict(tree)
    except ConfigError:
        return None


def _parse_param(name: str, spec: Any, known: set[str], fail) -> Param:
    if not isinstance(spec, dict):
        raise fail(f"parameter {name}: must be a mapping with a type (one of {', '.join(PARAM_TYPES)}), got {spec!r}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise fail(f"parameter {name}: type must be one of {', '.join(PARAM_TYPES)}; got {kind!r}")
    allowed = {"type", "values"} if kind in ("choice", "grid") else {"type", "low", "high", "log"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise fail(f"parameter {name}: unknown field {extra[0]!r} for type {kind} (allowed: {', '.join(sorted(allowed))})")
    if kind in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise fail(f"parameter {name}: values must be a non-empty list")
        bundle = name not in known
        if bundle:
            if not all(isinstance(v, dict) and v for v in values):
                raise fail(f"unknown parameter {name!r}: not a config key{_suggest(name, known)} "
                           f"(a bundle parameter's values must each be a mapping of config keys)")
            flat_values = []
            for value in values:
                flat = _flat_mapping(value)
                for key in flat:
                    if key not in known:
                        raise fail(f"parameter {name}: unknown config key {key!r}{_suggest(key, known)}")
                flat_values.append(flat)
            values = flat_values
        elif any(isinstance(v, (dict, list)) for v in values):
            raise fail(f"parameter {name}: values must be plain numbers, strings or booleans")
        if len({repr(v) for v in values}) != len(values):
            raise fail(f"parameter {name}: values repeat")
        return Param(name, kind, values=list(values), bundle=bundle)
    if name not in known:
        raise fail(f"unknown parameter {name!r}: not a config key{_suggest(name, known)}")
    low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
    for label, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"parameter {name}: {label} must be a number, got {value!r}")
    if not isinstance(log, bool):
        raise fail(f"parameter {name}: log must be true or false")
    if low >= high:
        raise fail(f"parameter {name}: impossible range, low ({low}) must be below high ({high})")
    if kind == "int" and (float(low) != int(low) or float(high) != int(high)):
        raise fail(f"parameter {name}: an int range needs integer bounds, got [{low}, {high}]")
    if (kind == "loguniform" or log) and low <= 0:
        raise fail(f"parameter {name}: a log-scale range needs low > 0, got {low}")
    return Param(name, kind, low=float(low), high=float(high), log=bool(log))


def _check_params_against_config(space: SearchSpace, fail) -> None:
    """Each value (choice/grid) and each range end must be accepted by the Config on its own type."""
    defaults = Config()
    for p in space.params:
        probes = [expand(p, v) for v in p.values] if not p.numeric else [
            {p.name: int(p.low) if p.type == "int" else p.low}, {p.name: int(p.high) if p.type == "int" else p.high}]
        for probe in probes:
            tree = defaults.to_dict()
            for key, value in probe.items():
                node = tree
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node[part]
                node[leaf] = value
            try:
                Config.from_dict(tree)  # types only: cross-key checks need the whole trial (validate_plan)
            except ConfigError as exc:
                raise fail(f"parameter {p.name}: {exc}") from exc
        if p.numeric:
            default = space.base[p.name]
            if isinstance(default, (bool, str)):
                raise fail(f"parameter {p.name}: {p.type} range on a {type(default).__name__} config key")
            if p.type in ("uniform", "loguniform") and isinstance(default, int):
                raise fail(f"parameter {p.name}: the config key is an integer; use type int")


def _parse_constraint(text: Any, known: set[str], fail) -> Constraint:
    if not isinstance(text, str):
        raise fail(f"constraint {text!r}: must be a string like 'loss.beta < loss.alpha'")
    match = _CONSTRAINT_RE.match(text)
    if not match:
        raise fail(f"constraint {text!r}: must read '<key> <op> <key or number>' with op one of < <= > >=")
    left, op, right_text = match.groups()
    right: str | float
    try:
        right = float(right_text)
    except ValueError:
        right = right_text
    for key in [left] + ([right] if isinstance(right, str) else []):
        if key not in known:
            raise fail(f"constraint {text!r}: unknown config key {key!r}{_suggest(key, known)}")
    return Constraint(left, op, right, text.strip())


def _bounds(space: SearchSpace, key: str) -> tuple[float, float] | None:
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


def _propagate(space: SearchSpace) -> dict[str, tuple[float, float]]:
    ranges = {key: _bounds(space, key) for c in space.constraints for key in c.keys()}
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


def _check_constraints(space: SearchSpace, fail) -> None:
    for c in space.constraints:
        for key in c.keys():
            if _bounds(space, key) is None:
                raise fail(f"constraint {c.text!r}: {key} is not numeric")
        a = _bounds(space, c.left)
        b = _bounds(space, c.right) if isinstance(c.right, str) else (c.right, c.right)
        assert a is not None and b is not None
        # The most favourable pair of values must satisfy the constraint, else it can never hold.
        best_a, best_b = (a[0], b[1]) if c.op in ("<", "<=") else (a[1], b[0])
        if not OPS[c.op](best_a, best_b):
            raise fail(f"constraint {c.text!r} can never hold: {c.left} ranges over [{_fmt(a[0])}, {_fmt(a[1])}] "
                       f"and {c.right} over [{_fmt(b[0])}, {_fmt(b[1])}]")
    ranges = _propagate(space)
    for key, (low, high) in ranges.items():
        if low > high:
            raise fail(f"the constraints {', '.join(repr(c.text) for c in space.constraints)} leave no value of {key}")
    # Draw a few trials per cell: the narrowing must always leave room, and grid cells must satisfy them.
    if space.constraints:
        if not space.cells():
            raise fail(f"the constraints {', '.join(repr(c.text) for c in space.constraints)} exclude every grid cell")
        rng = RandomSuggester(np.random.default_rng(0))
        for cell in space.cells():
            for _ in range(32):
                space.sample(rng, cell)


def _parse_dataclass(cls: type, raw: Any, section: str, fail) -> Any:
    if not isinstance(raw, dict):
        raise fail(f"{section} must be a mapping, got {raw!r}")
    obj = cls()
    for key, value in raw.items():
        if not hasattr(obj, key):
            raise fail(f"{section}: unknown key {key!r} (known: {', '.join(obj.__dataclass_fields__)})")
        default = getattr(obj, key)
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(value, type(default))
        elif isinstance(default, int):
            ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            value = int(value) if ok else value
        elif isinstance(default, float):
            ok = isinstance(value, (int, float))
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise fail(f"{section}.{key} must be a {type(default).__name__}, got {value!r}")
        setattr(obj, key, value)
    return obj


def _flat_mapping(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested and dotted keys alike -> ``{dotted: value}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_mapping(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _fmt_bundle(values: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()) + "}"
