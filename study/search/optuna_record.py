"""The study's Optuna record: one Optuna study per grid cell in an RDB storage (SQLite or PostgreSQL).

Storage: ``sqlite:///<study folder>/optuna.db`` by default, or any SQLAlchemy URL (``--optuna-storage
postgresql://user@head:5432/optuna``). A password in the URL stays in this process's memory
(:func:`split_password`): the record keeps the URL without it, which is what study.json, the console and every
pickle (the searcher's state, Tune's experiment state) hold; without one, libpq reads ``~/.pgpass``,
``PGPASSFILE`` or ``PGPASSWORD`` itself. Only the driver writes to it: :class:`study.search.searcher.StudySearcher`
creates each trial (RUNNING) when it hands the trial to Tune, and :class:`study.record.optuna.OptunaRecorder`, a Tune callback,
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

from typing import Any, Iterable, Mapping, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from study.layout import OPTUNA_DB
from study.space import SearchSpace

CELL_KEY = "cell"  # index of the grid cell, kept in each Tune trial's config
TUNE_ID_ATTR = "tune_trial_id"
PLAN_INDEX_ATTR = "plan_index"  # grid / random: the trial's index in the plan

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Password of each password-less storage URL this process was given: never pickled, never written.
_PASSWORDS: dict[str, str] = {}


def split_password(url: str) -> tuple[str, str | None]:
    """``(url without its password, the password or None)``; a URL SQLAlchemy cannot parse is returned
    as it is (opening it reports the error)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 (not a URL: nothing to split)
        return url, None
    if parsed.password is None:
        return url, None
    return parsed._replace(password=None).render_as_string(hide_password=False), str(parsed.password)


def masked(url: str) -> str:
    """The URL as printed: its password, if any, as ``***`` (SQLAlchemy's ``hide_password``)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


def _with_password(url: str) -> str:
    password = _PASSWORDS.get(url)
    if password is None:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=password).render_as_string(hide_password=False)


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
    or the callback, only the URL without its password and the names). ``url``'s password, if any, is kept
    in this process only; an unpickled record finds it there when the driver was given it again."""

    def __init__(self, url: str, names: Sequence[str], direction: str) -> None:
        self.url, password = split_password(url)
        if password is not None:
            _PASSWORDS[self.url] = password
        self.names = list(names)
        self.direction = direction
        self._storage: optuna.storages.BaseStorage | None = None
        self._studies: dict[str, optuna.Study] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_storage": None, "_studies": {}}

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        if self._storage is None:
            self._storage = optuna.storages.RDBStorage(_with_password(self.url),
                                                       engine_kwargs=_engine_kwargs(self.url))
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
