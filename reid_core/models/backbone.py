"""ResNet backbones for re-ID (docs/design.md, "The model"; after FastReID): torchvision ResNet-18/34/50/101.

- ``last_stride=1`` removes the down-sampling of layer4: the feature map has stride 16 instead of 32.
- ``ibn=True``: IBN-a, the first norm (``bn1``) of every block of layers 1-3 becomes :class:`IBN`.
- ``non_local=True``: non-local blocks after the last blocks of layer2 and layer3, as many as FastReID
  puts there (:data:`NON_LOCAL_BLOCKS`: ResNet-50 [0, 2, 3, 0], ResNet-101 [0, 2, 9, 0] per stage),
  in FastReID's dot-product form (``non_local_form="dot_product"``) or the embedded-Gaussian form.

The parameter names are torchvision's (``conv1``, ``layer1.0.bn1``, ...), so torchvision and IBN-Net
ImageNet files load with :func:`reid_core.models.pretrained.load_pretrained`.
"""
from __future__ import annotations

import os

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from reid_core.config import ARCHS
from reid_core.models.layers import IBN, NON_LOCAL_FORMS
from reid_core.models.pretrained import PretrainedReport, load_pretrained

# Non-local blocks after the last blocks of these layers. ResNet-50/101: FastReID's counts per stage
# ([0, 2, 3, 0] and [0, 2, 9, 0]). FastReID defines none for ResNet-18/34; our CPU-sized variants keep
# 2 and 3 (at most one per block).
NON_LOCAL_BLOCKS = {
    "resnet18": {"layer2": 2, "layer3": 3},
    "resnet34": {"layer2": 2, "layer3": 3},
    "resnet50": {"layer2": 2, "layer3": 3},
    "resnet101": {"layer2": 2, "layer3": 9},
}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier: float[B, 3, H, W] -> float[B, C, H/s, W/s].

    ``C = out_channels`` (512 for resnet18/34, 2048 for resnet50/101), ``s = 16`` with
    ``last_stride=1`` and 32 with ``last_stride=2``.
    """

    def __init__(self, arch: str = "resnet50", last_stride: int = 1, ibn: bool = False,
                 non_local: bool = False, non_local_form: str = "dot_product") -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}; got {arch!r}")
        if last_stride not in (1, 2):
            raise ValueError(f"model.last_stride must be 1 or 2; got {last_stride!r}")
        if non_local_form not in NON_LOCAL_FORMS:
            raise ValueError(f"model.non_local_form must be one of {', '.join(NON_LOCAL_FORMS)}; "
                             f"got {non_local_form!r}")
        net = getattr(torchvision.models, arch)(weights=None)
        self.arch = arch
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        block = self.layer1[0]
        self.out_channels = 512 * (4 if isinstance(block, Bottleneck) else 1)

        if last_stride == 1:
            _remove_stride(self.layer4[0])
        if ibn:
            for layer in (self.layer1, self.layer2, self.layer3):
                for blk in layer:
                    blk.bn1 = IBN(blk.bn1.num_features)
        # Indices of the blocks followed by a non-local block, per layer; empty when off.
        self.non_local_form = non_local_form
        self.non_local_after: dict[str, list[int]] = {}
        block_type = NON_LOCAL_FORMS[non_local_form]
        for name, count in NON_LOCAL_BLOCKS[arch].items():
            layer = getattr(self, name)
            count = min(count, len(layer)) if non_local else 0
            self.non_local_after[name] = list(range(len(layer) - count, len(layer)))
            channels = _block_out_channels(layer[-1])
            setattr(self, f"{name}_nl", nn.ModuleList(block_type(channels) for _ in range(count)))
        self.pretrained_report: PretrainedReport | None = None  # set when weights are loaded from a file

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self._run_layer("layer2", x)
        x = self._run_layer("layer3", x)
        return self.layer4(x)

    def _run_layer(self, name: str, x: Tensor) -> Tensor:
        after = self.non_local_after[name]
        if not after:
            return getattr(self, name)(x)
        blocks = iter(getattr(self, f"{name}_nl"))
        for i, block in enumerate(getattr(self, name)):
            x = block(x)
            if i in after:
                x = next(blocks)(x)
        return x


def _remove_stride(block: nn.Module) -> None:
    """Set every stride of a ResNet block (its strided conv and its downsample conv) to 1."""
    for module in block.modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)


def _block_out_channels(block: nn.Module) -> int:
    if isinstance(block, Bottleneck):
        return block.bn3.num_features
    if isinstance(block, BasicBlock):
        return block.bn2.num_features
    raise TypeError(f"unknown ResNet block {type(block).__name__}")


def build_backbone(arch: str, last_stride: int = 1, ibn: bool = False, non_local: bool = False,
                   pretrained: str | os.PathLike = "", non_local_form: str = "dot_product") -> ResNetBackbone:
    """A :class:`ResNetBackbone`; with ``pretrained`` (a local file path) its weights are loaded from it
    (strictly: see :func:`load_pretrained`) and what was loaded is kept in ``backbone.pretrained_report``."""
    backbone = ResNetBackbone(arch, last_stride=last_stride, ibn=ibn, non_local=non_local,
                              non_local_form=non_local_form)
    if pretrained:
        backbone.pretrained_report = load_pretrained(backbone, pretrained)
    return backbone
