"""ReIDModel and its parts: shapes, strides, IBN-a, non-local blocks, GeM, BNNeck, local weights."""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn

from reid_core.config import ModelConfig
from reid_core.models.classifier import CircleClassifier, LinearClassifier
from reid_core.models import (IBN, DotProductNonLocal, GeM, NonLocal, PretrainedError, ReIDModel, ReIDOutput,
                              ResNetBackbone, build_backbone, build_model, load_pretrained)


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("arch, dim", [("resnet18", 512), ("resnet34", 512)])
def test_small_archs_forward_in_train_and_eval_mode(arch, dim):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch), num_classes=7)
    x = torch.randn(2, 3, 64, 32)
    out = model(x)
    assert isinstance(out, ReIDOutput)
    assert model.feat_dim == dim
    assert out.feat.shape == (2, dim) and out.bn_feat.shape == (2, dim) and out.logits.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, ReIDOutput) and out.logits.shape == (2, 7)


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_large_archs_feature_dim(arch):
    model = build_model(ModelConfig(arch=arch, last_stride=1), num_classes=3).eval()
    x = torch.randn(1, 3, 32, 16)
    with torch.no_grad():
        out = model(x)
        fmap = model.backbone(x)
    assert model.feat_dim == 2048
    assert out.feat.shape == (1, 2048) and out.bn_feat.shape == (1, 2048) and out.logits.shape == (1, 3)
    assert fmap.shape == (1, 2048, 2, 1)  # last stride 1 on Bottleneck blocks: stride 16


@pytest.mark.parametrize("last_stride, size", [(1, (4, 2)), (2, (2, 1))])
def test_last_stride_sets_feature_map_stride(last_stride, size):
    backbone = ResNetBackbone("resnet18", last_stride=last_stride).eval()
    with torch.no_grad():
        fmap = backbone(torch.randn(1, 3, 64, 32))
    assert fmap.shape == (1, 512, *size)  # stride 16 or 32 on a 64 x 32 input


@pytest.mark.parametrize("arch, blocks", [("resnet18", 6), ("resnet50", 13)])
def test_ibn_replaces_first_norm_of_layers_1_to_3(arch, blocks):
    if arch == "resnet18":
        plain = ResNetBackbone(arch, ibn=False)
        assert _count(plain, IBN) == 0 and _count(plain, nn.InstanceNorm2d) == 0
    backbone = ResNetBackbone(arch, ibn=True)
    assert _count(backbone, IBN) == blocks
    assert _count(backbone, nn.InstanceNorm2d) == blocks
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3):
        for block in layer:
            assert isinstance(block.bn1, IBN)
            channels = block.conv1.out_channels
            assert block.bn1.IN.num_features == channels // 2
            assert block.bn1.BN.num_features == channels - channels // 2
            assert isinstance(block.bn2, nn.BatchNorm2d)
    assert all(isinstance(block.bn1, nn.BatchNorm2d) for block in backbone.layer4)
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 32, 16)).shape[1] == backbone.out_channels


def test_ibn_normalizes_first_half_per_instance():
    ibn = IBN(4).train()
    x = torch.randn(3, 4, 5, 5) * 3 + 2
    y = ibn(x)
    per_instance = y[:, :2].mean(dim=(2, 3))
    assert torch.allclose(per_instance, torch.zeros_like(per_instance), atol=1e-5)
    per_batch = y[:, 2:].mean(dim=(0, 2, 3))
    assert torch.allclose(per_batch, torch.zeros_like(per_batch), atol=1e-5)
    assert not torch.allclose(y[:, 2:].mean(dim=(2, 3)), torch.zeros(3, 2), atol=1e-3)


@pytest.mark.parametrize("arch, after", [
    ("resnet50", {"layer2": [2, 3], "layer3": [3, 4, 5]}),
    ("resnet34", {"layer2": [2, 3], "layer3": [3, 4, 5]}),
    ("resnet18", {"layer2": [0, 1], "layer3": [0, 1]}),  # only 2 blocks per layer
])
def test_non_local_placement(arch, after):
    backbone = ResNetBackbone(arch, non_local=True)  # FastReID's dot-product form by default
    assert backbone.non_local_after == after
    assert _count(backbone, DotProductNonLocal) == len(after["layer2"]) + len(after["layer3"])
    if arch == "resnet18":
        plain = ResNetBackbone(arch, non_local=False)
        assert _count(plain, NonLocal) == 0
        assert plain.non_local_after == {"layer2": [], "layer3": []}


def test_non_local_blocks_start_as_identity_and_then_act():
    torch.manual_seed(0)
    plain = ResNetBackbone("resnet18").eval()
    with_nl = ResNetBackbone("resnet18", non_local=True).eval()
    report = with_nl.load_state_dict(plain.state_dict(), strict=False)
    assert all(".layer2_nl." in f".{k}" or ".layer3_nl." in f".{k}" for k in report.missing_keys)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(with_nl(x), plain(x), atol=1e-6)
        for block in with_nl.layer3_nl:
            nn.init.ones_(block.W[1].weight)
        assert not torch.allclose(with_nl(x), plain(x), atol=1e-3)


