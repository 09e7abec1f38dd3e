"""Identity classifiers on the BNNeck feature: linear, or CircleSoftmax (docs/design.md, "The model" and "The authors' regime").

A classifier maps ``bn_feat [B, D]`` to scores ``[B, C]`` without knowing the labels (so the model's
forward, DDP-wrapped or not, needs none), and :meth:`train_logits` turns those scores and the labels into
the logits of the cross-entropy. For the linear classifier both are the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSIFIERS = ("linear", "circle")


class LinearClassifier(nn.Module):
    """Bias-free linear layer, weights N(0, 0.001²) (Bag of Tricks): scores = x Wᵀ."""

    def __init__(self, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, feat_dim))
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def train_logits(self, scores: Tensor, labels: Tensor) -> Tensor:
        return scores


class CircleClassifier(nn.Module):
    """CircleSoftmax (Sun et al., "Circle Loss", CVPR 2020, as FastReID's classification head).

    Scores are cosine similarities cos = x̂ Ŵᵀ in [-1, 1]. For training, with margin m and scale s:
    the target class gets s·α_p·(cos − (1 − m)) with α_p = max(1 + m − cos, 0), every other class
    s·α_n·(cos − m) with α_n = max(cos + m, 0); α_p and α_n are constants for the gradient.
    """

    def __init__(self, feat_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"CircleSoftmax scale must be positive, got {scale!r}")
        if not 0 <= margin < 1:
            raise ValueError(f"CircleSoftmax margin must be in [0, 1), got {margin!r}")
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, feat_dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def train_logits(self, scores: Tensor, labels: Tensor) -> Tensor:
        cos = scores.float()
        m = self.margin
        with torch.no_grad():
            alpha_p = (1 + m - cos).clamp_min_(0)
            alpha_n = (cos + m).clamp_min_(0)
        target = F.one_hot(labels, cos.shape[1]).to(torch.bool)
        return self.scale * torch.where(target, alpha_p * (cos - (1 - m)), alpha_n * (cos - m))

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, scale={self.scale}, margin={self.margin}"


def build_classifier(kind: str, feat_dim: int, num_classes: int, scale: float = 64.0,
                     margin: float = 0.35) -> nn.Module:
    """``linear`` or ``circle`` (with ``scale`` and ``margin``) over ``num_classes`` identities."""
    if kind == "linear":
        return LinearClassifier(feat_dim, num_classes)
    if kind == "circle":
        return CircleClassifier(feat_dim, num_classes, scale, margin)
    raise ValueError(f"model.classifier must be one of {', '.join(CLASSIFIERS)}; got {kind!r}")
