"""Building blocks of the re-ID backbone and head (docs/design.md, "The model", after FastReID).

- :class:`GeM`: generalized-mean pooling with a learnable exponent p.
- :class:`IBN`: IBN-a normalization, InstanceNorm on the first half of the channels, BatchNorm on the rest.
- :class:`NonLocal`: embedded-Gaussian non-local block with a residual connection, identity at init.
- :class:`DotProductNonLocal`: FastReID's non-local block (the one the authors ran): dot-product form,
  one-channel theta/phi/g, identity at init.
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

    With ``keep_layout`` a channels_last input stays channels_last: the instance statistics are computed
    elementwise instead of by ``nn.InstanceNorm2d``, which makes its half contiguous in the default layout,
    so that the next convolution converts back. Off by default: on a 2-core CPU, a ResNet-50 IBN-a step
    in channels_last took 2-3 % more CPU time with the layout kept than with it flipped
    (``python -m benchmarks.ibn_layout``); the GPU measurement (``--device cuda``), where cuDNN's NHWC
    kernels decide, is still due. Either way the output is the same to float rounding.
    """

    def __init__(self, channels: int, ratio: float = 0.5, keep_layout: bool = False) -> None:
        super().__init__()
        self.half = int(channels * ratio)
        if not 0 < self.half < channels:
            raise ValueError(f"IBN needs 0 < channels * ratio < channels; got channels={channels}, ratio={ratio}")
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)
        self.keep_layout = keep_layout

    def forward(self, x: Tensor) -> Tensor:
        first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        if self.keep_layout and x.dim() == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            rest = rest.contiguous(memory_format=torch.channels_last)
            return torch.cat([self._instance_norm(first), self.BN(rest)], dim=1)
        return torch.cat([self.IN(first.contiguous()), self.BN(rest.contiguous())], dim=1)

    def _instance_norm(self, x: Tensor) -> Tensor:
        """``self.IN(x)`` computed elementwise (statistics in float32), keeping ``x``'s memory layout."""
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
        scale = torch.rsqrt(var + self.IN.eps) * self.IN.weight.float().view(1, -1, 1, 1)
        shift = self.IN.bias.float().view(1, -1, 1, 1) - mean * scale
        return torch.addcmul(shift, xf, scale).to(x.dtype)


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018) with a residual connection.

    ``y_i = sum_j softmax_j(theta(x_i) . phi(x_j)) g(x_j)``, ``out = x + BN(W y)``. theta, phi and g are
    1x1 convolutions to ``channels // reduction`` channels. The output BatchNorm starts at weight 0 and
    bias 0, so a freshly inserted block is the identity and does not disturb pretrained weights.
    float[B, C, H, W] -> float[B, C, H, W].

    The attention runs as ``scaled_dot_product_attention`` on 4-D ``[B, heads=1, N, C']`` inputs (the
    form the fused kernels take) with ``scale=1``: the embedded Gaussian of the paper has no
    1/sqrt(C') factor, and the fused kernels accumulate the scores and the softmax in float32.
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
        # [B, C', H, W] -> [B, 1, N, C'], N = H * W: one attention head over all positions
        theta, phi, g = (conv(x).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.theta, self.phi, self.g))
        y = F.scaled_dot_product_attention(theta, phi, g, scale=1.0)  # [B, 1, N, C']
        y = y.squeeze(1).transpose(1, 2).reshape(b, self.inner, h, w)
        return x + self.W(y)


class DotProductNonLocal(nn.Module):
    """FastReID's non-local block, the one the authors ran: the dot-product form with a residual connection.

    ``y_i = (1/N) sum_j (theta(x_i) . phi(x_j)) g(x_j)`` (no softmax), ``out = x + BN(W y)``, with theta,
    phi and g 1x1 convolutions to ``inner`` channels (FastReID's ``reduc_ratio // reduc_ratio`` = 1).
    The N x N matrix theta phi^T has rank ``inner``, so ``y = theta (phi^T g) / N`` is computed from the
    ``inner x inner`` product phi^T g / N instead (O(N) memory; g is divided by N first, so the sum
    over N positions stays in range in float16). Convolutions keep PyTorch's default initialization
    (as FastReID's, built after its backbone's initialization); the output BatchNorm starts at 0, so a
    fresh block is the identity. float[B, C, H, W] -> float[B, C, H, W].
    """

    def __init__(self, channels: int, inner: int = 1) -> None:
        super().__init__()
        if not 0 < inner <= channels:
            raise ValueError(f"non-local inner channels must be in [1, {channels}], got {inner}")
        self.inner = inner
        self.theta = nn.Conv2d(channels, inner, kernel_size=1)
        self.phi = nn.Conv2d(channels, inner, kernel_size=1)
        self.g = nn.Conv2d(channels, inner, kernel_size=1)
        self.W = nn.Sequential(nn.Conv2d(inner, channels, kernel_size=1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        n = h * w
        theta, phi, g = (conv(x).flatten(2) for conv in (self.theta, self.phi, self.g))  # [B, C', N] each
        phi_g = torch.bmm(phi, (g / n).transpose(1, 2))  # [B, C', C']: sum_j phi_j g_j^T / N
        y = torch.bmm(phi_g.transpose(1, 2), theta)  # [B, C', N]: y_i = (phi^T g / N)^T theta_i
        return x + self.W(y.reshape(b, self.inner, h, w))


NON_LOCAL_FORMS = {"dot_product": DotProductNonLocal, "embedded_gaussian": NonLocal}
