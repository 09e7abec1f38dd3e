"""A training step does not synchronize with the device: its statistics are read in one batch every
``train.log_every`` steps.

The calls that make the host wait for a device (a value read: ``item``, ``tolist``, ``int``/``float``/
``bool``/``index`` of a tensor; a data-dependent shape: ``nonzero``, ``masked_select``, ``unique``,
boolean-mask indexing; a copy to the host: ``cpu``) are wrapped with counting functions while CPU steps
run. On the CPU they return at once, but every one of them would block on a GPU. Adam's step counters
are excluded by identity: PyTorch keeps them on the host unless ``capturable``, so reading them waits
for nothing.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

from reid_core.config import Config
from reid_core.data import DatasetError, synthetic
from reid_core.engine.trainer import Trainer, TrainStep
from reid_core.models import build_model
from reid_core.moreid import build_framework

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "cpu")
FUNCTIONS = ("nonzero", "masked_select", "unique", "argwhere")


@contextlib.contextmanager
def count_syncs(exclude=lambda: (), calls: list[str] | None = None):
    """Yields a list (``calls``, or a new one) that receives the name of every synchronizing call made
    inside the block."""
    calls = [] if calls is None else calls
    saved = {}

    def wrap(owner, name, check=None):
        original = getattr(owner, name)
        saved[(owner, name)] = original

        def counting(*args, **kwargs):
            tensor = args[0] if args else None
            if check is None or check(*args):
                if not any(tensor is t for t in exclude()):
                    calls.append(name)
            return original(*args, **kwargs)

        setattr(owner, name, counting)

    def bool_index(tensor, index):
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    for name in READS:
        wrap(torch.Tensor, name)
    for name in FUNCTIONS:
        wrap(torch, name)
    wrap(torch.Tensor, "__getitem__", bool_index)
    try:
        yield calls
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)


def _adam_steps(optimizer):
    return lambda: [s["step"] for s in optimizer.state.values() if "step" in s]


def _cfg(**overrides) -> Config:
    base = {"model.arch": "resnet18", "data.batch_size": 8, "data.num_instance": 4, "framework.dict_size": 32,
            "optim.grad_clip": 5.0, "optim.freeze_iters": 2, "optim.warmup_iters": 3, "train.device": "cpu"}
    return Config().replace({**base, **overrides})


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 32, 16, generator=g), torch.tensor([3, 3, 3, 3, 5, 5, 5, 5]) + seed % 2


@pytest.mark.parametrize("overrides", [
    {"framework.name": "moreid", "loss.name": "he"},
    {"framework.name": "moreid", "loss.name": "triplet", "loss.triplet_mining": "weighted"},
    {"framework.name": "baseline", "loss.name": "he"},
    {"framework.name": "baseline", "loss.name": "triplet", "loss.triplet_mining": "weighted"},
], ids=["moreid-he", "moreid-weighted", "baseline-he", "baseline-weighted"])
def test_train_steps_make_no_synchronizing_call(overrides):
    cfg = _cfg(**overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=8)
    framework = build_framework(cfg, model).train()
    step = TrainStep(cfg, framework, model, torch.device("cpu"), iters_per_epoch=10)
    step(*_batch(0))  # creates the optimizer state
    with count_syncs(_adam_steps(step.optimizer)) as calls:
        for i in range(1, 4):  # through the freeze's end and the warmup
            out = step(*_batch(i))
    assert calls == []
    # the counter does see a read: the statistics of the last step
    with count_syncs() as calls:
        stats = out.stats
    assert calls == ["tolist"] and stats["valid"] == 8.0


def test_a_batch_with_more_than_k_images_of_an_identity_is_refused():
    cfg = _cfg(**{"framework.name": "moreid", "loss.name": "he"})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=8)
    framework = build_framework(cfg, model).train()
    step = TrainStep(cfg, framework, model, torch.device("cpu"), iters_per_epoch=10)
    images, _ = _batch(0)
    with pytest.raises(DatasetError, match="5 images of identity 3, more than data.num_instance = 4"):
        step(images, torch.tensor([3, 3, 3, 3, 3, 5, 5, 5]))
    assert step.iteration == 0 and framework.dictionary.ptr == 0


def test_past_positives_ablation_reads_one_count_per_step():
    cfg = _cfg(**{"framework.name": "moreid", "loss.name": "he", "framework.include_past_positives": True})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=8)
    step = TrainStep(cfg, build_framework(cfg, model).train(), model, torch.device("cpu"), iters_per_epoch=10)
    step(*_batch(0))
    with count_syncs(_adam_steps(step.optimizer)) as calls:
        step(*_batch(1))
    assert calls == ["__int__"]  # the largest positive count sizes the top-k


def test_trainer_reads_the_statistics_once_per_log_step(tmp_path):
    root = synthetic.generate(tmp_path / "data", "market1501", ids=8, cams=2, images_per_id_cam=2, height=32,
                              width=16, seed=0)
    cfg = _cfg(**{"data.dataset": "synthetic", "data.root": str(root), "data.height": 32, "data.width": 16,
                  "data.workers": 0, "train.log_every": 3, "train.iters_per_epoch": 7,
                  "train.output_dir": str(tmp_path / "run"), "framework.name": "moreid", "loss.name": "he"})
    trainer = Trainer(cfg)
    batches = [batch for batch, _ in zip(trainer._batches(), range(7))]
    trainer._batches = lambda: iter(batches)  # the loader's own reads are not the step's
    events: list[str] = []  # step marks and synchronizing calls, in order
    inner = trainer.train_step

    def marked(images, labels):
        events.append("|")
        return inner(images, labels)

    trainer.train_step = marked
    with count_syncs(_adam_steps(trainer.optimizer), events):
        metrics = trainer.train_epoch()
    per_step = [Counter(chunk.split()) for chunk in " ".join(events).split("|")[1:]]
    # iterations 1..7; the statistics are read after iterations 3 and 6, once each
    assert [dict(c) for c in per_step[:-1]] == [{}, {}, {"tolist": 1}, {}, {}, {"tolist": 1}]
    assert metrics["epoch"] == 1 and metrics["loss/total"] > 0
    trainer.close()
