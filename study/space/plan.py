"""The trial plan of a search space: built once by :func:`validate_plan` (every trial's Config checked), then
handed to the preflight, the printout and the searcher."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from reid_core.config import Config, ConfigError, config_keys
from reid_core.data import synthetic
from study.space.schema import RandomSuggester, SearchSpace, SpaceError, format_bundle


@dataclass
class PlannedTrial:
    cell: int
    params: dict[str, Any]  # dotted keys -> values (sampled keys absent for Optuna: chosen at run time)
    config: Config | None = None  # the validated Config (grid / random, by validate_plan)


class Plan(list):
    """The planned trials (a list of :class:`PlannedTrial`), and ``configs``: the validated Configs that stand
    for the study in checks (a grid / random plan: its trials' own; Optuna: the draws per cell)."""

    configs: list[Config] | None = None


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



def validate_plan(space: SearchSpace, draws: int = 64) -> Plan:
    """The plan, with every trial's Config built and validated once: kept in ``PlannedTrial.config`` for a
    grid / random plan (the preflight, the searcher, the records and the trials use it as it is), and in
    ``Plan.configs`` for the checks; for Optuna, ``draws`` random draws per cell stand in for its
    proposals. Raises SpaceError naming the trial values that fail."""
    trials = Plan(plan(space))
    checks = checked_params(space, trials, draws)  # grid / random: the trials' own values, in plan order
    trials.configs = []
    for index, params in enumerate(checks):
        try:
            cfg = space.config_for(params)
        except ConfigError as exc:
            raise SpaceError(f"{space.source}: the trial {format_bundle(params)} is not a valid config: {exc}") from exc
        trials.configs.append(cfg)
        if space.searcher != "optuna":
            trials[index].config = cfg
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


def dataset_key(cfg: Config) -> str:
    """Key of a trial's dataset in :attr:`study.driver.preflight.Preflight.index` (the same for every trial reading it)."""
    if cfg.data.dataset == "synthetic" and not cfg.data.root:
        return f"synthetic|{synthetic.cache_key(cfg.data.synthetic)}"
    return f"{cfg.data.dataset}|{cfg.data.root}"


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys of a Tune trial config (drops the searcher's bookkeeping: cell, bundle indices)."""
    keys = config_keys()
    return {k: v for k, v in config.items() if k in keys}


def params_key(config: Mapping[str, Any]) -> str:
    """A trial's config values (a Tune trial config or planned values; bookkeeping dropped) as a lookup key."""
    return json.dumps(trial_params(dict(config)), sort_keys=True, default=str)


def planned_configs(trials: Iterable[PlannedTrial]) -> dict[str, Config]:
    """``params_key -> validated Config`` of the planned trials whose Config the plan built."""
    return {params_key(t.params): t.config for t in trials if t.config is not None}


def batch_lines(configs: Iterable[Config], workers: int) -> list[str]:
    """The plan's batches, one line per distinct (``data.batch_size``, K): the global batch of one step
    (FastReID's IMS_PER_BATCH), the workers per trial and each worker's share."""
    lines = []
    for batch, k in dict.fromkeys((c.data.batch_size, c.data.num_instance) for c in configs):
        share = f"{workers} workers x {batch // workers} images each" if workers > 1 else "1 worker"
        lines.append(f"batch: {batch} images per step (global: P = {batch // k} identities x K = {k}), {share}")
    return lines
