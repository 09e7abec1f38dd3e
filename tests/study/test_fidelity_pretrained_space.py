"""search_spaces/fidelity_pretrained.yaml: its plan, and its settings against the authors' regime and the
`fidelity` study it is compared with (nothing is trained: the pretraining is made by the first trial)."""
from __future__ import annotations

from collections import Counter

from reid_core.config import flatten
from study.space import load_space, validate_plan

AUTHORS_ITERS = 60 * 148  # ~8,850: 60 epochs of 148 iterations
AUTHORS_WARMUP, AUTHORS_FREEZE, AUTHORS_MOMENTUM = 2000, 1000, 0.997


def test_plan_cells_seeds_and_settings_follow_the_authors_shape_and_the_fidelity_benchmark():
    space = load_space("fidelity_pretrained")
    trials = validate_plan(space)
    assert len(trials) == 40
    cells = Counter(tuple(sorted((k, v) for k, v in t.params.items() if k != "train.seed")) for t in trials)
    assert len(cells) == 8 and set(cells.values()) == {5}
    assert sorted({t.params["train.seed"] for t in trials}) == [0, 1, 2, 3, 4]
    must = [{"framework.name": fw, "loss.name": loss} for fw in ("moreid", "baseline") for loss in ("he", "triplet")]
    must.append({"framework.name": "moreid", "loss.name": "he", "framework.include_past_positives": True})
    for cell in must:
        assert any(dict(c) == cell for c in cells), cell
    cfg = flatten(trials[0].config)
    iters = cfg["train.epochs"] * cfg["train.iters_per_epoch"]
    assert iters == 250
    # Warmup and freeze: the authors' fractions of the run, to the nearest iteration.
    assert abs(cfg["optim.warmup_iters"] - AUTHORS_WARMUP / AUTHORS_ITERS * iters) < 1
    assert abs(cfg["optim.freeze_iters"] - AUTHORS_FREEZE / AUTHORS_ITERS * iters) < 1
    # f_k's time constant 1 / (1 - m) as the authors' share of the run (3.8 %), m rounded to 0.9.
    share = 1 / (1 - AUTHORS_MOMENTUM) / AUTHORS_ITERS
    assert abs(cfg["framework.momentum"] - (1 - 1 / (share * iters))) < 0.01
    assert cfg["optim.cosine_delay_epochs"] * 2 == cfg["train.epochs"]  # constant for half the run, as 30 of 60
    assert (cfg["model.pretrained"], cfg["model.classifier"], cfg["model.cls_scale"], cfg["model.cls_margin"]) == (
        "synthetic", "circle", 64.0, 0.35)
    assert (cfg["loss.he_margin"], cfg["loss.he_scale"], cfg["loss.normalize"]) == (0.0, 1.0, False)
    assert cfg["loss.margin"] == 0.0  # Triplet: soft margin
    # The benchmark is `fidelity`'s, so that the two regimes differ in start and schedule only.
    base = flatten(validate_plan(load_space("fidelity"))[0].config)
    for key in [k for k in cfg if k.startswith("data.")] + ["model.arch", "model.last_stride", "model.pooling",
                                                           "framework.dict_size", "optim.name", "optim.lr"]:
        assert cfg[key] == base[key], key
    assert base["model.pretrained"] == "" and base["train.epochs"] * 50 == iters
