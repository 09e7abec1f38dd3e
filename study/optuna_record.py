"""The study's Optuna record: one Optuna study per grid cell in an RDB storage (SQLite or PostgreSQL).

Storage: ``sqlite:///<study folder>/optuna.db`` by default, or any SQLAlchemy URL (``--optuna-storage
postgresql://user@head:5432/optuna``). Only the driver writes to it: :class:`study.searcher.StudySearcher`
creates each trial (RUNNING) when it hands the trial to Tune, and :class:`OptunaRecorder`, a Tune callback,
writes what happens to it:

- every evaluation of the study's metric (``mAP``, percent) as an intermediate value at step = epoch;
- a trial that ran its budget (``train.epochs``) becomes COMPLETE with its last ``mAP``; a trial the
  scheduler stopped early (ASHA) becomes PRUNED (its value is its last intermediate value); a trial that
  failed after its retries becomes FAIL. ``results.csv`` says TERMINATED / STOPPED / ERROR for the same
  trials (user attribute ``tune_trial_id`` ties the two).

Searcher ``optuna``: one study per cell (``<study> [key=value, ...]``, or ``<study>`` when the space has
one cell) whose trials hold the parameters TPE sampled. Searchers ``grid`` / ``random``: one study
``<study>`` whose trials hold the searched keys' values as fixed parameters (one trial per run), so every
study is queried, and its importances computed, the same way.

Resume: Tune restores its trials and the searcher; the record carries on with the same Optuna trials.
A trial the driver created in the database but Tune never recorded (the driver died in between) is
*adopted* by the next suggestion of its cell (same parameters, no duplicate), and any such trial still
RUNNING when the study ends is marked FAIL (user attribute ``note`` says why), so none stays RUNNING.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from ray.tune import Callback
from ray.tune.experiment import Trial

from study.space import SearchSpace

OPTUNA_DB = "optuna.db"
CELL_KEY = "cell"  # index of the grid cell, kept in each Tune trial's config
TUNE_ID_ATTR = "tune_trial_id"
PLAN_INDEX_ATTR = "plan_index"  # grid / random: the trial's index in the plan

optuna.logging.set_verbosity(optuna.logging.WARNING)


def default_url(study_folder: Any) -> str:
    """``sqlite:///<study folder>/optuna.db`` (an absolute path: four slashes)."""
    return f"sqlite:///{study_folder}/{OPTUNA_DB}"


