"""The Tune searcher of a study: an explicit plan (grid / seeded random) or Optuna TPE per grid cell,
every trial recorded in the study's Optuna storage (:mod:`study.search.optuna_record`).

Trial configs are flat ``{dotted config key: value}`` dicts plus ``cell`` (the grid cell's index). With the
Optuna searcher every grid cell (a combination of ``grid`` values and seeds) gets its own seeded TPE
search of ``num_samples`` trials, so that for instance the best ``loss.k`` is found separately for the
baseline and for MoReID. Optuna is asked directly (``study.ask()`` and the space's define-by-run
``sample``) rather than through Ray's ``OptunaSearch``, which tells Optuna COMPLETE with the truncated
score for a trial ASHA stopped; here the searcher only creates trials and
:class:`study.record.optuna.OptunaRecorder` writes their outcome (PRUNED for early stops), which TPE
then reads from the storage.
"""
from __future__ import annotations

import pickle
from typing import Any

import optuna
from ray.tune.search import Searcher

from reid_core.config import flatten
from study.search.optuna_record import (CELL_KEY, PLAN_INDEX_ATTR, TUNE_ID_ATTR, OptunaRecord, grid_distributions,
                                        param_value)
from study.space import PlannedTrial, SearchSpace, plan, trial_config

__all__ = ["CELL_KEY", "StudySearcher"]


class StudySearcher(Searcher):
    """Suggests the study's trials; ``Searcher.FINISHED`` once every planned trial has been handed out."""

    def __init__(self, space: SearchSpace, record: OptunaRecord, startup_trials: int = 10,
                 trials: list[PlannedTrial] | None = None) -> None:
        """``trials``: the study's plan as :func:`study.space.validate_plan` built it (each planned trial's
        Config already validated); planned here when not given."""
        super().__init__(metric=space.metric, mode=space.mode)
        self.space = space
        self.record = record
        self.cells = space.cells()
        self.trial_cell: dict[str, int] = {}  # Tune trial id -> cell
        if space.searcher == "optuna":
            self.counts = [0] * len(self.cells)
            self.samplers = [optuna.samplers.TPESampler(seed=space.searcher_seed + index,
                                                        n_startup_trials=startup_trials)
                             for index in range(len(self.cells))]
            self.queue: list[tuple[int, dict[str, Any]]] = []
        else:
            planned = plan(space) if trials is None else trials
            self.queue = [(t.cell, t.params) for t in planned]
            self.samplers = []
            self.flat = [flatten(t.config if t.config is not None else trial_config(space.base, t.params))
                         for t in planned]
            self.distributions = grid_distributions(space, self.flat)
        self.next_index = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self.samplers:
            if self.next_index >= len(self.queue):
                return Searcher.FINISHED
            index = self.next_index
            self.next_index += 1
            cell, params = self.queue[index]
            self._record_planned(trial_id, cell, index)
            self.trial_cell[trial_id] = cell
            return {**params, CELL_KEY: cell}
        open_cells = [i for i, n in enumerate(self.counts) if n < self.space.num_samples]
        if not open_cells:
            return Searcher.FINISHED
        cell = min(open_cells, key=lambda i: (self.counts[i], i))
        params = self._sample(trial_id, cell)
        self.counts[cell] += 1
        self.trial_cell[trial_id] = cell
        return {**self.cells[cell], **params, CELL_KEY: cell}

    def _sample(self, trial_id: str, cell: int) -> dict[str, Any]:
        """TPE's values for a new trial of ``cell``, or those of a trial the database holds from a driver
        that died before Tune recorded it (adopted, so that no trial is sampled twice)."""
        study = self.record.study(cell, self.samplers[cell])
        orphans = self.record.orphans(cell, self.trial_cell)
        if orphans:
            self.record.set_attr(orphans[0], TUNE_ID_ATTR, trial_id)
            return self.space.sample(optuna.trial.FixedTrial(orphans[0].params), self.cells[cell])
        trial = study.ask()
        trial.set_user_attr(TUNE_ID_ATTR, trial_id)
        try:
            return self.space.sample(trial, self.cells[cell])
        except Exception:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise

    def _record_planned(self, trial_id: str, cell: int, index: int) -> None:
        """A grid / random trial: its searched values as a fixed-params Optuna trial (adopted when a
        previous driver already created it)."""
        for orphan in self.record.orphans(cell, self.trial_cell):
            if orphan.user_attrs.get(PLAN_INDEX_ATTR) == index:
                self.record.set_attr(orphan, TUNE_ID_ATTR, trial_id)
                return
        params = {key: param_value(self.flat[index][key]) for key in self.distributions}
        self.record.add_running(cell, params, self.distributions, {TUNE_ID_ATTR: trial_id, PLAN_INDEX_ATTR: index})

    # Outcomes are written by study.record.optuna.OptunaRecorder (a Tune callback): nothing to do here.
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__.copy(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))
