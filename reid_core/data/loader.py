"""Data loaders: fast JPEG decoding, unreadable-image handling, P x K training batches, uint8 output.

Images are decoded with ``torchvision.io.decode_jpeg`` from the file bytes (PIL for anything that is not a
JPEG, or a JPEG libjpeg-turbo rejects) and leave the loader as uint8 (a quarter of float32's bytes through
worker pipes, pinned memory and the host-to-device copy); the model normalises them on its device.

An image that cannot be read is replaced, in training, by the next readable image of the same identity, so
that every rank's batch keeps its size and P x K structure (under DDP the ranks gather equal numbers of
embeddings and keys); in test sets it is dropped from its batch. The collate function returns how many
it replaced or dropped; the :class:`ReIDLoader` wrapper, in the main process, sums them into ``.skipped``
and warns once, naming the first bad file.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from reid_core.config import DataConfig
from reid_core.data.batch import check_global_batch
from reid_core.data.datasets import DatasetError, ReIDDataset, Sample
from reid_core.data.sampler import PKSampler
from reid_core.data.transforms import build_test_transform, build_train_transform

_JPEG_MAGIC = b"\xff\xd8"
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision"


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded (and was replaced, or left out of its batch)."""


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
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's own message names the in-memory buffer's address, which differs per process: a study could
        # not tell that its trials failed the same way.
        raise OSError("not a JPEG, nor an image format PIL can identify") from None
    with img:
        arr = np.asarray(img.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class _Unreadable(NamedTuple):
    path: str
    reason: str


class _Item(NamedTuple):
    image: torch.Tensor  # uint8[C, H, W] (C = 3, or 4 with the random-erasing plane)
    label: int
    camid: int
    replaced: _Unreadable | None  # the unreadable image this one stands in for (training)


class _NoReadableImage(NamedTuple):
    """A training identity none of whose images can be read."""
    pid: int
    images: int
    first: _Unreadable


class ImageDataset(Dataset):
    """Samples as :class:`_Item` ``(image uint8[C,H,W], label, camid, replaced)``.

    ``labels`` overrides the sample pids (the training relabelling); by default the pids are returned.

    An unreadable file gives an ``_Unreadable`` (test sets: the collate drops it), or, with
    ``substitute`` (training), the next readable image of the same identity in dataset order (wrapping
    around), so that a batch keeps its size and identities; the item then names the file it replaces.
    An identity with no readable image gives a ``_NoReadableImage``, which the loader raises as an error.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[torch.Tensor], torch.Tensor],
                 labels: Sequence[int] | None = None, *, substitute: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.labels = list(labels) if labels is not None else [s.pid for s in self.samples]
        self.substitute = substitute
        self._same_id: dict[int, list[int]] = {}  # pid -> its dataset indices, in order
        if substitute:
            for i, s in enumerate(self.samples):
                self._same_id.setdefault(s.pid, []).append(i)
        self._bad: dict[int, _Unreadable] = {}  # indices found unreadable by this process

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> torch.Tensor | _Unreadable:
        if index in self._bad:
            return self._bad[index]
        path = self.samples[index].path
        try:
            return read_image(path)
        except (OSError, RuntimeError, ValueError) as exc:
            self._bad[index] = _Unreadable(path, f"{type(exc).__name__}: {exc}")
            return self._bad[index]

    def __getitem__(self, index: int) -> _Item | _Unreadable | _NoReadableImage:
        image = self._read(index)
        if not isinstance(image, _Unreadable):
            return _Item(self.transform(image), self.labels[index], self.samples[index].camid, None)
        if not self.substitute:
            return image
        same = self._same_id[self.samples[index].pid]
        at = same.index(index)
        for other in same[at + 1:] + same[:at]:
            substitute = self._read(other)
            if not isinstance(substitute, _Unreadable):
                return _Item(self.transform(substitute), self.labels[other], self.samples[other].camid, image)
        return _NoReadableImage(self.samples[index].pid, len(same), image)


class _Batch(NamedTuple):
    images: torch.Tensor  # uint8[B, C, H, W]
    labels: torch.Tensor  # long[B]
    camids: torch.Tensor  # long[B]
    skipped: int
    first_bad: _Unreadable | None
    no_readable: _NoReadableImage | None


def collate_skipping(items: list) -> _Batch:
    """Stack the readable items of a batch (substitutes included); count the unreadable images, dropped
    (test sets) or replaced (training)."""
    good = [it for it in items if isinstance(it, _Item)]
    bad = [it for it in items if isinstance(it, _Unreadable)] + [it.replaced for it in good if it.replaced]
    hopeless = next((it for it in items if isinstance(it, _NoReadableImage)), None)
    if good:
        images = torch.stack([it.image for it in good])
    else:
        images = torch.empty(0, dtype=torch.uint8)
    labels = torch.tensor([it.label for it in good], dtype=torch.long)
    camids = torch.tensor([it.camid for it in good], dtype=torch.long)
    return _Batch(images, labels, camids, len(bad), bad[0] if bad else None, hopeless)


class ReIDLoader:
    """Iterates ``(images uint8[B,C,H,W], labels long[B], camids long[B])`` from a DataLoader built with
    :func:`collate_skipping`, counting unreadable images in ``.skipped`` and warning once.

    Images are not normalised: the model does it on its device (:class:`reid_core.data.PixelNormalize`).
    C is 3, or 4 for training batches with random erasing (the fourth plane marks the erased pixels).
    A training batch whose identity has no readable image left raises :class:`DatasetError`.
    """

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
            if batch.no_readable is not None:
                none = batch.no_readable
                raise DatasetError(f"training identity {none.pid}: none of its {none.images} images can be read "
                                   f"(e.g. {none.first.path}: {none.first.reason}); replace the files or remove "
                                   "the identity")
            if batch.skipped:
                self._report(batch)
            if len(batch.labels):
                yield batch.images, batch.labels, batch.camids

    def _report(self, batch: _Batch) -> None:
        self.skipped += batch.skipped
        if self.first_bad is None:
            self.first_bad = batch.first_bad.path
            action = "replaced by another image of its identity" if self.sampler is not None else "skipping"
            warnings.warn(f"unreadable image {batch.first_bad.path} ({batch.first_bad.reason}): {action}; further "
                          "unreadable images are handled alike without a warning and counted in loader.skipped",
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
    """P x K training batches of ``(images uint8, labels in 0..C-1, camids)`` with the train transform.

    ``cfg.batch_size`` is the global batch: every rank yields ``len(loader)`` batches (the same number
    for every ``world_size``) of ``cfg.batch_size / world_size`` images, rank ``r``'s being images
    ``[r * b, (r + 1) * b)`` of the one-process batch of the same step and seed. An unreadable image is
    replaced by a readable one of the same identity (counted in ``.skipped``), so batch sizes never vary.
    Raises :class:`ConfigError` when ``world_size x cfg.num_instance`` does not divide the batch.
    """
    check_global_batch(cfg, world_size)
    mapping = train_label_map(dataset)
    labels = [mapping[s.pid] for s in dataset.train]
    sampler = PKSampler(labels, cfg.batch_size, cfg.num_instance, seed=seed, rank=rank, world_size=world_size)
    data = ImageDataset(dataset.train, build_train_transform(cfg), labels, substitute=True)
    return ReIDLoader(DataLoader(data, batch_sampler=sampler, **_loader_kwargs(cfg)), num_classes=len(mapping))


def build_test_loader(samples: Sequence[Sample], cfg: DataConfig, batch_size: int, *, rank: int = 0,
                      world_size: int = 1) -> ReIDLoader:
    """Batches of ``(images uint8[B,3,H,W], pids, camids)`` of ``samples`` in order, with the test transform.
    Unreadable images are left out of their batch (counted in ``.skipped``).

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
