"""Search spaces: schema validation, constraints, bundles, the trial plan, the Optuna searcher, the CLI's
rejection of bad spaces before any trial starts, and every file in search_spaces/ (no Ray runtime)."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from reid_core.data import synthetic
from study import run
from study.search.optuna_record import OptunaRecord, default_url, study_names
from study.search.searcher import CELL_KEY, StudySearcher
from study.space import SPACES_DIR, SpaceError, load_space, parse_space, plan, validate_plan

SPACE_FILES = sorted(SPACES_DIR.glob("*.yaml"))
EXPECTED_SPACES = {"quickstart", "loss_comparison", "npair_k", "ranked_list", "he_loss", "past_positives",
                   "similarity", "backbone", "dictionary_size", "datasets", "fidelity", "fidelity_pretrained"}


def small(**changes) -> dict:
    space = {
        "name": "t",
        "base": {"train": {"epochs": 4, "eval_period": 1}},
        "parameters": {
            "loss.alpha": {"type": "uniform", "low": 0.5, "high": 2.0},
            "loss.beta": {"type": "uniform", "low": 0.2, "high": 1.0},
            "framework.name": {"type": "grid", "values": ["baseline", "moreid"]},
        },
        "constraints": ["loss.beta < loss.alpha"],
        "searcher": {"type": "optuna", "seed": 3},
        "scheduler": {"type": "asha", "grace_epochs": 1, "reduction_factor": 2},
        "num_samples": 6,
    }
    space.update(changes)
    return space


def test_every_shipped_space_passes_the_dry_run(capsys):
    assert {p.stem for p in SPACE_FILES} == EXPECTED_SPACES
    for path in SPACE_FILES:
        # The paper's spaces read their data on the cluster (--address): the dry run leaves them to it.
        assert run.main([str(path), "--dry-run", "--address", "auto"]) == 0, path
        out = capsys.readouterr().out
        assert "dry run: nothing trained" in out
        assert f"space {path.stem}" in out
        assert "batch: " in out and "images per step (global" in out
        if path.stem in ("quickstart", "fidelity"):  # the CPU demos: random init
            assert "pretrained: none (random init)" in out
        elif path.stem == "fidelity_pretrained":  # the CPU study from a start pretrained here
            assert "pretrained: synthetic (R18 pretrained on synthetic identities disjoint from the study's" in out
        else:  # the paper's spaces: ImageNet, said (a dry run fetches and loads nothing)
            assert "pretrained: imagenet (R50-IBN-a, fetched once into /mnt/shared/weights" in out
    assert not Path("/mnt/shared/weights").exists()


def test_paper_spaces_run_the_authors_global_batches_from_imagenet_weights(capsys):
    for name in EXPECTED_SPACES - {"quickstart", "fidelity", "fidelity_pretrained"}:  # the CPU studies
        space = load_space(name)
        b = space.base
        assert (b["model.pretrained"], b["model.pretrained_cache"]) == ("imagenet", "/mnt/shared/weights"), name
        assert b["model.non_local_form"] == "dot_product", name
        # VeRi-776's 64 images per step in all, K = 16, on one GPU as the authors ran it.
        assert (b["data.batch_size"], b["data.num_instance"]) == (64, 16), name
        assert space.resources.workers_per_trial == (4 if name == "datasets" else 1), name
    rows = {c["data.dataset"]: c for c in load_space("datasets").cells()}
    for test_set in ("veriwild-small", "veriwild-medium", "veriwild-large"):
        assert (rows[test_set]["data.batch_size"], rows[test_set]["data.num_instance"]) == (512, 4)
    # Without weights, a paper space says it does not run the paper's setting.
    assert run.main(["loss_comparison", "--dry-run", "--address", "auto", "--set", "model.pretrained="]) == 0
    assert "pretrained: none: random init of R50-IBN-a + non-local (not the paper's setting" in capsys.readouterr().out


def test_fidelity_space_holds_every_claims_cells_with_three_seeds_in_the_methods_regime():
    space = load_space("fidelity")
    assert len(space.seeds) >= 3
    cells = {(c["framework.name"], c["loss.name"], c.get("framework.include_past_positives", False),
              c.get("loss.distance", "euclidean")) for c in space.cells()}
    for cell in (("moreid", "he", False, "euclidean"), ("moreid", "triplet", False, "euclidean"),
                 ("baseline", "he", False, "euclidean"), ("baseline", "triplet", False, "euclidean"),
                 ("moreid", "he", True, "euclidean"), ("moreid", "he", False, "cosine"),
                 *((fw, loss, False, "euclidean") for fw in ("moreid", "baseline") for loss in ("npair", "ranked_list"))):
        assert cell in cells, cell
    base = space.base
    per_batch = base["data.batch_size"] // base["data.num_instance"]
    train_ids = base["data.synthetic.ids"] // 2
    queries = (base["data.synthetic.ids"] - train_ids) * base["data.synthetic.cams"]  # one per test id and camera
    assert train_ids >= 20 * per_batch and base["data.num_instance"] >= 8 and queries >= 200
    assert base["framework.dict_size"] >= 8 * base["data.batch_size"]


def test_shipped_spaces_hold_the_papers_grids():
    past = load_space("past_positives")
    cells = past.cells()
    assert {(c["framework.momentum"], c["framework.include_past_positives"]) for c in cells} == {
        (m, p) for m in (0.995, 0.997, 0.999) for p in (True, False)}
    backbone = load_space("backbone")
    rows = {(c["data.autoaug"], c["model.ibn"], c["model.non_local"], c["loss.name"]) for c in backbone.cells()}
    assert len(rows) == 10 and (False, True, True, "he") in rows and (True, True, True, "triplet") in rows
    sim = load_space("similarity")
    assert {(c["loss.name"], c["loss.distance"]) for c in sim.cells()} == {
        ("triplet", "euclidean"), ("he", "cosine"), ("he", "euclidean")}
    assert max(c["framework.dict_size"] for c in load_space("dictionary_size").cells()) == 65536
    ranked = load_space("ranked_list")
    assert ranked.searcher == "optuna" and [c.text for c in ranked.constraints] == ["loss.beta < loss.alpha"]
    assert {c["framework.name"] for c in ranked.cells()} == {"baseline", "moreid"}
    quick = load_space("quickstart")
    assert quick.total_trials() == 8 and quick.base["data.dataset"] == "synthetic"
    # a test split of at least 150 queries: one per (test identity, camera), half the identities test
    assert quick.base["data.synthetic.ids"] // 2 * quick.base["data.synthetic.cams"] >= 150
    assert quick.resources.workers_per_trial == 1  # trials train in their own Tune process
    for name in EXPECTED_SPACES - {"quickstart", "fidelity", "fidelity_pretrained"}:  # the CPU studies
        space = load_space(name)
        assert space.base["model.arch"] in ("resnet50", "resnet101") or name == "datasets"
        assert space.resources.gpus_per_worker >= 1


@pytest.mark.parametrize("text, needle", [
    ("name: x\nparameters: [1, 2\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping at the top level"),
])
def test_malformed_yaml_is_rejected_naming_the_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert needle in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("changes, needle", [
    ({"parameters": {"loss.kk": {"type": "int", "low": 1, "high": 5}}}, "unknown parameter 'loss.kk'"),
    ({"parameters": {"loss.k": {"type": "int", "low": 9, "high": 3}}}, "impossible range, low (9) must be below high (3)"),
    ({"parameters": {"optim.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}}, "needs low > 0"),
    ({"parameters": {"loss.k": {"type": "int", "low": 1.5, "high": 3}}}, "integer bounds"),
    ({"parameters": {"loss.alpha": {"type": "uniform", "low": 0.5, "high": 1.0},
                     "loss.beta": {"type": "uniform", "low": 1.5, "high": 2.0}}}, "can never hold"),
    ({"searcher": {"type": "hyperopt"}}, "searcher.type must be one of optuna, grid, random; got 'hyperopt'"),
    ({"scheduler": {"type": "asha", "grace_epochs": 4}}, "scheduler.grace_epochs"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type"),
    ({"base": {"loss": {"nam": "he"}}}, "base: unknown config key 'loss.nam'"),
    ({"base": {"loss": {"name": "arcface"}}}, "loss.name must be one of"),
    ({"metric": "accuracy"}, "metric must be one of"),
    ({"parameters": {"loss.name": {"type": "choice", "values": ["he", "arcface"]}}}, "loss.name must be one of"),
    ({"parameters": {"loss.k": {"type": "int", "low": 1, "high": 5, "step": 2}}}, "unknown field 'step'"),
    ({"seeds": [0, 1]}, "seeds must list one seed"),
    ({"constraints": ["loss.beta << loss.alpha"]}, "must read"),
    ({"constraints": ["loss.betta < loss.alpha"]}, "unknown config key 'loss.betta'"),
    ({"resources": {"workers_per_trial": 0}}, "workers_per_trial"),
    ({"colour": "blue"}, "unknown key 'colour'"),
])
def test_bad_spaces_are_rejected_with_a_clear_message(changes, needle):
    with pytest.raises(SpaceError) as err:
        validate_plan(parse_space(small(**changes), source="bad.yaml"))
    assert needle in str(err.value)
    assert str(err.value).startswith("bad.yaml: ")


def test_the_cli_rejects_a_bad_space_before_starting_anything(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(small(parameters={"loss.margn": {"type": "uniform", "low": 0.1, "high": 0.5}})))
    storage = tmp_path / "studies"
    assert run.main([str(path), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'loss.margn'" in err and "did you mean 'loss.margin'" in err
    assert not storage.exists()  # nothing was created, no Ray was started
    assert run.main(["no_such_space", "--dry-run"]) == 2
    assert "no search space named 'no_such_space'" in capsys.readouterr().err
    assert run.main(["loss_comparison", "--dataset", "market1501", "--dry-run"]) == 2
    assert "give --data-root" in capsys.readouterr().err


def test_constraint_narrowing_always_satisfies_beta_below_alpha():
    space = parse_space(small())
    trials = validate_plan(space)
    assert len(trials) == 12 and {t.cell for t in trials} == {0, 1}
    random_plan = plan(parse_space(small(searcher={"type": "random", "seed": 1}, num_samples=200)))
    assert len(random_plan) == 400
    for trial in random_plan:
        assert 0.2 <= trial.params["loss.beta"] < trial.params["loss.alpha"] <= 2.0
    # Tight ranges: alpha in [0.5, 0.6], beta in [0.55, 1.0] leaves only beta in [0.55, 0.6).
    tight = parse_space(small(searcher={"type": "random", "seed": 2}, num_samples=100, parameters={
        "loss.alpha": {"type": "uniform", "low": 0.5, "high": 0.6},
        "loss.beta": {"type": "uniform", "low": 0.55, "high": 1.0}}))
    for trial in plan(tight):
        assert 0.55 <= trial.params["loss.beta"] < trial.params["loss.alpha"] <= 0.6


def test_integer_constraints_and_fixed_keys():
    space = parse_space(small(searcher={"type": "random", "seed": 0}, num_samples=50, constraints=["loss.k <= 8"],
                              parameters={"loss.k": {"type": "int", "low": 1, "high": 64, "log": True}}))
    ks = [t.params["loss.k"] for t in plan(space)]
    assert all(isinstance(k, int) and 1 <= k <= 8 for k in ks) and len(set(ks)) > 3
    # beta searched against the base alpha (1.2)
    space = parse_space(small(searcher={"type": "random", "seed": 0}, num_samples=50,
                              parameters={"loss.beta": {"type": "uniform", "low": 0.1, "high": 3.0}}))
    assert all(t.params["loss.beta"] < 1.2 for t in plan(space))


def test_grid_bundles_seeds_and_overrides():
    raw = small(searcher={"type": "grid"}, scheduler={"type": "none"}, constraints=[], seeds=[0, 1], num_samples=1,
                parameters={"row": {"type": "grid", "values": [
                    {"loss.name": "he", "loss.distance": "cosine", "loss.normalize": True},
                    {"loss.name": "triplet"}]},
                    "framework.momentum": {"type": "grid", "values": [0.995, 0.999]}})
    space = parse_space(raw)
    trials = validate_plan(space)
    assert len(trials) == 8
    assert trials[0].params == {"loss.name": "he", "loss.distance": "cosine", "loss.normalize": True,
                                "framework.momentum": 0.995, "train.seed": 0}
    assert space.searched_keys == ["loss.distance", "loss.name", "loss.normalize", "framework.momentum", "train.seed"]
    cfg = space.config_for(trials[0].params)
    assert cfg.loss.distance == "cosine" and cfg.framework.momentum == 0.995 and cfg.train.epochs == 4
    # --set: a config key pins a searched key (the parameter goes), a space key sets the space
    pinned = parse_space(raw, overrides=["framework.momentum=0.997", "num_samples=2", "scheduler.type=asha",
                                         "scheduler.grace_epochs=2"])
    assert [p.name for p in pinned.params] == ["row"] and pinned.base["framework.momentum"] == 0.997
    assert pinned.total_trials() == 2 * 2 * 2 and pinned.scheduler.milestones() == [2, 4]
    with pytest.raises(SpaceError, match="belongs to the bundle parameter 'row'"):
        parse_space(raw, overrides=["loss.distance=euclidean"])
    with pytest.raises(SpaceError, match="not a config key nor a space setting"):
        parse_space(raw, overrides=["los.name=he"])


def test_asha_rungs_are_evaluation_epochs():
    space = parse_space(small(base={"train": {"epochs": 60, "eval_period": 10}},
                              scheduler={"type": "asha", "grace_epochs": 10, "reduction_factor": 3}))
    assert space.scheduler.milestones() == [10, 30]
    space = parse_space(small(scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": 2, "max_epochs": 9}))
    assert space.epochs == 9 and space.scheduler.milestones() == [1, 2, 4, 8]


def _record(space, folder: Path, name: str = "s") -> OptunaRecord:
    """The study's Optuna record in a SQLite file under ``folder``, its studies created."""
    record = OptunaRecord(default_url(folder / name), study_names(space, name), space.mode)
    (folder / name).mkdir(parents=True, exist_ok=True)
    record.create(space.cells())
    return record


