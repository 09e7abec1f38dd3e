"""cluster.yaml (AWS) and cluster-onprem.yaml (a lab's own servers, Ray's `local` provider): accepted by Ray's
own cluster-config validator (the checks `ray up` runs), and shaped as the study needs. AWS: a CPU head,
autoscaled GPU worker types. On-prem: listed servers. Both: the project installed, shared storage mounted,
the dashboard on."""
from __future__ import annotations

import copy
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
ONPREM_YAML = CLUSTER_YAML.with_name("cluster-onprem.yaml")


def load(path: Path = CLUSTER_YAML) -> dict:
    return yaml.safe_load(path.read_text())


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


def test_ray_validator_accepts_cluster_onprem_yaml():
    config = prepare_config(load(ONPREM_YAML))  # the local provider's single node type is filled in here
    validate_config(config)
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and len(provider["worker_ips"]) >= 2
    (node_type,) = config["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(provider["worker_ips"])


def test_ray_rejects_broken_copies_of_cluster_onprem_yaml():
    bad = load(ONPREM_YAML)
    del bad["provider"]["worker_ips"]
    with pytest.raises(click.ClickException, match="worker_ips"):
        prepare_config(bad)
    bad = load(ONPREM_YAML)
    bad["auth"]["ssh_usr"] = bad["auth"].pop("ssh_user")
    with pytest.raises(jsonschema.ValidationError, match="ssh_usr"):
        validate_config(prepare_config(bad))


def test_cluster_onprem_shape_fits_the_study():
    config = load(ONPREM_YAML)
    assert config["auth"]["ssh_user"] and config["auth"]["ssh_private_key"]
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "-e ." in setup and "constraints.txt" in setup
    assert "mountpoint -q /mnt/shared" in setup and "mount -t nfs" in setup and "MOREID_CACHE=/mnt/shared" in setup
    assert config["file_mounts"]["~/moreid"] == "."
    head_start = "\n".join(config["head_start_ray_commands"])
    assert "--include-dashboard=true" in head_start and "--head" in head_start and "--port=6379" in head_start
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
