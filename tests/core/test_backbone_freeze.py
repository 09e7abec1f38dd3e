"""FastReID's freeze: during optim.freeze_iters the backbones are in eval mode and nothing moves them
(no gradient step, no weight decay, no momentum, no BatchNorm statistics); afterwards they train."""
from __future__ import annotations

import pytest
import torch

from reid_core.config import Config


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from reid_core.data import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("freeze") / "data", "market1501", ids=8, cams=2,
                              images_per_id_cam=4, height=64, width=32, seed=0)


def _trainer(root, out, **overrides):
    from reid_core.engine.trainer import Trainer

    base = {"data.dataset": "synthetic", "data.root": str(root), "data.height": 64, "data.width": 32,
            "data.batch_size": 16, "data.num_instance": 4, "data.workers": 0, "data.random_erasing": 0.0,
            "model.arch": "resnet18", "model.ibn": True, "model.non_local": True, "framework.name": "moreid",
            "framework.dict_size": 64, "framework.momentum": 0.9, "optim.name": "sgd", "optim.lr": 0.05,
            "optim.momentum": 0.9, "optim.weight_decay": 5e-3, "optim.freeze_iters": 2,
            "train.epochs": 1, "train.iters_per_epoch": 3, "train.device": "cpu", "train.log_every": 100,
            "train.output_dir": str(out), "eval.batch_size": 32}
    base.update(overrides)
    return Trainer(Config().replace(base), log_dir=out / "tb")


def _backbone_state(module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm running statistics included) of ``module.backbone``."""
    return {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}


def _changed(before, module) -> list[str]:
    after = module.backbone.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def test_frozen_backbones_are_in_eval_mode_and_unchanged_then_train(tiny_root, tmp_path):
    tr = _trainer(tiny_root, tmp_path)
    f_q, f_k = tr.model, tr.framework.key_encoder
    q0, k0 = _backbone_state(f_q), _backbone_state(f_k)
    heads0 = {n: p.detach().clone() for n, p in f_q.named_parameters()
              if not n.startswith("backbone.") and p.requires_grad}
    assert any(k.endswith("running_mean") for k in q0)
    batches = tr._batches()  # passes over the sampler without end
    for step in range(2):
        tr.framework.train()  # as train_epoch does at each epoch start: the freeze must hold anyway
        images, labels, _ = next(batches)
        tr.train_step(images, labels)
        assert not f_q.backbone.training and not f_k.backbone.training
        assert f_q.bnneck.training and f_k.bnneck.training  # heads keep training
        assert not any(m.training for m in f_q.backbone.modules())
    assert _changed(q0, f_q) == []  # weights and running statistics alike
    assert _changed(k0, f_k) == []
    # SGD with momentum and weight decay has not touched the backbone: no state kept for it either
    assert all(not tr.optimizer.state.get(p) for p in f_q.backbone.parameters())
    assert [n for n, p in f_q.named_parameters() if n in heads0 and torch.equal(p, heads0[n])] == []

    images, labels, _ = next(batches)
    tr.train_step(images, labels)  # step index 2 = freeze_iters: training again
    assert f_q.backbone.training and f_k.backbone.training
    changed = _changed(q0, f_q)
    assert "conv1.weight" in changed and "layer1.0.bn1.BN.running_mean" in changed and "bn1.running_var" in changed
    assert "layer2_nl.0.W.1.weight" in changed  # the non-local blocks froze with the backbone and now train
    assert "conv1.weight" in _changed(k0, f_k)  # f_k follows f_q again through the momentum update
    tr.close()


def test_resumed_run_inside_the_freeze_freezes_again(tiny_root, tmp_path):
    tr = _trainer(tiny_root, tmp_path, **{"optim.freeze_iters": 5})
    images, labels, _ = next(iter(tr.train_loader))
    tr.train_step(images, labels)
    path = tr.save_checkpoint(tmp_path / "ckpt")
    tr.close()
    resumed = _trainer(tiny_root, tmp_path / "b", **{"optim.freeze_iters": 5})
    resumed.load_checkpoint(path)
    before = _backbone_state(resumed.model)
    resumed.framework.train()
    resumed.train_step(images, labels)
    assert not resumed.model.backbone.training and _changed(before, resumed.model) == []
    resumed.close()
