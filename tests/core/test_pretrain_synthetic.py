"""reid_core.pretrain: a backbone pretrained on synthetic identities, deterministic, cached by its settings,
loaded strictly through ``model.pretrained``. Toy size (8 identities, 32 x 16 images, 2 steps)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from reid_core.config import ModelConfig
from reid_core.models.backbone import build_backbone
from reid_core.models.model import build_model
from reid_core.models.pretrained import PretrainedError
from reid_core.pretrain import SyntheticPretrain, ensure_pretrained, with_resolved_weights

TOY = SyntheticPretrain(ids=8, cams=2, images_per_id_cam=2, height=32, width=16, epochs=1, batch_size=16)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_made_once_deterministic_and_loaded_strictly_through_model_pretrained(tmp_path):
    data = tmp_path / "data"
    first = ensure_pretrained(TOY, tmp_path / "a", data)
    assert first.name == f"synthetic-resnet18-{TOY.key()}.pt" and first.is_file()
    summary = json.loads(Path(f"{first}.json").read_text())
    assert (summary["images"], summary["steps"], summary["key"]) == (32, 2, TOY.key())
    made = first.stat().st_mtime_ns
    assert ensure_pretrained(TOY, tmp_path / "a", data) == first and first.stat().st_mtime_ns == made  # cached
    # The same recipe made again elsewhere gives the same bits.
    second = ensure_pretrained(TOY, tmp_path / "b", data)
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Training moved the weights away from the seeded initialisation.
    torch.manual_seed(TOY.seed)
    init = build_backbone("resnet18", last_stride=1).state_dict()
    assert not torch.equal(a["backbone.conv1.weight"], init["conv1.weight"])
    # model.pretrained: the file loads strictly into the study's model, every backbone tensor from it.
    model = build_model(ModelConfig(arch="resnet18", pretrained=str(first)), num_classes=5)
    report = model.backbone.pretrained_report
    assert report.form == "backbone-prefixed" and report.loaded == len(a)
    assert torch.equal(model.backbone.state_dict()["conv1.weight"], a["backbone.conv1.weight"])
    # model.pretrained: synthetic names the default recipe's file in pretrained_cache; found there, it is
    # loaded, not made again (a toy file stands in for it: the backbone's shapes do not depend on the data).
    cache = tmp_path / "cache"
    cache.mkdir()
    stand_in = cache / SyntheticPretrain().file_name()
    stand_in.write_bytes(first.read_bytes())
    cfg = ModelConfig(arch="resnet18", pretrained="synthetic", pretrained_cache=str(cache))
    with pytest.raises(PretrainedError, match="resolve it with reid_core.pretrain.resolve_weights"):
        build_model(cfg, num_classes=5)  # made by a training run, above the models: resolved first
    model = build_model(with_resolved_weights(cfg), num_classes=5)
    assert model.backbone.pretrained_report.path == str(stand_in)
    assert torch.equal(model.backbone.state_dict()["conv1.weight"], a["backbone.conv1.weight"])
    assert sorted(p.name for p in cache.iterdir()) == [stand_in.name]  # nothing trained, no lock taken


def test_key_follows_every_setting_and_the_study_seed_is_refused(tmp_path):
    keys = {TOY.key(), replace(TOY, ids=9).key(), replace(TOY, data_seed=2).key(), replace(TOY, epochs=2).key(),
            replace(TOY, arch="resnet34").key(), replace(TOY, lr=2e-3).key()}
    assert len(keys) == 6
    assert replace(TOY).key() == TOY.key()
    with pytest.raises(ValueError, match="data_seed 0 is the studies' generator seed"):
        replace(TOY, data_seed=0)
    with pytest.raises(ValueError, match="ids must be at least 2"):
        replace(TOY, ids=1)
    done = subprocess.run([sys.executable, "-m", "reid_core.pretrain", "--epochs", "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "epochs must be a positive integer, got 0" in done.stderr