def test_optuna_searcher_runs_one_seeded_tpe_search_per_cell(tmp_path):
    space = parse_space(small(num_samples=5))
    record = _record(space, tmp_path)
    searcher = StudySearcher(space, record, startup_trials=2)
    configs = []
    for i in range(10):
        config = searcher.suggest(f"t{i}")
        assert isinstance(config, dict)
        configs.append(config)
        # A real completion (what the driver's OptunaRecorder writes), so that TPE leaves its start-up phase.
        cell = config[CELL_KEY]
        record.finish(cell, record.find(cell, f"t{i}"), optuna.trial.TrialState.COMPLETE,
                      100 * config["loss.beta"] / config["loss.alpha"])
    assert searcher.suggest("t10") == StudySearcher.FINISHED
    assert sorted(c[CELL_KEY] for c in configs) == [0] * 5 + [1] * 5
    assert {c["framework.name"] for c in configs if c[CELL_KEY] == 0} == {"baseline"}
    for config in configs:
        assert 0.2 <= config["loss.beta"] < config["loss.alpha"] <= 2.0
    for cell in (0, 1):
        assert [t.state for t in record.trials(cell)] == [optuna.trial.TrialState.COMPLETE] * 5
    # Same seed, same proposals.
    again_space = parse_space(small(num_samples=5))
    again = StudySearcher(again_space, _record(again_space, tmp_path, "again"), startup_trials=2)
    first = again.suggest("x")
    assert math.isclose(first["loss.alpha"], configs[0]["loss.alpha"])