def test_non_local_attends_over_all_positions():
    torch.manual_seed(0)
    block = NonLocal(8).eval()
    nn.init.ones_(block.W[1].weight)
    x = torch.randn(1, 8, 4, 4)
    y0 = block(x)
    x2 = x.clone()
    x2[0, :, 3, 3] += 5.0  # change one far-away position
    delta = (block(x2) - y0)[0, :, 0, 0].abs().max()
    assert delta > 1e-4  # position (0, 0) sees (3, 3): the attention is global


def test_gem_pooling():
    x = torch.rand(2, 3, 4, 4) + 0.1
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(GeM(p=60.0)(x), x.amax(dim=(2, 3)), rtol=0.05)
    gem = GeM(p=3.0)
    assert gem.p.requires_grad and gem.p.item() == pytest.approx(3.0)
    gem(x).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0


def test_avg_pooling_option():
    model = build_model(ModelConfig(arch="resnet18", pooling="avg"), num_classes=2)
    assert not any(isinstance(m, GeM) for m in model.modules())
    x = torch.randn(1, 512, 4, 2)
    assert torch.allclose(model.pool(x), x.mean(dim=(2, 3)))


def test_head_initialisation_and_frozen_bnneck_bias():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", gem_p=4.0), num_classes=500)
    assert isinstance(model.pool, GeM) and model.pool.p.item() == pytest.approx(4.0)
    assert isinstance(model.classifier, LinearClassifier) and model.classifier.weight.shape == (500, 512)
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert not model.bnneck.bias.requires_grad and torch.all(model.bnneck.bias == 0)
    assert model.bnneck.weight.requires_grad and torch.all(model.bnneck.weight == 1)
    out = model(torch.randn(4, 3, 64, 32))
    (out.logits.sum() + out.feat.sum()).backward()
    assert model.bnneck.bias.grad is None
    assert model.backbone.conv1.weight.grad is not None and model.pool.p.grad is not None
    circle = build_model(ModelConfig(arch="resnet18", classifier="circle", cls_scale=32.0, cls_margin=0.25), 7)
    assert isinstance(circle.classifier, CircleClassifier) and (circle.classifier.scale, circle.classifier.margin) == (32.0, 0.25)
    assert circle(torch.randn(2, 3, 64, 32)).logits.abs().max() <= 1 + 1e-6  # cosine scores


@pytest.mark.parametrize("which", ["before_bn", "after_bn"])
def test_test_features_picks_the_configured_feature(which):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", test_feature=which), num_classes=4)
    model.train()
    model(torch.randn(4, 3, 64, 32))  # move the BNNeck running statistics away from their init
    model.eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        out = model(x)
        feats = model.test_features(x)
    expected = out.feat if which == "before_bn" else out.bn_feat
    other = out.bn_feat if which == "before_bn" else out.feat
    assert torch.equal(feats, expected)
    assert not torch.allclose(feats, other)


def test_loads_local_torchvision_state_dict(tmp_path, caplog):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="reid_core.models.pretrained"):
        model = build_model(ModelConfig(arch="resnet18", pretrained=str(path)), num_classes=5)
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.pretrained_report.skipped == 2  # fc.weight, fc.bias
    assert "2 outside the backbone skipped" in caplog.text


def test_plain_resnet_file_into_ibn_backbone_is_an_error(tmp_path):
    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    backbone = ResNetBackbone("resnet18", ibn=True)
    before = backbone.layer4[0].bn1.weight.clone()
    with pytest.raises(PretrainedError, match=r"layer1\.0\.bn1\.IN\.weight.*IBN-Net"):
        load_pretrained(backbone, path)
    assert torch.equal(backbone.layer4[0].bn1.weight, before)  # nothing loaded


def test_shape_mismatch_is_an_error_naming_the_tensor(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    backbone = ResNetBackbone("resnet18")
    before = backbone.conv1.weight.clone()
    with pytest.raises(PretrainedError, match=r"conv1\.weight \(file \(64, 3, 3, 3\), backbone \(64, 3, 7, 7\)\)"):
        load_pretrained(backbone, path)
    assert torch.equal(backbone.conv1.weight, before)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_backbone("resnet18", pretrained=str(missing))


def test_file_that_is_not_a_state_dict_is_a_clear_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="notes.txt"):
        build_backbone("resnet18", pretrained=str(text))
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        build_backbone("resnet18", pretrained=str(listing))
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt .*no place for 1 tensors of the file: encoder.weight"):
        build_backbone("resnet18", pretrained=str(foreign))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="model.arch"):
        ResNetBackbone("resnet19")
    with pytest.raises(ValueError, match="model.last_stride"):
        ResNetBackbone("resnet18", last_stride=3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model(ModelConfig(arch="resnet18"), num_classes=0)
    with pytest.raises(ValueError, match="model.pooling"):
        ReIDModel(ResNetBackbone("resnet18"), 3, pooling="max")
    with pytest.raises(ValueError, match="model.test_feature"):
        ReIDModel(ResNetBackbone("resnet18"), 3, test_feature="logits")
