"""Image pre-processing on uint8 tensors (torchvision.transforms.v2).

Both transforms take a ``uint8[3, h, w]`` image (any size) and return ``float32[3, H, W]`` normalized with
the ImageNet mean and std, ``(H, W) = (cfg.height, cfg.width)``.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from reid_core.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize(cfg: DataConfig) -> v2.Resize:
    return v2.Resize((cfg.height, cfg.width), antialias=True)


def _to_normalized_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def build_train_transform(cfg: DataConfig) -> v2.Compose:
    """Resize, AutoAugment (with probability ``autoaug_prob``, when ``autoaug``), horizontal flip,
    pad-and-crop, normalize, random erasing. Steps whose probability or size is 0 are left out."""
    steps: list[v2.Transform] = [_resize(cfg)]
    if cfg.autoaug and cfg.autoaug_prob > 0:
        steps.append(v2.RandomApply([v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)], p=cfg.autoaug_prob))
    if cfg.flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.flip_prob))
    if cfg.padding > 0:
        steps.append(v2.RandomCrop((cfg.height, cfg.width), padding=cfg.padding))
    steps += _to_normalized_float()
    if cfg.random_erasing > 0:
        # After normalization, value 0 fills the erased box with the mean colour.
        steps.append(v2.RandomErasing(p=cfg.random_erasing, value=0))
    return v2.Compose(steps)


def build_test_transform(cfg: DataConfig) -> v2.Compose:
    """Resize and normalize."""
    return v2.Compose([_resize(cfg), *_to_normalized_float()])