def test_plan_searcher_hands_out_the_plan_then_finishes(tmp_path):
    space = load_space("quickstart")
    record = _record(space, tmp_path)
    searcher = StudySearcher(space, record)
    seen = [searcher.suggest(f"t{i}") for i in range(8)]
    assert searcher.suggest("t8") == StudySearcher.FINISHED
    assert [(c["loss.name"], c["framework.name"]) for c in seen[:2]] == [("triplet", "baseline"), ("triplet", "moreid")]
    # Grid trials are recorded too: one fixed-parameter RUNNING trial each, tied to its Tune trial.
    assert [t.user_attrs["tune_trial_id"] for t in record.trials(0)] == [f"t{i}" for i in range(8)]
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    restored = StudySearcher(space, record)
    restored.restore(str(path))
    assert restored.suggest("t9") == StudySearcher.FINISHED


def test_dataset_and_data_root_override_the_base(tmp_path, capsys):
    data = tmp_path / "veri"
    synthetic.generate(data, "veri776", ids=40, cams=2, images_per_id_cam=1, height=16, width=16)  # 20 train ids
    assert run.main(["loss_comparison", "--dry-run", "--data-root", str(data), "--set", "train.epochs=5"]) == 0
    out = capsys.readouterr().out
    assert f"veri776 at {data}" in out and "5 epochs" in out
    space = load_space("quickstart", ["data.dataset=market1501", f"data.root={data}"],
                       {"max_concurrent": 3, "workers_per_trial": 2, "gpus_per_worker": None, "cpus_per_worker": None})
    assert space.base["data.dataset"] == "market1501" and space.base["data.root"] == str(data)
    assert space.resources.max_concurrent == 3 and space.resources.workers_per_trial == 2
    assert space.resources.cpus_per_worker == 1


def test_resources_and_paths(tmp_path):
    path = Path(tmp_path / "s.yaml")
    path.write_text(yaml.safe_dump(small(resources={"cpus_per_worker": 0, "gpus_per_worker": 0})))
    with pytest.raises(SpaceError, match="a worker needs CPUs or GPUs"):
        load_space(path)
    with pytest.raises(SpaceError, match="search space file not found"):
        load_space(tmp_path / "missing.yaml")
