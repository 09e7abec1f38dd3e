"""Test-time feature extraction: run a model over a test loader and collect features and labels.

:func:`extract_features` runs over one loader in one process. :func:`extract_features_sharded` is its
data-parallel form: each rank of a ``torch.distributed`` group runs over its own contiguous shard of the test
set (``build_test_loader(..., rank=, world_size=)``) and the shards are all-gathered, in rank order, into the
whole set, as one process would have extracted it. :func:`rank0_buffers` gives every rank rank 0's
BatchNorm statistics for the extraction (DDP keeps the parameters identical, not the running statistics).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
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
    Raises ``ValueError`` when the loader yields no batch.
    """
    feats, pids, camids = _extract(model, loader, device, flip, progress)
    if feats.shape[0] == 0:
        raise ValueError("the loader yielded no batch: nothing to extract features from")
    return feats, pids, camids


def extract_features_sharded(model: nn.Module, loader: Iterable, device: torch.device | str, flip: bool = False,
                             progress: bool = True, group: dist.ProcessGroup | None = None
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`extract_features` of a test set split over the ranks of ``group`` (default: the world).

    Every rank must call it, with ``loader`` over its own contiguous shard (rank 0 the first images, ...).
    A shard may be empty or yield nothing (every image unreadable and dropped, as in one process). The
    shards are all-gathered: each rank returns the whole ``(feats float32[N, D], pids long[N], camids
    long[N])``, on the CPU, in rank order, i.e. the dataset order. The collectives run on ``device``
    when it is a CUDA device (NCCL), else on the CPU. Without an initialised process group this is
    :func:`extract_features`. Raises ``ValueError`` on every rank when no rank had a batch, or when the
    ranks' feature sizes differ.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return extract_features(model, loader, device, flip, progress)
    return gather_shards(*_extract(model, loader, device, flip, progress), device=device, group=group)


@contextmanager
def rank0_buffers(module: nn.Module, group: dist.ProcessGroup | None = None) -> Iterator[nn.Module]:
    """Within the block, ``module``'s buffers (BatchNorm running statistics, ...) are rank 0's of ``group``
    on every rank; on leaving it each rank gets its own back, so the training is not changed.

    Under DDP the parameters are identical on every rank but each rank's BatchNorm statistics move with its
    own batches (until DDP broadcasts rank 0's at the next forward): features of one model, as one process
    would extract them, need one set of statistics. A no-op without a process group of several ranks.
    """
    buffers = list(module.buffers())
    if not buffers or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        yield module
        return
    own = [b.detach().clone() for b in buffers]
    try:
        with torch.no_grad():
            for key in sorted({(b.device.type, b.device.index or 0, str(b.dtype)) for b in buffers}):
                group_of = [b for b in buffers if (b.device.type, b.device.index or 0, str(b.dtype)) == key]
                flat = torch.cat([b.reshape(-1) for b in group_of])
                dist.broadcast(flat, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
                for b, part in zip(group_of, torch.split(flat, [b.numel() for b in group_of])):
                    b.copy_(part.view_as(b))
        yield module
    finally:
        with torch.no_grad():
            for b, saved in zip(buffers, own):
                b.copy_(saved)


def gather_shards(feats: Tensor, pids: Tensor, camids: Tensor, device: torch.device | str = "cpu",
                  group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """All-gather every rank's ``(feats float[n_r, D], pids long[n_r], camids long[n_r])`` and concatenate
    them in rank order; ``n_r`` may differ between ranks and be 0 (``feats`` may then be ``[0, 0]``).

    The sizes are gathered first, each shard is padded to the largest, gathered, and trimmed. Returns
    float32 / long / long tensors on the CPU, the same on every rank.
    """
    comm = torch.device(device)
    if comm.type != "cuda":
        comm = torch.device("cpu")
    world = dist.get_world_size(group)
    n = feats.shape[0]
    size = torch.tensor([n, feats.shape[1] if n else -1], dtype=torch.long, device=comm)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    table = [tuple(s.tolist()) for s in sizes]
    counts = [count for count, _ in table]
    dims = sorted({dim for count, dim in table if count})
    if not dims:
        raise ValueError(f"the test loaders of all {world} ranks yielded no batch: nothing to extract features from")
    if len(dims) > 1:
        raise ValueError(f"the ranks extracted features of different sizes: (count, dim) per rank {table}")
    dim, longest = dims[0], max(counts)
    padded = torch.zeros(longest, dim, dtype=torch.float32, device=comm)
    labels = torch.zeros(longest, 2, dtype=torch.long, device=comm)
    if n:
        padded[:n] = feats.to(comm, torch.float32)
        labels[:n, 0] = pids.to(comm)
        labels[:n, 1] = camids.to(comm)
    all_feats = [torch.empty_like(padded) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_feats, padded, group=group)
    dist.all_gather(all_labels, labels, group=group)
    out_feats = torch.cat([f[:c] for f, c in zip(all_feats, counts)]).cpu()
    out_labels = torch.cat([lab[:c] for lab, c in zip(all_labels, counts)]).cpu()
    return out_feats, out_labels[:, 0].contiguous(), out_labels[:, 1].contiguous()


def _extract(model: nn.Module, loader: Iterable, device: torch.device | str, flip: bool,
             progress: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`extract_features` without the empty check: a loader that yields nothing gives ``[0, 0]``,
    ``[0]``, ``[0]``."""
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
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
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
