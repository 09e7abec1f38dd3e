"""Pretrained weights: files in torchvision, IBN-Net and FastReID form loaded strictly; 'imagenet' fetched
once into a cache, SHA-256 checked (file:// and refused-connection URLs only: nothing is downloaded)."""
from __future__ import annotations

import hashlib
import re

import pytest
import torch
import torchvision

from reid_core.config import Config, ConfigError, ModelConfig
from reid_core.models import (ARCHS, OFFICIAL_WEIGHTS, PretrainedError, ResNetBackbone, WeightsSource, build_model,
                              check_pretrained, fetch_weights, load_pretrained, resolve_pretrained)


def _randomized(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every float tensor drawn at random (so a load is visible)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=gen) + 0.5 if v.is_floating_point() else v
            for k, v in module.state_dict().items()}


def _assert_loaded(backbone: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = backbone.state_dict()
    assert [k for k, v in tensors.items() if not torch.equal(own[k], v)] == []


def test_torchvision_form_loads_every_backbone_tensor_and_skips_fc(tmp_path):
    state = _randomized(torchvision.models.resnet18(weights=None), seed=0)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    backbone = ResNetBackbone("resnet18")
    report = load_pretrained(backbone, path)
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    _assert_loaded(backbone, body)
    assert (report.form, report.loaded, report.skipped, report.missing_non_local) == ("torchvision", len(body), 2, 0)
    assert len(body) == len(backbone.state_dict())
    assert report.metrics()["pretrained/loaded"] == len(body)


def test_ibn_net_form_in_its_old_wrapped_release_loads_the_instance_norms(tmp_path):
    source = ResNetBackbone("resnet18", ibn=True)
    state = _randomized(source, seed=1)
    state.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    path = tmp_path / "resnet18_ibn_a.pth.tar"  # the pre-v1.0 IBN-Net files: {"state_dict": {"module.…": …}}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 100}, path)
    backbone = ResNetBackbone("resnet18", ibn=True)
    report = load_pretrained(backbone, path)
    _assert_loaded(backbone, {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert torch.equal(backbone.layer1[0].bn1.IN.weight, state["layer1.0.bn1.IN.weight"])
    assert (report.form, report.skipped, report.missing_non_local) == ("ibn-net", 2, 0)


def test_fastreid_checkpoint_loads_backbone_and_its_non_local_blocks(tmp_path):
    source = ResNetBackbone("resnet18", ibn=True, non_local=True)  # dot-product blocks, one-channel θ φ g
    state = _randomized(source, seed=2)
    # FastReID names the blocks NL_2.i / NL_3.i; its checkpoint adds heads and pixel statistics.
    renamed = {re.sub(r"^layer([23])_nl\.", r"NL_\1.", k): v for k, v in state.items()}
    model = {f"backbone.{k}": v for k, v in renamed.items()}
    model.update({"heads.weight": torch.zeros(10, 512), "heads.bottleneck.0.weight": torch.ones(512),
                  "pixel_mean": torch.zeros(1, 3, 1, 1), "pixel_std": torch.ones(1, 3, 1, 1)})
    path = tmp_path / "model_final.pth"
    torch.save({"model": model, "iteration": 1000}, path)
    backbone = ResNetBackbone("resnet18", ibn=True, non_local=True)
    report = load_pretrained(backbone, path)
    _assert_loaded(backbone, state)
    assert torch.equal(backbone.layer3_nl[1].theta.weight, state["layer3_nl.1.theta.weight"])
    assert (report.form, report.loaded, report.skipped, report.missing_non_local) == (
        "backbone-prefixed", len(state), 4, 0)


def test_non_local_blocks_are_the_only_tensors_a_file_may_lack(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    backbone = ResNetBackbone("resnet18", non_local=True)
    non_local = [k for k in backbone.state_dict() if "_nl." in k]
    report = load_pretrained(backbone, path)
    assert report.missing_non_local == len(non_local) > 0
    x = torch.randn(2, 3, 64, 32)
    plain = ResNetBackbone("resnet18")
    load_pretrained(plain, path)
    with torch.no_grad():
        assert torch.allclose(backbone.eval()(x), plain.eval()(x), atol=1e-5)  # fresh blocks: identity

    del state["layer3.1.conv2.weight"]
    torch.save(state, path)
    with pytest.raises(PretrainedError, match=r"lacks 1 backbone tensors: layer3\.1\.conv2\.weight"):
        load_pretrained(ResNetBackbone("resnet18"), path)


def test_ibn_file_into_a_plain_backbone_is_an_error_with_the_fix(tmp_path):
    path = tmp_path / "ibn.pth"
    torch.save(_randomized(ResNetBackbone("resnet18", ibn=True), seed=4), path)
    with pytest.raises(PretrainedError, match=r"no place for .*layer1\.0\.bn1\.IN\.weight.*set model\.ibn: true"):
        load_pretrained(ResNetBackbone("resnet18"), path)


def test_non_local_form_mismatch_is_a_shape_error(tmp_path):
    state = _randomized(ResNetBackbone("resnet18", non_local=True, non_local_form="embedded_gaussian"), seed=5)
    path = tmp_path / "ours.pth"
    torch.save({f"backbone.{k}": v for k, v in state.items()}, path)
    with pytest.raises(PretrainedError, match=r"layer2_nl\.0\.theta\.weight \(file \(64, 128, 1, 1\), backbone "
                                              r"\(1, 128, 1, 1\)\)"):
        load_pretrained(ResNetBackbone("resnet18", non_local=True), path)


class _NotATensor:
    pass


def test_file_with_python_objects_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": _NotATensor()}, path)
    with pytest.raises(PretrainedError, match="weights_only=True"):
        load_pretrained(ResNetBackbone("resnet18"), path)


# ---- fetching ----------------------------------------------------------------

def _published(tmp_path, name="resnet18-0000.pth"):
    """A weights file 'published' at a file:// URL, and its SHA-256."""
    folder = tmp_path / "server"
    folder.mkdir()
    path = folder / name
    torch.save(_randomized(torchvision.models.resnet18(weights=None), seed=6), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_caches_a_verified_file_once(tmp_path):
    published, digest = _published(tmp_path)
    source = WeightsSource(published.as_uri(), digest)
    cache = tmp_path / "cache"
    cached = fetch_weights(source, cache)
    assert cached == cache / published.name and cached.read_bytes() == published.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [published.name]  # no temporary file left
    content = published.read_bytes()
    published.unlink()  # the URL is gone: a second call must not read it
    assert fetch_weights(source, cache) == cached
    # a cached file that no longer matches its checksum is dropped and fetched again
    cached.write_bytes(b"corrupt")
    with pytest.raises(PretrainedError, match="could not download"):
        fetch_weights(source, cache)
    assert not cached.exists()
    published.write_bytes(content)
    assert fetch_weights(source, cache).read_bytes() == content


def test_fetch_checks_the_prefix_when_only_the_file_name_carries_one(tmp_path):
    published, digest = _published(tmp_path)
    assert fetch_weights(WeightsSource(published.as_uri(), digest[:8]), tmp_path / "a").is_file()
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:8]
    with pytest.raises(PretrainedError, match=f"not the expected SHA-256 prefix .*{wrong}"):
        fetch_weights(WeightsSource(published.as_uri(), wrong), tmp_path / "b")


def test_wrong_checksum_is_a_clear_error_and_caches_nothing(tmp_path):
    published, digest = _published(tmp_path)
    bad = "f" * 64 if digest != "f" * 64 else "e" * 64
    cache = tmp_path / "cache"
    with pytest.raises(PretrainedError, match=rf"has SHA-256 {digest}, not the expected SHA-256 {bad}; "
                                              r"nothing was cached"):
        fetch_weights(WeightsSource(published.as_uri(), bad), cache)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("url", ["file:///nonexistent/folder/resnet50-0676ba61.pth",
                                 "http://127.0.0.1:9/resnet50-0676ba61.pth"])  # port 9: connection refused
def test_unreachable_url_is_a_clear_error(tmp_path, url):
    cache = tmp_path / "cache"
    with pytest.raises(PretrainedError, match=rf"could not download {re.escape(url)}.*set model\.pretrained"):
        fetch_weights(WeightsSource(url, "0676ba61"), cache, timeout=5)
    assert list(cache.iterdir()) == []


def test_resolve_imagenet_uses_the_architecture_source_and_the_model_loads_it(tmp_path):
    published, digest = _published(tmp_path)
    sources = {("resnet18", False): WeightsSource(published.as_uri(), digest)}
    cache = tmp_path / "cache"
    path = resolve_pretrained("imagenet", "resnet18", ibn=False, cache_dir=cache, sources=sources)
    assert path == cache / published.name
    with pytest.raises(PretrainedError, match="no official ImageNet weights known for resnet18 IBN-a"):
        resolve_pretrained("imagenet", "resnet18", ibn=True, cache_dir=cache, sources=sources)
    assert resolve_pretrained("", "resnet18", ibn=False) is None
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        resolve_pretrained(str(tmp_path / "nowhere.pth"), "resnet18", ibn=False)
    cfg = ModelConfig(arch="resnet18", pretrained=str(path))
    weights, report = check_pretrained(cfg)
    assert weights == path and report.loaded == len(ResNetBackbone("resnet18").state_dict())
    model = build_model(cfg, num_classes=3)
    assert model.pretrained_report == report
    assert build_model(ModelConfig(arch="resnet18"), num_classes=3).pretrained_report is None


def test_official_sources_cover_every_backbone_and_agree_with_their_file_names():
    for arch in ARCHS:
        for ibn in (False, True):
            source = OFFICIAL_WEIGHTS[(arch, ibn)]
            tag = re.fullmatch(r"(resnet\d+(?:_ibn_a)?)-([0-9a-f]{8})\.pth", source.filename)
            assert tag and tag.group(1) == arch + ("_ibn_a" if ibn else ""), source.filename
            assert source.sha256.startswith(tag.group(2)) and len(source.sha256) in (8, 64)
            host = "github.com/XingangPan/IBN-Net/releases/" if ibn else "download.pytorch.org/models/"
            assert source.url.startswith("https://" + host)


def test_config_accepts_imagenet_and_names_a_bad_setting(tmp_path):
    assert Config().replace({"model.pretrained": "imagenet"}).model.pretrained == "imagenet"
    with pytest.raises(ConfigError, match="model.pretrained .*imagenets"):
        Config().replace({"model.pretrained": "imagenets"})
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="model.pretrained_cache must be a folder"):
        Config().replace({"model.pretrained_cache": str(a_file)})
