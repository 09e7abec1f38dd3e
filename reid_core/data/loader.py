"""Data loaders: fast JPEG decoding, corrupt-image skipping, P x K training batches.

Images are decoded with ``torchvision.io.decode_jpeg`` from the file bytes (PIL for anything that is not a
JPEG, or a JPEG libjpeg-turbo rejects). An image that cannot be read is dropped from its batch by the
collate function, which returns how many it dropped; the :class:`ReIDLoader` wrapper, in the main process,
sums them into ``.skipped`` and warns once, naming the first bad file.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from reid_core.config import DataConfig
from reid_core.data.datasets import ReIDDataset, Sample
from reid_core.data.sampler import PKSampler
from reid_core.data.transforms import build_test_transform, build_train_transform

_JPEG_MAGIC = b"\xff\xd8"
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision"


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and was left out of its batch."""


def read_image(path: str) -> torch.Tensor:
    """Decode an image file into ``uint8[3, H, W]`` RGB. Raises ``OSError``/``RuntimeError`` when unreadable."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _JPEG_MAGIC:
        try:
            # torchvision 0.29 deprecates its decoders (for TorchCodec, not installed) and warns on every
            # call; the decoder works, so that one message is silenced.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # let PIL have a go (e.g. an unusual colour space); it raises if it cannot either
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class _Unreadable(NamedTuple):
    path: str
    reason: str


class ImageDataset(Dataset):
    """Samples as ``(image float[3,H,W], label, camid)``; an unreadable file gives an ``_Unreadable``.

    ``labels`` overrides the sample pids (the training relabelling); by default the pids are returned.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[torch.Tensor], torch.Tensor],
                 labels: Sequence[int] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.labels = list(labels) if labels is not None else [s.pid for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            image = read_image(sample.path)
        except (OSError, RuntimeError, ValueError) as exc:
            return _Unreadable(sample.path, f"{type(exc).__name__}: {exc}")
        return self.transform(image), self.labels[index], sample.camid


class _Batch(NamedTuple):
    images: torch.Tensor  # float[B, 3, H, W]
    labels: torch.Tensor  # long[B]
    camids: torch.Tensor  # long[B]
    skipped: int
    first_bad: _Unreadable | None


def collate_skipping(items: list) -> _Batch:
    """Stack the readable items of a batch; count the unreadable ones (possibly all of them)."""
    good = [it for it in items if not isinstance(it, _Unreadable)]
    bad = [it for it in items if isinstance(it, _Unreadable)]
    if good:
        images = torch.stack([it[0] for it in good])
    else:
        images = torch.empty(0)
    labels = torch.tensor([it[1] for it in good], dtype=torch.long)
    camids = torch.tensor([it[2] for it in good], dtype=torch.long)
    return _Batch(images, labels, camids, len(bad), bad[0] if bad else None)


class ReIDLoader:
    """Iterates ``(images float[B,3,H,W], labels long[B], camids long[B])`` from a DataLoader built with
    :func:`collate_skipping`, counting skipped images in ``.skipped`` and warning once."""

    def __init__(self, loader: DataLoader, num_classes: int | None = None) -> None:
        self.loader = loader
        self.num_classes = num_classes
        self.skipped = 0
        self.first_bad: str | None = None

    @property
    def sampler(self) -> PKSampler | None:
        bs = self.loader.batch_sampler
        return bs if isinstance(bs, PKSampler) else None

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next pass as epoch ``epoch`` (training loaders)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            if batch.skipped:
                self._report(batch)
            if len(batch.labels):
                yield batch.images, batch.labels, batch.camids

    def _report(self, batch: _Batch) -> None:
        self.skipped += batch.skipped
        if self.first_bad is None:
            self.first_bad = batch.first_bad.path
            warnings.warn(f"skipping unreadable image {batch.first_bad.path} ({batch.first_bad.reason}); "
                          "further unreadable images are skipped silently and counted in loader.skipped",
                          CorruptImageWarning, stacklevel=3)


def _loader_kwargs(cfg: DataConfig) -> dict:
    return {
        "num_workers": cfg.workers,
        "persistent_workers": cfg.workers > 0,
        "pin_memory": torch.cuda.is_available(),
        "collate_fn": collate_skipping,
    }


def train_label_map(dataset: ReIDDataset) -> dict[int, int]:
    """Training pid -> class index in 0..C-1, in ascending pid order."""
    return {pid: i for i, pid in enumerate(sorted({s.pid for s in dataset.train}))}


def dataset_num_classes(dataset: ReIDDataset) -> int:
    """C, the number of training identities (classifier outputs)."""
    return dataset.num_train_pids


def build_train_loader(dataset: ReIDDataset, cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
                       seed: int = 0) -> ReIDLoader:
    """P x K training batches of ``(images, labels in 0..C-1, camids)`` with the train transform.

    ``rank``/``world_size`` give this process a disjoint share of the identities each epoch; every rank
    yields ``len(loader)`` batches of ``cfg.batch_size`` images (fewer only where images were unreadable).
    """
    mapping = train_label_map(dataset)
    labels = [mapping[s.pid] for s in dataset.train]
    sampler = PKSampler(labels, cfg.batch_size, cfg.num_instance, seed=seed, rank=rank, world_size=world_size)
    data = ImageDataset(dataset.train, build_train_transform(cfg), labels)
    return ReIDLoader(DataLoader(data, batch_sampler=sampler, **_loader_kwargs(cfg)), num_classes=len(mapping))


def build_test_loader(samples: Sequence[Sample], cfg: DataConfig, batch_size: int, *, rank: int = 0,
                      world_size: int = 1) -> ReIDLoader:
    """Batches of ``(images, pids, camids)`` of ``samples`` in order, with the test transform.

    With ``world_size > 1``, only this rank's contiguous shard of ``samples`` (see :func:`shard_bounds`).
    """
    lo, hi = shard_bounds(len(samples), rank, world_size)
    data = ImageDataset(samples[lo:hi], build_test_transform(cfg))
    return ReIDLoader(DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=False,
                                 **_loader_kwargs(cfg)))


def shard_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous shard ``[lo, hi)`` of ``num_samples`` test samples: ``[r*c, min((r+1)*c, N))``
    with ``c = ceil(N / world_size)`` (FastReID's inference split); the last shards may be short or empty."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"test loader: rank={rank} is not in 0..world_size-1 (world_size={world_size})")
    per_rank = -(-num_samples // world_size)
    return min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples)
