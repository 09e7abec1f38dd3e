"""cluster.yaml: accepted by Ray's own cluster-config validator (the checks `ray up` runs), and shaped as
the study needs: a CPU head, autoscaled GPU worker types, the project installed, shared storage mounted."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_validator_accepts_cluster_yaml():
    config = prepare_config(load())  # what `ray up` does first: defaults of the provider merged in
    validate_config(config)  # raises on any schema or consistency error
    assert config["provider"]["type"] == "aws"


def test_ray_validator_rejects_a_broken_copy():
    bad = load()
    bad["available_node_types"]["gpu_1x"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(prepare_config(bad))
    bad = load()
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


def test_cluster_shape_fits_the_study():
    config = load()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "at least one GPU worker node type"
    for t in gpu_types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    assert sum(t["max_workers"] for t in gpu_types.values()) <= config["max_workers"]
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "-e ." in setup and "constraints.txt" in setup
    assert "/mnt/shared" in setup and "mount" in setup
    assert config["file_mounts"]["~/moreid"] == "."
    head_start = "\n".join(config["head_start_ray_commands"])
    assert "--include-dashboard=true" in head_start and "--head" in head_start
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    # The search spaces' default trial (1 GPU, 8 CPUs per worker) fits the one-GPU node type.
    assert any(t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 8 for t in gpu_types.values())
