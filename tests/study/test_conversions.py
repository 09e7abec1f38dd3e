"""One owner per conversion: a study's plan is built once, each planned trial's Config is built and validated
once (by ``validate_plan``), and the preflight, the searcher and the records reuse it; the flat and nested
forms of a config are converted by ``reid_core.config`` alone."""
from __future__ import annotations

from ray.tune.experiment import Trial

from reid_core.config import Config, flatten, flatten_mapping
from study.driver.checks import run_preflight
from study.record.common import TrialInfo
from study.search.optuna_record import OptunaRecord, default_url, study_names
from study.search.searcher import CELL_KEY, StudySearcher
from study.space import load_space, params_key, planned_configs, validate_plan


def test_planned_configs_are_validated_once_and_reused(tmp_path, monkeypatch):
    space = load_space("quickstart")
    trials = validate_plan(space)
    assert len(trials) == space.total_trials() and all(t.config is not None for t in trials)
    assert trials.configs == [t.config for t in trials]  # a grid: the checks are the trials themselves
    planned = planned_configs(trials)
    assert len(planned) == len(trials)

    calls = []
    validate = Config.validate
    monkeypatch.setattr(Config, "validate", lambda self: calls.append(1) or validate(self))
    checked = run_preflight(space, generate=False, unseen="error", trials=trials)
    assert checked.facts  # the data were checked against the plan's configs
    (tmp_path / "s").mkdir()
    record = OptunaRecord(default_url(tmp_path / "s"), study_names(space, "s"), space.mode)
    record.create(space.cells())
    searcher = StudySearcher(space, record, trials=trials)
    info = TrialInfo(space.base, space.searched_keys, planned)
    for index, planned_trial in enumerate(trials):
        suggested = searcher.suggest(f"t{index}")
        assert suggested[CELL_KEY] == planned_trial.cell
        trial = Trial("train_trial", config=suggested, trial_id=f"t{index}", stub=True)
        assert info.flat(trial) == flatten(planned_trial.config)
        assert planned[params_key(suggested)] is planned_trial.config
    assert calls == []  # nothing built or validated a trial's Config again


def test_a_trial_outside_the_plan_is_built_from_its_values():
    space = load_space("quickstart")
    info = TrialInfo(space.base, space.searched_keys)
    trial = Trial("train_trial", config={"loss.name": "he", "framework.name": "moreid", CELL_KEY: 7},
                  trial_id="x", stub=True)
    flat = info.flat(trial)
    assert flat["loss.name"] == "he" and flat["framework.name"] == "moreid" and CELL_KEY not in flat


def test_flatten_mapping_reads_nested_and_dotted_keys_alike():
    assert flatten_mapping({"loss": {"name": "he", "k": 5}, "train.epochs": 3}) == {
        "loss.name": "he", "loss.k": 5, "train.epochs": 3}
    assert flatten(Config()) == flatten_mapping(Config().to_dict())
