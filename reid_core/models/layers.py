"""Building blocks of the re-ID backbone and head (docs/design.md, "The model", after FastReID).

- :class:`GeM`: generalized-mean pooling with a learnable exponent p.
- :class:`IBN`: IBN-a normalization, InstanceNorm on the first half of the channels, BatchNorm on the rest.
- :class:`NonLocal`: embedded-Gaussian non-local block with a residual connection, identity at init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GeM(nn.Module):
    """Generalized-mean pooling: ``(mean over H, W of clamp(x, eps) ** p) ** (1 / p)``.

    p = 1 is average pooling, p -> inf tends to max pooling. ``x`` float[B, C, H, W] -> float[B, C].
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"GeM exponent p must be positive, got {p!r}")
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1)
        return pooled.pow(1.0 / self.p).flatten(1)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


class AvgPool(nn.Module):
    """Global average pooling: float[B, C, H, W] -> float[B, C]."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class IBN(nn.Module):
    """IBN-a normalization of ``channels`` feature maps (Pan et al., ECCV 2018).

    The first ``int(channels * ratio)`` channels go through an affine InstanceNorm2d (``self.IN``),
    the rest through a BatchNorm2d (``self.BN``); the attribute names follow the IBN-Net weights.
    float[B, C, H, W] -> float[B, C, H, W].
    """

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(channels * ratio)
        if not 0 < self.half < channels:
            raise ValueError(f"IBN needs 0 < channels * ratio < channels; got channels={channels}, ratio={ratio}")
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: Tensor) -> Tensor:
        first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(first.contiguous()), self.BN(rest.contiguous())], dim=1)


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018) with a residual connection.

    ``y_i = sum_j softmax_j(theta(x_i) . phi(x_j)) g(x_j)``, ``out = x + BN(W y)``. theta, phi and g are
    1x1 convolutions to ``channels // reduction`` channels. The output BatchNorm starts at weight 0 and
    bias 0, so a freshly inserted block is the identity and does not disturb pretrained weights.
    float[B, C, H, W] -> float[B, C, H, W].
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.inner = inner
        self.theta = nn.Conv2d(channels, inner, kernel_size=1)
        self.phi = nn.Conv2d(channels, inner, kernel_size=1)
        self.g = nn.Conv2d(channels, inner, kernel_size=1)
        self.W = nn.Sequential(nn.Conv2d(inner, channels, kernel_size=1), nn.BatchNorm2d(channels))
        for conv in (self.theta, self.phi, self.g, self.W[0]):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # [B, N, C'], N = H * W
        phi = self.phi(x).flatten(2).transpose(1, 2)
        g = self.g(x).flatten(2).transpose(1, 2)
        # Embedded Gaussian: softmax over j of theta_i . phi_j, no 1/sqrt(C') scaling.
        y = F.scaled_dot_product_attention(theta, phi, g, scale=1.0)  # [B, N, C']
        y = y.transpose(1, 2).reshape(b, self.inner, h, w)
        return x + self.W(y)
