"""cluster.yaml (AWS) and cluster-onprem.yaml (a lab's own servers, Ray's `local` provider): accepted by Ray's
own cluster-config validator (the checks `ray up` runs), and shaped as the study needs. AWS: a CPU head,
autoscaled GPU worker types. On-prem: listed servers. Both: the project installed, shared storage mounted,
the dashboard on. Security: the token on every node and every `ray start` in token mode, the dashboard on
the head's 127.0.0.1, one head command everywhere (README's included), the AWS security group and scoped
instance profiles (cluster/aws policies), the on-prem firewall."""
from __future__ import annotations

import copy
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

from helpers import ray_starts

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


# ---- security: token authentication, bind addresses, security group, instance profiles -----------------

README = CLUSTER_YAML.with_name("README.md")
AWS_POLICIES = CLUSTER_YAML.parent / "cluster" / "aws"


@pytest.mark.parametrize("path", [CLUSTER_YAML, ONPREM_YAML], ids=["aws", "onprem"])
def test_every_ray_start_uses_the_token_and_no_public_dashboard(path):
    config = load(path)
    starts = {kind: ray_starts(config[f"{kind}_start_ray_commands"]) for kind in ("head", "worker")}
    assert len(starts["head"]) == 1 and len(starts["worker"]) == 1
    for env, args, command in starts["head"] + starts["worker"]:
        assert env == {"RAY_AUTH_MODE": "token"}, command
        # the token file is owner-only before Ray reads it (rsync keeps the mode it had where `ray up` ran)
        assert command.index("chmod 600 ~/.ray/auth_token") < command.index("ray start"), command
        assert "chmod 700 ~/.ray" in command
        assert not any(a.startswith("--dashboard-host") and not a.endswith("=127.0.0.1") for a in args)
    _, head_args, _ = starts["head"][0]
    assert "--dashboard-host=127.0.0.1" in head_args and "--include-dashboard=true" in head_args
    assert "0.0.0.0" not in "\n".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    # every node gets the token from the machine that runs `ray up`, at Ray's default place, and from
    # outside the repository (the repository itself is copied to every node)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # clients on the nodes (the study driver, `ray status`) send the token too
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in config["setup_commands"])


def test_head_command_is_the_same_in_both_files_and_in_the_readme():
    """One head command: the AWS file adds only its fixed object-manager port; README's hand-started head
    is the on-prem command without the autoscaler's config (tests/ray/test_cluster_auth.py runs that one)."""
    def head(path):
        (env, args, _), = ray_starts(load(path)["head_start_ray_commands"])
        return env, [a for a in args if not a.startswith("--autoscaling-config=")]

    aws_env, aws_args = head(CLUSTER_YAML)
    onprem = head(ONPREM_YAML)
    assert (aws_env, [a for a in aws_args if not a.startswith("--object-manager-port=")]) == onprem
    readme_lines = [line.split("#")[0] for line in README.read_text().splitlines() if "ray start --head" in line]
    readme_heads = [(env, args) for env, args, _ in ray_starts(readme_lines)]
    assert readme_heads == [onprem]
    readme_workers = [line.split("#")[0] for line in README.read_text().splitlines()
                      if "ray start --address" in line]
    assert [env for env, _, _ in ray_starts(readme_workers)] == [{"RAY_AUTH_MODE": "token"}]
    assert "get-auth-token --generate >/dev/null" in README.read_text()  # made by Ray, never printed


def test_aws_nodes_are_in_their_own_security_group_with_scoped_profiles():
    """Every node type names the security group: Ray then makes none of its own (Ray 2.60's default group
    lets SSH in from 0.0.0.0/0), and `ray up` stops when the group does not exist. A named head profile
    keeps Ray from creating its default one (EC2 and S3 full access)."""
    config = load()
    groups = set()
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        groups.update(node["SecurityGroupIds"])
        assert node["MetadataOptions"] == {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}, name
        expected = "moreid-study-head" if name == config["head_node_type"] else "moreid-study-worker"
        assert node["IamInstanceProfile"] == {"Name": expected}, name
    assert groups == {"SECURITY_GROUP_ID"}  # one group, a placeholder that fails until it is set
    assert "security_group" not in config["provider"]  # Ray's own rules would add SSH from anywhere
    assert config["provider"]["use_internal_ips"] is False  # explained in the file; Ray links nodes privately


def _statements(name: str) -> list[dict]:
    import json

    policy = json.loads((AWS_POLICIES / name).read_text())
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_head_policy_launches_and_ends_only_this_clusters_workers():
    config = load()
    worker_types = {t["node_config"]["InstanceType"] for n, t in config["available_node_types"].items()
                    if n != config["head_node_type"]}
    statements = _statements("head-policy.json")
    actions = [a for s in statements for a in _as_list(s["Action"])]
    assert all(s["Effect"] == "Allow" for s in statements)
    assert not [a for a in actions if "*" in a]  # no ec2:*, no s3:*
    assert not [a for a in actions if a.startswith("s3:")]  # storage rights live in the bucket policy
    for s in statements:
        if "*" in _as_list(s["Resource"]):
            assert all(a.startswith("ec2:Describe") for a in _as_list(s["Action"])), s["Sid"]
    launch = [s for s in statements if "ec2:RunInstances" in _as_list(s["Action"])
              and any(":instance/" in r for r in _as_list(s["Resource"]))]
    assert len(launch) == 1
    condition = launch[0]["Condition"]["StringEquals"]
    assert set(condition["ec2:InstanceType"]) == worker_types
    assert condition["aws:RequestTag/ray-cluster-name"] == config["cluster_name"]
    terminate, = [s for s in statements if "ec2:TerminateInstances" in _as_list(s["Action"])]
    assert terminate["Condition"] == {"StringEquals": {"aws:ResourceTag/ray-cluster-name": config["cluster_name"]}}
    network = [r for s in statements for r in _as_list(s["Resource"]) if ":security-group/" in r]
    assert network and all(r.endswith("/SECURITY_GROUP_ID") for r in network)
    pass_role, = [s for s in statements if "iam:PassRole" in _as_list(s["Action"])]
    assert pass_role["Resource"].endswith(":role/moreid-study-worker")
    assert [a for a in actions if a.startswith("iam:")] == ["iam:PassRole"]


def test_bucket_policy_reaches_the_study_bucket_only():
    statements = _statements("study-bucket-policy.json")
    for s in statements:
        assert s["Effect"] == "Allow"
        assert all(a.startswith("s3:") and "*" not in a for a in _as_list(s["Action"])), s["Sid"]
        assert all(r in ("arn:aws:s3:::STUDY_BUCKET", "arn:aws:s3:::STUDY_BUCKET/studies/*")
                   for r in _as_list(s["Resource"])), s["Sid"]
    trust, = _statements("ec2-trust-policy.json")
    assert trust["Principal"] == {"Service": "ec2.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"


def test_onprem_file_asks_for_a_firewall():
    text = ONPREM_YAML.read_text()
    assert "without a firewall" not in text
    assert "ufw default deny incoming" in text and "port 22" in text
