"""Normalisation on the device: the model's first layer turns the loaders' uint8 images into its input."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from reid_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class PixelNormalize(nn.Module):
    """``uint8[B, 3, H, W]`` -> ``float32[B, 3, H, W]``: ``(x / 255 - mean) / std`` per channel.

    ``uint8[B, 4, H, W]`` (training batches with random erasing): the fourth plane marks erased pixels,
    which become 0 after normalisation (the mean colour). A floating-point input is taken as already
    normalised and returned unchanged (callers that build network inputs themselves).

    The same arithmetic as torchvision's ``ToDtype(float32, scale=True)`` then ``Normalize``, so the output
    equals the former loaders' images. ``mean`` and ``std`` are buffers (they follow ``.to(device)``), not
    saved in state dicts.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (3, 4):
            raise ValueError(f"expected images uint8[B, 3 or 4, H, W] or floating point, got {x.dtype} "
                             f"{tuple(x.shape)}")
        out = x[:, :3].to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std)
        if x.shape[1] == 4:
            out.masked_fill_(x[:, 3:] != 0, 0.0)
        return out
