"""Reading a search-space file: one function per section of the YAML (overrides, base, parameters,
scheduler, searcher, metric and seeds, resources and retries, constraints), each raising a
:class:`~study.space.schema.SpaceError` that names the file and the bad key or value."""
from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import yaml

from reid_core.config import (EVAL_METRICS, Config, ConfigError, config_keys, flatten, flatten_mapping, parse_override,
                              set_dotted)
from study.space.schema import (CONSTRAINT_RE, NAME_RE, OPS, PARAM_TYPES, SCHEDULERS, SEARCHERS, SPACES_DIR, TOP_KEYS,
                                Constraint, Param, RandomSuggester, Resources, Retries, Scheduler, SearchSpace,
                                SpaceError, expand, format_value, propagate_ranges, static_bounds)

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

    def fail(message: str) -> SpaceError:
        return SpaceError(f"{source}: {message}")

    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (a space has: {', '.join(TOP_KEYS)})")
    known_keys = config_keys()
    base_over = _apply_overrides(raw, overrides, known_keys, fail)
    name, description = _parse_name(raw, fail)
    base_flat = _parse_base(raw, known_keys, fail)
    params, searched = _parse_params(raw, base_over, known_keys, fail)
    base_flat.update(base_over)
    scheduler, base_cfg, base = _parse_scheduler(raw, base_flat, searched, fail)
    searcher, searcher_seed = _parse_searcher(raw, params, fail)
    metric, mode, num_samples, seeds = _parse_objective(raw, base_cfg, base, searched, searcher, fail)
    res, retries = _parse_resources(raw, resources, fail)
    constraints = [_parse_constraint(c, known_keys, fail) for c in (raw.get("constraints") or [])]

    space = SearchSpace(name=name, description=description.strip(), source=source, base=base, params=params,
                        constraints=constraints, searcher=searcher, searcher_seed=searcher_seed,
                        scheduler=scheduler, metric=metric, mode=mode, num_samples=num_samples, seeds=seeds,
                        resources=res, retries=retries)
    _check_params_against_config(space, fail)
    _check_constraints(space, fail)
    return space


def _apply_overrides(raw: dict[str, Any], overrides: Iterable[str], known_keys: set[str], fail) -> dict[str, Any]:
    """``--set`` overrides: space keys set in ``raw``; config keys returned (they go to the base)."""
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
    return base_over


def _parse_name(raw: Mapping[str, Any], fail) -> tuple[str, str]:
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise fail(f"name must be a word of letters, digits, '-' or '_' (it names the study folder), got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise fail("description must be a string")
    return name, description


def _parse_base(raw: Mapping[str, Any], known_keys: set[str], fail) -> dict[str, Any]:
    """The ``base`` section as dotted keys (nested and dotted alike), every key known."""
    base_raw = raw.get("base") or {}
    if not isinstance(base_raw, dict):
        raise fail(f"base must be a mapping of config keys, got {base_raw!r}")
    base_flat = flatten_mapping(base_raw)
    for key in base_flat:
        if key not in known_keys:
            raise fail(f"base: unknown config key {key!r}{_suggest(key, known_keys)}")
    return base_flat


def _parse_params(raw: Mapping[str, Any], base_over: Mapping[str, Any], known_keys: set[str],
                  fail) -> tuple[list[Param], dict[str, str]]:
    """The parameters, less those a ``--set`` pins; and the searched dotted keys -> parameter name."""
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
    # A --set of a searched key pins it: the parameter is dropped (a bundle cannot be pinned by one key).
    for key in list(base_over):
        if key in searched:
            owner = searched[key]
            param = next(p for p in params if p.name == owner)
            if param.bundle:
                raise fail(f"--set {key}: {key} belongs to the bundle parameter {owner!r}; pin the bundle "
                           f"by editing the space")
            params = [p for p in params if p.name != owner]
    return params, searched


def _parse_scheduler(raw: Mapping[str, Any], base_flat: dict[str, Any], searched: Mapping[str, str],
                     fail) -> tuple[Scheduler, Config, dict[str, Any]]:
    """The scheduler, and the base Config it budgets (``train.epochs``), also flattened."""
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
    return scheduler, base_cfg, base


def _parse_searcher(raw: Mapping[str, Any], params: list[Param], fail) -> tuple[str, int]:
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
    return searcher, searcher_seed


def _parse_objective(raw: Mapping[str, Any], base_cfg: Config, base: dict[str, Any], searched: Mapping[str, str],
                     searcher: str, fail) -> tuple[str, str, int, list[int]]:
    """``metric``, ``mode``, ``num_samples`` and ``seeds`` (one seed goes into ``base``)."""
    metric = raw.get("metric", "mAP")
    if metric not in EVAL_METRICS:
        raise fail(f"metric must be one of {', '.join(EVAL_METRICS)}; got {metric!r}")
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
    return metric, mode, num_samples, seeds


def _parse_resources(raw: Mapping[str, Any], resources: Mapping[str, Any] | None, fail) -> tuple[Resources, Retries]:
    """The space's resources with the command line's (non-None) values over them, and the retries."""
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
    problem = res.gpu_share_problem(gpus_from_cli=(resources or {}).get("gpus_per_worker") is not None)
    if problem:
        raise fail(problem)
    retries = _parse_dataclass(Retries, raw.get("retries") or {}, "retries", fail)
    if retries.workers < -1 or retries.trials < -1:
        raise fail("retries.workers and retries.trials must be -1 (unlimited) or more")
    return res, retries


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
                flat = flatten_mapping(value)
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
    match = CONSTRAINT_RE.match(text)
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




def _check_constraints(space: SearchSpace, fail) -> None:
    for c in space.constraints:
        for key in c.keys():
            if static_bounds(space, key) is None:
                raise fail(f"constraint {c.text!r}: {key} is not numeric")
        a = static_bounds(space, c.left)
        b = static_bounds(space, c.right) if isinstance(c.right, str) else (c.right, c.right)
        assert a is not None and b is not None
        # The most favourable pair of values must satisfy the constraint, else it can never hold.
        best_a, best_b = (a[0], b[1]) if c.op in ("<", "<=") else (a[1], b[0])
        if not OPS[c.op](best_a, best_b):
            raise fail(f"constraint {c.text!r} can never hold: {c.left} ranges over [{format_value(a[0])}, {format_value(a[1])}] "
                       f"and {c.right} over [{format_value(b[0])}, {format_value(b[1])}]")
    ranges = propagate_ranges(space)
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




def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

