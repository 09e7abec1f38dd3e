"""The Tune searcher of a study: an explicit plan (grid / seeded random) or Optuna TPE per grid cell.

Trial configs are flat ``{dotted config key: value}`` dicts (plus the index of a bundle parameter's value
under the bundle's name when Optuna chose it). With the Optuna searcher every grid cell (a combination
of ``grid`` values and seeds) gets its own seeded TPE search of ``num_samples`` trials, so that for
instance the best ``loss.k`` is found separately for the baseline and for MoReID.
"""
from __future__ import annotations

import pickle
from typing import Any, Mapping

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from study.space import SearchSpace, plan

CELL_KEY = "cell"  # index of the grid cell, kept in each trial's config


class CellSpace:
    """Define-by-run function of one grid cell (a picklable callable for :class:`OptunaSearch`)."""

    def __init__(self, space: SearchSpace, cell: Mapping[str, Any]) -> None:
        self.space = space
        self.cell = dict(cell)

    def __call__(self, trial: Any) -> dict[str, Any]:
        return self.space.sample(trial, self.cell)


class StudySearcher(Searcher):
    """Suggests the study's trials; ``Searcher.FINISHED`` once every planned trial has been handed out."""

    def __init__(self, space: SearchSpace, startup_trials: int = 10) -> None:
        super().__init__(metric=space.metric, mode=space.mode)
        self.space = space
        self.bundle_names = {p.name for p in space.params if p.bundle}
        self.trial_cell: dict[str, int] = {}
        if space.searcher == "optuna":
            self.cells = space.cells()
            self.counts = [0] * len(self.cells)
            self.optuna = [
                OptunaSearch(space=CellSpace(space, cell), metric=space.metric, mode=space.mode,
                             sampler=optuna.samplers.TPESampler(seed=space.searcher_seed + index,
                                                                n_startup_trials=startup_trials))
                for index, cell in enumerate(self.cells)]
            self.queue: list[tuple[int, dict[str, Any]]] = []
        else:
            self.queue = [(t.cell, t.params) for t in plan(space)]
            self.optuna = []
        self.next_index = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self.optuna:
            if self.next_index >= len(self.queue):
                return Searcher.FINISHED
            cell, params = self.queue[self.next_index]
            self.next_index += 1
            self.trial_cell[trial_id] = cell
            return {**params, CELL_KEY: cell}
        open_cells = [i for i, n in enumerate(self.counts) if n < self.space.num_samples]
        if not open_cells:
            return Searcher.FINISHED
        cell = min(open_cells, key=lambda i: (self.counts[i], i))
        suggested = self.optuna[cell].suggest(trial_id)
        if suggested is None:
            return None
        self.counts[cell] += 1
        self.trial_cell[trial_id] = cell
        params = {k: v for k, v in suggested.items() if k not in self.bundle_names}
        return {**self.cells[cell], **params, CELL_KEY: cell}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.optuna and trial_id in self.trial_cell and self.metric in result:
            self.optuna[self.trial_cell[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.optuna and trial_id in self.trial_cell:
            self.optuna[self.trial_cell[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__.copy(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))