def cell_label(cell: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={_short(value)}" for key, value in cell.items())


def study_names(space: SearchSpace, study: str) -> list[str]:
    """The Optuna study name of each grid cell (grid / random searchers: one study for every cell)."""
    cells = space.cells()
    if space.searcher != "optuna":
        return [study] * len(cells)
    if len(cells) == 1:
        return [study]
    return [f"{study} [{cell_label(cell)}]" for cell in cells]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def param_value(value: Any) -> Any:
    """A config value as an Optuna categorical choice (None, bool, int, float or str)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def grid_distributions(space: SearchSpace, plans: Sequence[Mapping[str, Any]]) -> dict[str, BaseDistribution]:
    """Distributions of the searched keys of a grid / random study: the sampled range of a numeric
    parameter, else a categorical of every value the plan gives the key (``plans``: flat configs)."""
    out: dict[str, BaseDistribution] = {}
    for param in space.params:
        if param.numeric and not param.bundle:
            if param.type == "int":
                out[param.name] = IntDistribution(int(param.low), int(param.high), log=param.log)
            else:
                out[param.name] = FloatDistribution(float(param.low), float(param.high),
                                                    log=param.log or param.type == "loguniform")
    for key in space.searched_keys:
        if key not in out:
            choices = list(dict.fromkeys(param_value(flat[key]) for flat in plans))
            out[key] = CategoricalDistribution(choices)
    return out


class OptunaRecord:
    """Opens the study's Optuna studies in ``url`` (lazily; the objects are not pickled with the searcher
    or the callback, only the URL and names)."""

    def __init__(self, url: str, names: Sequence[str], direction: str) -> None:
        self.url = url
        self.names = list(names)
        self.direction = direction
        self._storage: optuna.storages.BaseStorage | None = None
        self._studies: dict[str, optuna.Study] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_storage": None, "_studies": {}}

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        if self._storage is None:
            self._storage = optuna.storages.RDBStorage(self.url, engine_kwargs=_engine_kwargs(self.url))
        return self._storage

    def unique_names(self) -> list[str]:
        return list(dict.fromkeys(self.names))

    def existing(self) -> list[str]:
        """Names of this study's Optuna studies that the storage already holds."""
        present = {s.study_name for s in self.storage.get_all_studies()}
        return [name for name in self.unique_names() if name in present]

    def delete(self, names: Sequence[str]) -> None:
        """Delete these Optuna studies and their trials (a replaced study's)."""
        for name in names:
            optuna.delete_study(study_name=name, storage=self.storage)
            self._studies.pop(name, None)

    def create(self, cells: Sequence[Mapping[str, Any]]) -> None:
        """Create every Optuna study (a new study: none may exist yet), with its cell as user attributes."""
        for name, cell in zip(self.names, cells):
            if name in self._studies:
                continue
            study = optuna.create_study(storage=self.storage, study_name=name, direction=self._direction(),
                                        load_if_exists=True)
            if len(set(self.names)) > 1:
                for key, value in cell.items():
                    study.set_user_attr(key, param_value(value))
            self._studies[name] = study

    def study(self, cell: int, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
        name = self.names[cell]
        if name not in self._studies:
            self._studies[name] = optuna.load_study(study_name=name, storage=self.storage)
        if sampler is not None:
            self._studies[name].sampler = sampler
        return self._studies[name]

    def _direction(self) -> str:
        return "minimize" if self.direction == "min" else "maximize"

    def trials(self, cell: int) -> list[FrozenTrial]:
        return self.study(cell).get_trials(deepcopy=False)

    def find(self, cell: int, tune_trial_id: str) -> FrozenTrial | None:
        """The latest Optuna trial of a Tune trial (a retried FAIL trial has a successor)."""
        found = [t for t in self.trials(cell) if t.user_attrs.get(TUNE_ID_ATTR) == tune_trial_id]
        return max(found, key=lambda t: t.number) if found else None

    def orphans(self, cell: int, known: Iterable[str]) -> list[FrozenTrial]:
        """RUNNING trials of ``cell`` that belong to no Tune trial in ``known``."""
        known = set(known)
        return [t for t in self.trials(cell)
                if t.state == TrialState.RUNNING and t.user_attrs.get(TUNE_ID_ATTR) not in known]

    def set_attr(self, trial: FrozenTrial, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(trial._trial_id, key, value)

    def report(self, trial: FrozenTrial, step: int, value: float) -> None:
        self.storage.set_trial_intermediate_value(trial._trial_id, step, value)

    def finish(self, cell: int, trial: FrozenTrial, state: TrialState, value: float | None = None) -> None:
        self.study(cell).tell(trial.number, value if state == TrialState.COMPLETE else None, state=state)

    def add_running(self, cell: int, params: Mapping[str, Any], distributions: Mapping[str, BaseDistribution],
                    attrs: Mapping[str, Any]) -> FrozenTrial:
        """A new RUNNING trial with fixed parameters; returns it as stored."""
        study = self.study(cell)
        template = optuna.trial.create_trial(state=TrialState.RUNNING, params=dict(params),
                                             distributions=dict(distributions), user_attrs=dict(attrs))
        trial_id = self.storage.create_new_trial(study._study_id, template_trial=template)
        return self.storage.get_trial(trial_id)


def _engine_kwargs(url: str) -> dict[str, Any]:
    # A server may close idle connections between two trials of a long study.
    return {} if url.startswith("sqlite") else {"pool_pre_ping": True}


class OptunaRecorder(Callback):
    """Writes each Tune trial's intermediate values and final state into its Optuna trial (see the module
    docstring). Runs in the driver, after the searcher, for every trial the searcher created."""

    def __init__(self, record: OptunaRecord, metric: str, budgets: Any) -> None:
        """``budgets``: ``budget(trial) -> int``, a trial's ``train.epochs``."""
        self.record = record
        self.metric = metric
        self.budget = budgets
        self._checked = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_checked": False}

    def _optuna_trial(self, trial: Trial) -> tuple[int, FrozenTrial] | None:
        cell = trial.config.get(CELL_KEY)
        if cell is None:
            return None
        found = self.record.find(int(cell), trial.trial_id)
        return (int(cell), found) if found is not None else None

    def _live(self, trial: Trial) -> tuple[int, FrozenTrial] | None:
        """The Tune trial's Optuna trial, RUNNING; a FAIL one (a retried errored trial) gets a RUNNING
        successor with the same parameters. None when it already finished otherwise (the driver died
        after recording it: nothing to write twice)."""
        pair = self._optuna_trial(trial)
        if pair is None:
            return None
        cell, frozen = pair
        if frozen.state == TrialState.RUNNING:
            return pair
        if frozen.state != TrialState.FAIL:
            return None
        attrs = {k: v for k, v in frozen.user_attrs.items() if k != "note"}
        successor = self.record.add_running(cell, frozen.params, frozen.distributions,
                                            {**attrs, "retry_of": frozen.number})
        return cell, successor

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._checked:
            return
        self._checked = True  # a resumed study: trials Tune finished while the record missed it
        for trial in trials:
            if trial.status in (Trial.TERMINATED, Trial.ERROR):
                pair = self._optuna_trial(trial)
                if pair is not None and pair[1].state == TrialState.RUNNING:
                    self._end(trial, error=trial.status == Trial.ERROR)

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        epoch = int(result.get("epoch", 0) or 0)
        value = result.get(self.metric)
        if int(result.get("eval_epoch", 0) or 0) != epoch or epoch <= 0 or not _finite(value):
            return
        pair = self._live(trial)
        if pair is not None:
            self.record.report(pair[1], epoch, float(value))

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, error=True)

    def _end(self, trial: Trial, *, error: bool) -> None:
        pair = self._live(trial)
        if pair is None:
            return
        cell, frozen = pair
        result = trial.last_result or {}
        epochs = int(result.get("epoch", 0) or 0)
        value = result.get(self.metric)
        for key in (f"best_{self.metric}", "best_epoch"):
            if _finite(result.get(key)):
                self.record.set_attr(frozen, key, float(result[key]))
        self.record.set_attr(frozen, "epochs", epochs)
        if error:
            state = TrialState.FAIL
        elif epochs >= self.budget(trial) and _finite(value):
            state = TrialState.COMPLETE
        else:
            state = TrialState.PRUNED
        self.record.finish(cell, frozen, state, float(value) if state == TrialState.COMPLETE else None)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Trials the database holds as RUNNING that no Tune trial carries on are marked FAIL."""
        unfinished = {t.trial_id for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR)}
        for cell in sorted({self.record.names.index(n) for n in self.record.unique_names()}):
            for frozen in self.record.orphans(cell, unfinished):
                self.record.set_attr(frozen, "note", "never ran: the driver stopped before Tune recorded it")
                self.record.finish(cell, frozen, TrialState.FAIL)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
