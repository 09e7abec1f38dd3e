"""Checkpoints read from shared study folders: only tensors and plain values are loaded (a planted pickle is
refused and its code never runs), what the trainer writes is tensor-only (RNG states included), checkpoints
of the earlier format (numpy RNG state as an ndarray) still resume, and files are written owner-only."""
from __future__ import annotations

import os
import pickle
import random
import stat

import numpy as np
import pytest
import torch

from reid_core.engine import checkpoint as ckpt


class Planted:
    """Unpickling this runs ``touch <marker>``: what a malicious file in a study folder would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _planted_state(marker) -> dict:
    return {"format": 1, "epoch": 3, "model": {"w": torch.zeros(2)}, "rng": [Planted(marker)]}


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_planted_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    planted = tmp_path / "trial" / "checkpoint_000002" / "checkpoint.pt"
    planted.parent.mkdir(parents=True)
    torch.save(_planted_state(marker), planted)

    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load(planted.parent)  # a Ray checkpoint folder, as --resume hands it over
    message = str(caught.value)
    assert "\n" not in message and str(planted) in message and "posix.system" in message
    assert not marker.exists()

    # The file is live: an unrestricted load runs its payload (what weights_only=False did before).
    torch.load(planted, weights_only=False)
    assert marker.exists()


def test_planted_plain_pickle_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    planted = tmp_path / "checkpoint.pt"
    planted.write_bytes(pickle.dumps(_planted_state(marker)))
    with pytest.raises(ckpt.CheckpointError, match="not a torch.save archive") as caught:
        ckpt.load(planted)
    assert str(planted) in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()
    pickle.loads(planted.read_bytes())  # the payload is real
    assert marker.exists()


def test_checkpoint_state_is_tensor_only_and_restores_every_generator(tmp_path):
    ckpt.seed_all(11)
    path = ckpt.save_atomic({"format": 1, "rng": [ckpt.rng_state()], "config": {"a": (1, 2.0, None, "x")}},
                            tmp_path / "checkpoint.pt")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)  # plain torch, no allowlist
    ckpt.seed_all(99)
    ckpt.set_rng_state(ckpt.load(path)["rng"][0])
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]
    assert state["config"] == {"a": (1, 2.0, None, "x")}


def test_checkpoint_of_the_earlier_format_still_resumes(tmp_path):
    """Written as before: numpy's state a tuple with a uint32 ndarray, python's a tuple of ints."""
    ckpt.seed_all(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    path = tmp_path / "old.pt"
    torch.save({"format": 1, "epoch": 2, "rng": [old]}, path)
    expected = (np.random.standard_normal(3), random.random())
    ckpt.seed_all(0)
    ckpt.set_rng_state(ckpt.load(path)["rng"][0])
    assert np.array_equal(np.random.standard_normal(3), expected[0]) and random.random() == expected[1]

    # The numpy allowance covers numpy's arrays only: the same file with a payload is still refused.
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "rng": [old], "extra": Planted(marker)}, path)
    with pytest.raises(ckpt.CheckpointError, match="posix.system"):
        ckpt.load(path)
    assert not marker.exists()


def test_checkpoints_are_owner_only_whatever_the_umask(tmp_path):
    previous = os.umask(0)  # the most permissive umask: modes must not come from it
    try:
        target = tmp_path / "study" / "trial" / "checkpoints" / "checkpoint.pt"
        (tmp_path / "study").mkdir(mode=0o755)
        ckpt.save_atomic({"w": torch.ones(2)}, target)
        ckpt.save_atomic({"w": torch.zeros(2)}, target)  # the replacement too
    finally:
        os.umask(previous)
    assert _mode(target) == 0o600
    assert _mode(target.parent) == 0o700 and _mode(target.parent.parent) == 0o700
    assert _mode(tmp_path / "study") == 0o755  # a folder that existed is left as it was
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint.pt"]
    assert torch.equal(ckpt.load(target)["w"], torch.zeros(2))
