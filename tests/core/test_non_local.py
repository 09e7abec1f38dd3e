"""Non-local blocks: FastReID's dot-product form (against a straightforward N x N reference), ours in the
4-D form fused attention takes (against the embedded-Gaussian math), and FastReID's counts and places."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from reid_core.config import Config, ConfigError, ModelConfig
from reid_core.models import NON_LOCAL_BLOCKS, DotProductNonLocal, NonLocal, ResNetBackbone, build_model


def _acting(block: nn.Module) -> nn.Module:
    """The block with a non-zero output BatchNorm (it starts at 0, i.e. as the identity), in eval mode."""
    with torch.no_grad():
        block.W[1].weight.uniform_(0.5, 1.5)
        block.W[1].bias.uniform_(-0.5, 0.5)
        block.W[1].running_mean.uniform_(-0.1, 0.1)
    return block.eval()


def _dot_product_reference(block: DotProductNonLocal, x: torch.Tensor) -> torch.Tensor:
    """FastReID's formula as written: f = θᵀφ / N (N x N), y = f g, z = W y + x."""
    b, _, h, w = x.shape
    theta = block.theta(x).view(b, block.inner, -1).permute(0, 2, 1)  # [B, N, C']
    phi = block.phi(x).view(b, block.inner, -1)  # [B, C', N]
    g = block.g(x).view(b, block.inner, -1).permute(0, 2, 1)  # [B, N, C']
    f = torch.matmul(theta, phi)
    y = torch.matmul(f / f.shape[-1], g)  # [B, N, C']
    return x + block.W(y.permute(0, 2, 1).reshape(b, block.inner, h, w))


@pytest.mark.parametrize("inner, shape", [(1, (2, 16, 6, 5)), (1, (1, 8, 3, 7)), (3, (2, 12, 4, 4))])
def test_dot_product_block_equals_the_n_by_n_reference(inner, shape):
    torch.manual_seed(inner)
    block = _acting(DotProductNonLocal(shape[1], inner=inner))
    x = torch.randn(*shape, requires_grad=True)
    out = block(x)
    ref = _dot_product_reference(block, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)  # the block acts
    (g_out,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(g_out, g_ref, atol=1e-4, rtol=1e-4)


def test_dot_product_block_is_fastreids_shape_and_starts_as_identity():
    block = DotProductNonLocal(512)
    assert [tuple(block.get_parameter(n).shape) for n in ("theta.weight", "phi.weight", "g.weight", "W.0.weight")] \
        == [(1, 512, 1, 1), (1, 512, 1, 1), (1, 512, 1, 1), (512, 1, 1, 1)]
    x = torch.randn(2, 512, 4, 3)
    with torch.no_grad():
        assert torch.equal(block.eval()(x), x)


def test_embedded_gaussian_block_equals_its_softmax_math():
    torch.manual_seed(0)
    block = _acting(NonLocal(16))
    x = torch.randn(2, 16, 5, 4)
    b, _, h, w = x.shape
    theta = block.theta(x).flatten(2).transpose(1, 2)  # [B, N, C']
    phi = block.phi(x).flatten(2).transpose(1, 2)
    g = block.g(x).flatten(2).transpose(1, 2)
    attention = torch.softmax(theta @ phi.transpose(1, 2), dim=-1)  # scale 1: no 1/sqrt(C')
    ref = x + block.W((attention @ g).transpose(1, 2).reshape(b, block.inner, h, w))
    with torch.no_grad():
        out = block(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)


@pytest.mark.parametrize("arch, layer2, layer3", [
    ("resnet50", [2, 3], [3, 4, 5]),  # FastReID R50: [0, 2, 3, 0] after the last blocks of each stage
    ("resnet101", [2, 3], list(range(14, 23))),  # R101: [0, 2, 9, 0]
])
def test_block_counts_and_places_are_fastreids(arch, layer2, layer3):
    backbone = ResNetBackbone(arch, non_local=True)
    assert backbone.non_local_after == {"layer2": layer2, "layer3": layer3}
    assert (len(backbone.layer2_nl), len(backbone.layer3_nl)) == (len(layer2), len(layer3))
    assert sum(isinstance(m, DotProductNonLocal) for m in backbone.modules()) == len(layer2) + len(layer3)
    assert NON_LOCAL_BLOCKS[arch] == {"layer2": len(layer2), "layer3": len(layer3)}
    # where they run: record the forward order of blocks and non-local blocks
    order: list[str] = []
    for layer in ("layer2", "layer3"):
        for i, block in enumerate(getattr(backbone, layer)):
            block.register_forward_hook(lambda *_, name=f"{layer}.{i}": order.append(name))
        for j, block in enumerate(getattr(backbone, f"{layer}_nl")):
            block.register_forward_hook(lambda *_, name=f"{layer}_nl.{j}": order.append(name))
    with torch.no_grad():
        backbone.eval()(torch.randn(1, 3, 32, 16))
    expected = []
    for layer, after in (("layer2", layer2), ("layer3", layer3)):
        blocks = len(getattr(backbone, layer))
        for i in range(blocks):
            expected.append(f"{layer}.{i}")
            if i in after:
                expected.append(f"{layer}_nl.{after.index(i)}")
    assert order == expected


def test_form_is_a_config_choice():
    eg = build_model(ModelConfig(arch="resnet18", non_local=True, non_local_form="embedded_gaussian"), 3)
    dp = build_model(ModelConfig(arch="resnet18", non_local=True), 3)
    assert Config().model.non_local_form == "dot_product"  # the authors' form
    assert isinstance(eg.backbone.layer3_nl[0], NonLocal) and isinstance(dp.backbone.layer3_nl[0], DotProductNonLocal)
    with pytest.raises(ConfigError, match="model.non_local_form must be one of dot_product, embedded_gaussian; "
                                          "got 'gaussian'"):
        Config().replace({"model.non_local_form": "gaussian"})
    with pytest.raises(ValueError, match="model.non_local_form"):
        ResNetBackbone("resnet18", non_local=True, non_local_form="gaussian")
