"""Image pre-processing on uint8 tensors (torchvision.transforms.v2), without normalisation.

Both transforms take a ``uint8[3, h, w]`` image (any size) and return uint8 at ``(H, W) = (cfg.height,
cfg.width)``: ``uint8[3, H, W]``, or ``uint8[4, H, W]`` from a training transform with random erasing,
whose fourth plane marks the erased pixels. The model's first layer
(:class:`reid_core.data.PixelNormalize`, on the training device) scales to [0, 1], normalises with the
ImageNet mean and std and sets the erased pixels to 0: the same network input, to the float rounding, as
normalising here and erasing with value 0 after it, with a quarter of the bytes to move.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision.transforms import v2

from reid_core.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize(cfg: DataConfig) -> v2.Resize:
    return v2.Resize((cfg.height, cfg.width), antialias=True)


class RandomErasingMask:
    """Random erasing recorded rather than painted: ``uint8[3, H, W]`` -> ``uint8[4, H, W]``, the fourth
    plane 1 inside the erased box (with probability ``p``), else 0.

    The box is drawn by ``v2.RandomErasing``'s own parameter sampler with the same random numbers in the
    same order as ``v2.RandomErasing(p, value=0)``, so a seeded pipeline erases the same boxes as one that
    erased the normalised float image (value 0 there is the mean colour, which uint8 cannot hold exactly).
    """

    def __init__(self, p: float, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> None:
        self.p = p
        erasing = v2.RandomErasing(p=1.0, scale=scale, ratio=ratio, value=0)
        # torchvision >= 0.21 names it make_params; older releases _get_params
        self._box: Callable[[list[Any]], dict[str, Any]] = getattr(erasing, "make_params", None) \
            or erasing._get_params

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros((1, *image.shape[-2:]), dtype=torch.uint8)
        if torch.rand(1) < self.p:  # v2's random-apply test, same draw
            box = self._box([image])
            if box["v"] is not None:  # None: no box fitted in 10 tries, nothing erased
                mask[:, box["i"]:box["i"] + box["h"], box["j"]:box["j"] + box["w"]] = 1
        return torch.cat([image, mask])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def build_train_transform(cfg: DataConfig) -> v2.Compose:
    """Resize, AutoAugment (with probability ``autoaug_prob``, when ``autoaug``), horizontal flip,
    pad-and-crop (zero padding), random erasing (as a mask plane). Steps whose probability or size is 0 are
    left out."""
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = [_resize(cfg)]
    if cfg.autoaug and cfg.autoaug_prob > 0:
        steps.append(v2.RandomApply([v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)], p=cfg.autoaug_prob))
    if cfg.flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.flip_prob))
    if cfg.padding > 0:
        steps.append(v2.RandomCrop((cfg.height, cfg.width), padding=cfg.padding))
    if cfg.random_erasing > 0:
        steps.append(RandomErasingMask(cfg.random_erasing))
    return v2.Compose(steps)


def build_test_transform(cfg: DataConfig) -> v2.Compose:
    """Resize."""
    return v2.Compose([_resize(cfg)])
