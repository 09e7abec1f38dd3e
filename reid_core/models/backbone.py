"""ResNet backbones for re-ID (docs/design.md, "The model"): torchvision ResNet-18/34/50/101 with options.

- ``last_stride=1`` removes the down-sampling of layer4: the feature map has stride 16 instead of 32.
- ``ibn=True``: IBN-a, the first norm (``bn1``) of every block of layers 1-3 becomes :class:`IBN`.
- ``non_local=True``: embedded-Gaussian :class:`NonLocal` blocks after the last 2 blocks of layer2 and
  the last 3 blocks of layer3 (FastReID's placement; fewer where a layer has fewer blocks).

The parameter names are torchvision's (``conv1``, ``layer1.0.bn1``, ...), so a torchvision ImageNet state
dict loads with :func:`load_pretrained`; nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from reid_core.config import ARCHS
from reid_core.models.layers import IBN, NonLocal

log = logging.getLogger(__name__)

NON_LOCAL_BLOCKS = {"layer2": 2, "layer3": 3}  # non-local blocks after the last blocks of these layers


class LoadReport(NamedTuple):
    """What :func:`load_pretrained` did: keys loaded, and those it could not use."""

    loaded: list[str]
    missing: list[str]  # backbone parameters/buffers absent from the file (left at their init)
    unexpected: list[str]  # keys of the file the backbone does not have (e.g. ``fc.weight``)
    mismatched: list[str]  # keys present in both with different shapes (skipped)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier: float[B, 3, H, W] -> float[B, C, H/s, W/s].

    ``C = out_channels`` (512 for resnet18/34, 2048 for resnet50/101), ``s = 16`` with
    ``last_stride=1`` and 32 with ``last_stride=2``.
    """

    def __init__(self, arch: str = "resnet50", last_stride: int = 1, ibn: bool = False,
                 non_local: bool = False) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}; got {arch!r}")
        if last_stride not in (1, 2):
            raise ValueError(f"model.last_stride must be 1 or 2; got {last_stride!r}")
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
        self.non_local_after: dict[str, list[int]] = {}
        for name, count in NON_LOCAL_BLOCKS.items():
            layer = getattr(self, name)
            count = min(count, len(layer)) if non_local else 0
            self.non_local_after[name] = list(range(len(layer) - count, len(layer)))
            channels = _block_out_channels(layer[-1])
            setattr(self, f"{name}_nl", nn.ModuleList(NonLocal(channels) for _ in range(count)))

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
                   pretrained: str | os.PathLike = "") -> ResNetBackbone:
    """A :class:`ResNetBackbone`; with ``pretrained`` (a local file path) its weights are loaded from it."""
    backbone = ResNetBackbone(arch, last_stride=last_stride, ibn=ibn, non_local=non_local)
    if pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


def load_pretrained(backbone: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a torchvision-format state dict file (e.g. ImageNet ``resnet50`` weights) into ``backbone``.

    Loading is non-strict: keys the backbone lacks (``fc.*``), parameters the file lacks (IBN, non-local)
    and tensors of another shape are skipped and logged. The file may also hold ``{"state_dict": ...}``
    or ``{"model": ...}``; a ``module.`` prefix (DataParallel) is stripped.

    Raises FileNotFoundError if ``path`` is not a file, ValueError if it is not a state dict or if none of
    its keys fits the backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file it cannot read
        raise ValueError(f"model.pretrained: {path} is not a readable PyTorch state dict file ({exc})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not (isinstance(state, Mapping) and state
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())):
        raise ValueError(f"model.pretrained: {path} does not hold a state dict "
                         f"(a non-empty mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}

    own = backbone.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not usable:
        raise ValueError(f"model.pretrained: no tensor of {path} matches the backbone "
                         f"(file keys start with {sorted(state)[:3]}, backbone keys with {sorted(own)[:3]})")
    result = backbone.load_state_dict(usable, strict=False)
    report = LoadReport(loaded=sorted(usable), missing=sorted(result.missing_keys),
                        unexpected=sorted(k for k in state if k not in own), mismatched=mismatched)
    log.info("loaded %d tensors from %s", len(report.loaded), path)
    for kind in ("missing", "unexpected", "mismatched"):
        keys = getattr(report, kind)
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            level = logging.INFO if kind == "unexpected" else logging.WARNING  # fc.* is always unexpected
            log.log(level, "pretrained weights %s: %s keys: %s", path.name, kind, shown)
    return report
