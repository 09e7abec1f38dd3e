"""Test-time feature extraction: run a model over a test loader and collect features and labels."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm


def extract_features(model: nn.Module, loader: Iterable, device: torch.device | str, flip: bool = False,
                     progress: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Features of every image of ``loader`` (batches of ``(images float[B, 3, H, W], pids, camids)``).

    Uses ``model.test_features(x)`` when the model has it, else ``model(x)`` (which must return a
    float[B, D] tensor). With ``flip``, the feature is the mean of the image's and its horizontal
    mirror's. Runs in eval mode under ``torch.inference_mode`` and restores the model's train/eval mode.
    The progress bar shows only with ``progress`` and when stderr is a terminal.

    Returns ``(feats float32[N, D], pids long[N], camids long[N])``, on the CPU, in loader order.
    """
    device = torch.device(device)
    embed: Callable[[Tensor], Tensor] = getattr(model, "test_features", None) or model
    was_training = model.training
    feats: list[Tensor] = []
    pids: list[Tensor] = []
    camids: list[Tensor] = []
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(loader, desc="features", unit="batch", leave=False,
                       disable=not progress or not sys.stderr.isatty())
            for batch in bar:
                if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                    raise ValueError("the loader must yield (images, pids, camids) batches, got "
                                     f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                                                  if isinstance(batch, (tuple, list)) else ""))
                images, pid, camid = batch
                images = images.to(device, non_blocking=True)
                feat = _embed(embed, images)
                if flip:
                    feat = (feat + _embed(embed, images.flip(3))) / 2
                feats.append(feat.float().cpu())
                pids.append(torch.as_tensor(pid).long().reshape(-1).cpu())
                camids.append(torch.as_tensor(camid).long().reshape(-1).cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batch: nothing to extract features from")
    out = torch.cat(feats), torch.cat(pids), torch.cat(camids)
    if not out[0].shape[0] == out[1].shape[0] == out[2].shape[0]:
        raise ValueError(f"the loader gave {out[0].shape[0]} images but {out[1].shape[0]} pids and "
                         f"{out[2].shape[0]} camids")
    return out


def _embed(embed: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    feat = embed(images)
    if not isinstance(feat, Tensor) or feat.dim() != 2 or feat.shape[0] != images.shape[0]:
        shape = tuple(feat.shape) if isinstance(feat, Tensor) else type(feat).__name__
        raise ValueError(f"the model must map images [B, 3, H, W] to features [B, D]; got {shape} "
                         f"for a batch of {images.shape[0]} (give it a test_features method)")
    return feat
