"""Speed settings on the CPU: channels_last kept through IBN-a blocks, train.compile, the config keys."""
from __future__ import annotations

import copy

import pytest
import torch

from reid_core.config import Config, ConfigError, ModelConfig
from reid_core.models import IBN, ResNetBackbone, build_model, compile_backbones


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@pytest.mark.parametrize("train", [True, False])
def test_ibn_keeps_channels_last_and_computes_the_same(train):
    torch.manual_seed(0)
    ibn = IBN(12, keep_layout=True)
    with torch.no_grad():
        ibn.IN.weight.uniform_(0.5, 1.5)
        ibn.IN.bias.uniform_(-1, 1)
        ibn.BN.running_mean.uniform_(-1, 1)
    ibn.train(train)
    x = (torch.randn(3, 12, 5, 4) * 3 + 1).requires_grad_()
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out, out_cl = ibn(x), copy.deepcopy(ibn)(x_cl)
    assert out.is_contiguous() and _is_channels_last(out_cl)
    assert torch.allclose(out, out_cl, atol=1e-5)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_cl,) = torch.autograd.grad(out_cl.square().sum(), x_cl)
    assert torch.allclose(g, g_cl, atol=1e-4)
    ibn.keep_layout = False  # the former path: the layout flips back to the default
    assert not _is_channels_last(ibn(x_cl))


def test_ibn_backbone_in_channels_last_keeps_its_layout_through_every_block_when_asked():
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", ibn=True, non_local=True).eval()
    for module in backbone.modules():
        if isinstance(module, IBN):
            module.keep_layout = True  # off by default (not faster on the CPU; the GPU measurement is due)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        ref = backbone(x)
        backbone.to(memory_format=torch.channels_last)
        layouts = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: layouts.append(_is_channels_last(out)))
                 for m in backbone.modules() if isinstance(m, IBN)]
        out = backbone(x.contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    assert len(layouts) == 6 and all(layouts)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_compiled_backbones_equal_eager_and_f_k_keeps_its_own_weights():
    """train.compile: each backbone compiled in place (state dict unchanged). The test compiles with
    the aot_eager backend to stay short; the inductor backend that train.compile uses needs a C++
    compiler on the CPU and takes about a minute for a ResNet-18 here."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", ibn=True, non_local=True), num_classes=4).eval()
    with torch.no_grad():
        for block in model.backbone.layer3_nl:
            block.W[1].weight.fill_(1.0)
    key_encoder = copy.deepcopy(model)  # f_k is copied from f_q before compiling, as the trainer does
    with torch.no_grad():
        key_encoder.backbone.conv1.weight.mul_(0.5)
    x = torch.randn(2, 3, 32, 16)
    keys_before = list(model.state_dict())
    with torch.no_grad():
        ref_q, ref_k = model.backbone(x), key_encoder.backbone(x)
        compile_backbones(model, None, key_encoder, backend="aot_eager")
        out_q, out_k = model.backbone(x), key_encoder.backbone(x)
    assert list(model.state_dict()) == keys_before
    assert torch.allclose(out_q, ref_q, atol=1e-5) and torch.allclose(out_k, ref_k, atol=1e-5)
    assert not torch.allclose(out_q, out_k, atol=1e-3)


def test_speed_keys_are_typed_and_default_as_documented():
    t = Config().train
    assert (t.cudnn_benchmark, t.compile, t.channels_last) == (True, False, True)
    cfg = Config().replace({"train.compile": True, "train.cudnn_benchmark": False})
    assert (cfg.train.compile, cfg.train.cudnn_benchmark) == (True, False)
    for key in ("train.compile", "train.cudnn_benchmark"):
        with pytest.raises(ConfigError, match=f"{key} must be true or false, got 'yes'"):
            Config().replace({key: "yes"})


def test_trainer_compiles_both_backbones_and_leaves_cudnn_alone_on_the_cpu(tmp_path):
    from reid_core.data import synthetic
    from reid_core.engine.trainer import Trainer

    root = synthetic.generate(tmp_path / "data", "market1501", ids=8, cams=2, images_per_id_cam=2, height=32,
                              width=16, seed=0)
    before = torch.backends.cudnn.benchmark
    base = {"data.dataset": "synthetic", "data.root": str(root), "data.height": 32, "data.width": 16,
            "data.batch_size": 8, "data.num_instance": 2, "data.workers": 0, "model.arch": "resnet18",
            "framework.name": "moreid", "framework.dict_size": 16, "train.device": "cpu",
            "train.cudnn_benchmark": not before, "train.output_dir": str(tmp_path / "out")}
    with Trainer(Config().replace(base)) as tr:  # cudnn.benchmark is a CUDA setting: untouched here
        assert torch.backends.cudnn.benchmark == before and tr.pretrained_report is None
        assert tr.model.backbone._compiled_call_impl is None
    with Trainer(Config().replace({**base, "train.compile": True})) as tr:
        # compiled lazily at the first forward; f_k's compiled forward is its own, not f_q's
        q, k = tr.model.backbone._compiled_call_impl, tr.framework.key_encoder.backbone._compiled_call_impl
        assert q is not None and k is not None and q is not k
