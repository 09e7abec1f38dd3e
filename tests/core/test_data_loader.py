"""Transforms and loaders on real JPEG files: shapes, uint8 output, relabelling, corrupt images."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from reid_core.config import DataConfig
from reid_core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageWarning,
    PixelNormalize,
    ReIDDataset,
    Sample,
    build_test_loader,
    build_test_transform,
    build_train_loader,
    build_train_transform,
    dataset_num_classes,
    read_image,
)

H, W = 32, 16


def cfg(**kw) -> DataConfig:
    base = dict(height=H, width=W, batch_size=8, num_instance=2, workers=0, padding=2)
    base.update(kw)
    return DataConfig(**base)


def make_dataset(root: Path, pids=(3, 8, 11, 20, 42), cams=2, per_cam=2) -> ReIDDataset:
    """Train images of ``pids``, each pid's colour distinct; query/gallery reuse them."""
    samples = []
    for n, pid in enumerate(pids):
        for cam in range(cams):
            for k in range(per_cam):
                path = root / f"{pid:04d}_c{cam + 1}s1_{k:06d}_01.jpg"
                Image.new("RGB", (20, 40), (40 * n, 255 - 40 * n, 7 * pid)).save(path, "JPEG", quality=90)
                samples.append(Sample(str(path), pid, cam))
    return ReIDDataset("tiny", str(root), samples, samples[:4], samples[4:])


def test_train_transform_shape_dtype_and_every_option(tmp_path):
    img = torch.randint(0, 256, (3, 50, 23), dtype=torch.uint8)
    t = build_train_transform(cfg(autoaug=True, autoaug_prob=1.0, random_erasing=1.0, flip_prob=1.0))
    out = t(img)
    assert out.shape == (4, H, W) and out.dtype == torch.uint8  # the fourth plane marks the erased box
    assert out[3].sum() > 0 and set(out[3].unique().tolist()) == {0, 1}
    plain = build_train_transform(cfg(flip_prob=0.0, padding=0, random_erasing=0.0))
    assert torch.equal(plain(img), build_test_transform(cfg())(img))


def test_test_transform_normalizes_with_imagenet_stats():
    grey = torch.full((3, 10, 10), 128, dtype=torch.uint8)
    out = build_test_transform(cfg())(grey)
    assert out.shape == (3, H, W) and out.dtype == torch.uint8  # normalised on the device, by the model
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    normalised = PixelNormalize()(out.unsqueeze(0))[0]
    assert torch.allclose(normalised.mean(dim=(1, 2)), expected, atol=1e-5)


def test_read_image_jpeg_and_png(tmp_path):
    Image.new("RGB", (6, 4), (250, 10, 10)).save(tmp_path / "a.jpg", "JPEG", quality=95)
    Image.new("L", (6, 4), 77).save(tmp_path / "b.png")
    a, b = read_image(str(tmp_path / "a.jpg")), read_image(str(tmp_path / "b.png"))
    assert a.shape == b.shape == (3, 4, 6) and a.dtype == b.dtype == torch.uint8
    assert a[0].float().mean() > 200 and a[1].float().mean() < 60
    assert torch.all(b == 77)


def test_train_loader_relabels_pids_and_yields_pk_batches(tmp_path):
    ds = make_dataset(tmp_path)
    loader = build_train_loader(ds, cfg(), seed=0)
    assert dataset_num_classes(ds) == loader.num_classes == 5
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    labels_seen = set()
    for images, labels, camids in batches:
        assert images.shape == (8, 4, H, W) and images.dtype == torch.uint8  # 4: random erasing's plane
        assert labels.dtype == camids.dtype == torch.long
        assert sorted(torch.bincount(labels).tolist(), reverse=True)[:4] == [2, 2, 2, 2]
        labels_seen |= set(labels.tolist())
    assert labels_seen == {0, 1, 2, 3, 4}
    # class i is the i-th smallest pid: pid 42 -> label 4 (its images have the largest red channel)
    images, labels, _ = batches[0]
    red = images[:, 0].float().mean(dim=(1, 2))
    order = torch.argsort(red)
    assert torch.equal(labels[order], labels.sort().values)


def test_test_loader_keeps_order_and_pids(tmp_path):
    ds = make_dataset(tmp_path)
    loader = build_test_loader(ds.gallery, cfg(), batch_size=5)
    images, pids, camids = (torch.cat(x) for x in zip(*loader))
    assert images.shape == (len(ds.gallery), 3, H, W)
    assert pids.tolist() == [s.pid for s in ds.gallery]
    assert camids.tolist() == [s.camid for s in ds.gallery]


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_jpeg_is_skipped_counted_and_reported_once(tmp_path, workers):
    ds = make_dataset(tmp_path)
    bad = [ds.gallery[1].path, ds.gallery[7].path]
    for path in bad:
        Path(path).write_bytes(b"this is not a jpeg at all" * 10)
    Path(ds.gallery[3].path).write_bytes(Path(ds.gallery[3].path).read_bytes()[:40])  # truncated JPEG
    loader = build_test_loader(ds.gallery, cfg(workers=workers), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pids = torch.cat([p for _, p, _ in loader])
    ours = [w for w in caught if issubclass(w.category, CorruptImageWarning)]
    assert len(ours) == 1 and bad[0] in str(ours[0].message)
    assert loader.skipped == 3 and loader.first_bad == bad[0]
    assert pids.tolist() == [s.pid for i, s in enumerate(ds.gallery) if i not in (1, 3, 7)]


def test_train_loader_with_a_corrupt_image_still_trains(tmp_path):
    ds = make_dataset(tmp_path, per_cam=1)
    Path(ds.train[0].path).write_bytes(b"\xff\xd8 garbage after a jpeg marker")
    loader = build_train_loader(ds, cfg(batch_size=10), seed=1)
    with pytest.warns(CorruptImageWarning, match=Path(ds.train[0].path).name):
        sizes = [len(labels) for _, labels, _ in loader]
    # replaced by another image of the same identity: every batch keeps its size
    assert loader.skipped >= 1 and sizes == [10] * len(loader)
