"""Training engine: schedule, optimizer, freezing, checkpoints, TensorBoard, and short real trainings."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from reid_core.config import Config
from reid_core.engine import checkpoint as ckpt
from reid_core.engine.optim import WarmupCosineLR, build_optimizer, build_scheduler, lr_at
from reid_core.engine.tensorboard import ScalarLogger


def _scalar_tags(log_dir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


# ---- schedule -------------------------------------------------------------

def _lrs(total: int, **kw) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, total_iters=total, **kw)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedule_warmup_delay_cosine_shape():
    lrs = _lrs(100, warmup_iters=10, warmup_factor=0.1, delay_iters=30, eta_min=0.01)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear rise to 1 at it = 10
    assert lrs[10:31] == pytest.approx([1.0] * 21)  # constant through the delay; cosine starts at 1
    assert lrs[53] == pytest.approx(0.01 + 0.99 * 0.75)  # progress 23/69 = 1/3: (1 + cos(pi/3)) / 2
    assert all(a > b for a, b in zip(lrs[30:99], lrs[31:100]))
    assert lrs[99] == pytest.approx(0.01)  # eta_min exactly at the last iteration


def test_schedule_without_delay_and_warmup_longer_than_delay():
    plain = _lrs(50, eta_min=0.0)
    assert plain[0] == pytest.approx(1.0) and plain[-1] == pytest.approx(0.0, abs=1e-12)
    assert plain[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 49)))
    mixed = _lrs(50, warmup_iters=20, warmup_factor=0.5, delay_iters=10, eta_min=0.0)
    # during warmup the cosine value is scaled by the warmup factor
    assert mixed[15] == pytest.approx((0.5 + 0.5 * 15 / 20) * 0.5 * (1 + math.cos(math.pi * 5 / 39)))
    # a delay as long as the run means a constant lr
    assert _lrs(20, delay_iters=20) == pytest.approx([1.0] * 20)


def test_build_scheduler_counts_iterations_from_config_and_resumes():
    cfg = Config().replace({"train.epochs": 4, "optim.lr": 0.2, "optim.warmup_iters": 3,
                            "optim.cosine_delay_epochs": 1, "optim.eta_min": 0.001})
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(cfg, opt, iters_per_epoch=5)
    assert (sched.total_iters, sched.delay_iters) == (20, 5)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched2 = build_scheduler(cfg, opt2, iters_per_epoch=5)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    expected = lr_at(8, 0.2, total_iters=20, warmup_iters=3, warmup_factor=0.1, delay_iters=5, eta_min=0.001)
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected)


# ---- optimizer ------------------------------------------------------------

class _TwoEncoders(nn.Module):
    """The shape the optimizer cares about: f_q trains, f_k is updated by momentum only."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.key_encoder = nn.Linear(4, 3).requires_grad_(False)
        self.loss_scale = nn.Parameter(torch.ones(1))


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optimizer_covers_f_q_and_loss_params_only(name):
    fw = _TwoEncoders()
    cfg = Config().replace({"optim.name": name, "optim.lr": 0.01, "optim.weight_decay": 1e-3})
    opt = build_optimizer(cfg, fw)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(fw.encoder.weight), id(fw.encoder.bias), id(fw.loss_scale)}
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-3 and group["lr"] == 0.01
    if name == "sgd":
        assert isinstance(opt, torch.optim.SGD) and group["nesterov"] and group["momentum"] == 0.9
    else:
        assert isinstance(opt, torch.optim.Adam)


# ---- checkpoint helpers and TensorBoard -----------------------------------

def test_save_atomic_resolves_folders_and_leaves_no_temp_files(tmp_path):
    out = ckpt.save_atomic({"a": torch.arange(3)}, tmp_path / "sub" / "x.pt")
    assert out == tmp_path / "sub" / "x.pt"
    folder = tmp_path / "ray_ckpt"
    folder.mkdir()
    assert ckpt.save_atomic({"b": 1}, folder) == folder / ckpt.CHECKPOINT_FILE
    assert ckpt.load(folder)["b"] == 1
    assert torch.equal(ckpt.load(out)["a"], torch.arange(3))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.pt"]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ckpt.load(tmp_path / "missing.pt")


def test_rng_state_round_trip_reproduces_every_generator():
    ckpt.seed_all(3)
    state = ckpt.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.seed_all(99)
    ckpt.set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_scalar_logger_writes_tags_and_skips_non_numbers(tmp_path):
    log = ScalarLogger(tmp_path)
    log.scalars("train", {"loss/total": 1.5, "cmc": [1.0, 2.0], "bad": float("nan"), "flag": True}, step=3)
    log.close()
    tags = _scalar_tags(tmp_path)
    assert set(tags) == {"train/loss/total"}
    assert tags["train/loss/total"][0].step == 3 and tags["train/loss/total"][0].value == 1.5
    silent = ScalarLogger(None)
    silent.scalars("train", {"x": 1.0}, 0)
    assert not silent.enabled
