"""Identity classification loss with label smoothing (the classifier of f_q)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cross_entropy_ls(logits: Tensor, labels: Tensor, epsilon: float = 0.1) -> Tensor:
    """Mean cross-entropy of ``logits [B, C]`` against ``labels long[B]`` with label smoothing ``epsilon``.

    The target is (1 − ε)·one-hot + ε/C on every class. Computed in float32 (safe under autocast).
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing epsilon must be in [0, 1); got {epsilon!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C]; got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [B] = [{logits.shape[0]}]; got shape {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels, label_smoothing=epsilon)
