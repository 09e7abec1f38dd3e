"""Config construction, validation and --set overrides (reid_core/config.py)."""
from __future__ import annotations

import pytest
import yaml

from reid_core.config import Config, ConfigError, apply_overrides, config_keys, flatten, parse_override


def _error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Config().replace(overrides)
    return str(info.value)


def test_defaults_are_valid_and_flatten_to_every_key():
    cfg = Config().validate()
    flat = flatten(cfg)
    assert set(flat) == config_keys()
    assert flat["framework.momentum"] == 0.997 and flat["data.synthetic.ids"] == 60


@pytest.mark.parametrize("tree, dotted", [
    ({"loss": {"kk": 1}}, "loss.kk"),
    ({"data": {"synthetic": {"idz": 3}}}, "data.synthetic.idz"),
    ({"trian": {"epochs": 3}}, "trian"),
])
def test_unknown_key_is_named_with_its_dotted_path(tree, dotted):
    with pytest.raises(ConfigError, match=rf"unknown config key '{dotted}'"):
        Config.from_dict(tree)


@pytest.mark.parametrize("overrides, words", [
    ({"loss.alpha": 1.0, "loss.beta": 1.0}, "loss.beta"),
    ({"loss.alpha": 0.5, "loss.beta": 0.8}, "loss.beta"),
    ({"framework.momentum": 1.0}, "framework.momentum"),
    ({"framework.momentum": 0.0}, "framework.momentum"),
    ({"framework.momentum": -0.5}, "framework.momentum"),
    ({"loss.k": 0}, "loss.k"),
    ({"loss.margin": -0.1}, "loss.margin"),
    ({"loss.name": "arcface"}, "loss.name"),
    ({"loss.k": 2.5}, "loss.k"),
    ({"train.amp": 1}, "train.amp"),
    ({"optim.lr": float("nan")}, "optim.lr"),
    ({"data.batch_size": 60, "data.num_instance": 16}, "data.batch_size"),
    ({"framework.name": "baseline", "framework.test_encoder": "key"}, "framework.test_encoder"),
])
def test_impossible_values_are_rejected_by_name(overrides, words):
    assert words in _error(overrides)


def test_boundary_values_are_accepted():
    cfg = Config().replace({"loss.k": 1, "loss.margin": 0.0, "loss.alpha": 1.2, "loss.beta": 1.19,
                            "framework.momentum": 0.999})
    assert (cfg.loss.k, cfg.loss.margin, cfg.framework.momentum) == (1, 0.0, 0.999)


def test_set_parsing_types_and_errors():
    assert parse_override("loss.k=5") == ("loss.k", 5)
    assert parse_override("train.amp=false") == ("train.amp", False)
    assert parse_override("data.root=/data/a=b") == ("data.root", "/data/a=b")
    assert parse_override(" loss.name = he") == ("loss.name", "he")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("loss.k")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")
    tree = apply_overrides({"loss": {"k": 15}}, ["loss.k=3", "optim.lr=1e-3", "optim.eta_min=5e-7"])
    cfg = Config.from_dict(tree).validate()
    # YAML 1.1 leaves "1e-3" a string; float keys still accept it.
    assert cfg.loss.k == 3 and cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.eta_min == pytest.approx(5e-7)
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        Config.from_dict(apply_overrides({}, ["optim.lr=fast"]))
    with pytest.raises(ConfigError, match="loss.k"):
        Config.from_dict(apply_overrides({}, ["loss.k.x=1"]))


def test_from_yaml_applies_overrides_and_names_bad_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"loss": {"name": "triplet"}, "train": {"epochs": 3}}))
    cfg = Config.from_yaml(path, ["train.epochs=5", "framework.name=baseline"])
    assert (cfg.loss.name, cfg.train.epochs, cfg.framework.name) == ("triplet", 5, "baseline")
    with pytest.raises(ConfigError, match="loss.bogus"):
        Config.from_yaml(path, ["loss.bogus=1"])
    with pytest.raises(ConfigError, match="not found"):
        Config.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_yaml(bad)
