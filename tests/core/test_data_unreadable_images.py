"""An unreadable training image is replaced by a readable image of the same identity, so every rank's batch
keeps its size (DDP ranks gather equal numbers of embeddings and keys) and the run trains through."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reid_core.config import DataConfig
from reid_core.data import (DatasetError, PKSampler, build_dataset, build_test_transform, build_train_loader,
                            read_image, synthetic)

REPO = Path(__file__).resolve().parents[2]
CPU_CONFIG = REPO / "configs" / "synthetic_cpu.yaml"


def spoil(paths: list[str]) -> None:
    """Three kinds of unreadable file, in turn: empty, truncated JPEG, not an image at all."""
    for n, path in enumerate(paths):
        data = Path(path).read_bytes()
        Path(path).write_bytes([b"", data[:60], b"not a picture " * 20][n % 3])


@pytest.fixture()
def spoilt(tmp_path):
    """A Market-1501 tree of 8 training identities with 6 images each, 2 of each identity unreadable."""
    root = synthetic.generate(tmp_path / "data", "market1501", ids=16, cams=2, images_per_id_cam=3, height=64,
                              width=32, seed=1)
    ds = build_dataset("market1501", root)
    by_id: dict[int, list[int]] = {}
    for i, s in enumerate(ds.train):
        by_id.setdefault(s.pid, []).append(i)
    bad = sorted(i for ids in by_id.values() for i in ids[1:3])
    spoil([ds.train[i].path for i in bad])
    return root, ds, set(bad)


def plain(**kw) -> DataConfig:
    base = dict(height=64, width=32, batch_size=8, num_instance=2, workers=0, flip_prob=0.0, padding=0,
                random_erasing=0.0)
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_training_image_is_replaced_by_the_next_readable_one_of_its_identity(spoilt, workers):
    _, ds, bad = spoilt
    loader = build_train_loader(ds, plain(workers=workers), seed=2)
    drawn = loader.sampler.batches(0)
    resize = build_test_transform(plain())
    with pytest.warns(UserWarning, match="replaced by another image of its identity"):
        batches = list(loader)
    assert len(batches) == len(drawn) and all(len(labels) == 8 for _, labels, _ in batches)
    assert loader.skipped == sum(i in bad for batch in drawn for i in batch) > 0
    for (images, labels, _), indices in zip(batches, drawn):
        for slot, index in enumerate(indices):
            same = [j for j, s in enumerate(ds.train) if s.pid == ds.train[index].pid]
            at = same.index(index)
            expected = next(j for j in same[at:] + same[:at] if j not in bad)  # itself when readable
            assert torch.equal(images[slot], resize(read_image(ds.train[expected].path))), (index, expected)
        assert len(set(labels.tolist())) == 4  # P x K kept: 4 identities of 2


@pytest.mark.filterwarnings("ignore::UserWarning")  # the other identities' replacements warn first
def test_identity_without_a_readable_image_is_an_error_naming_it(spoilt):
    _, ds, bad = spoilt
    pid = ds.train[0].pid
    spoil([s.path for s in ds.train if s.pid == pid])
    with pytest.raises(DatasetError, match=rf"training identity {pid}: none of its 6 images can be read \(e\.g\. "
                                           rf".*{re.escape(Path(ds.train[0].path).parent.name)}"):
        for _ in build_train_loader(ds, plain(), seed=0):
            pass


def test_two_process_torchrun_trains_through_unreadable_images(spoilt, tmp_path):
    root, ds, bad = spoilt
    sets = {"data.dataset": "market1501", "data.root": root, "data.workers": 0, "data.batch_size": 16,
            "data.num_instance": 4, "train.epochs": 2, "train.iters_per_epoch": 3, "train.eval_period": 2,
            "train.output_dir": tmp_path / "run", "framework.dict_size": 64, "eval.batch_size": 64}
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "reid_core.train", "--config", str(CPU_CONFIG), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "2 process(es), global batch 16 (8 per process)" in done.stdout
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    final = [line for line in lines if line.startswith("final ")]
    assert len(final) == 1 and "mAP=" in final[0]
    skipped = int(re.search(r"skipped_images=(\d+)", final[0]).group(1))
    # summed over both ranks: the unreadable images among the first 3 global batches of sampler passes 0
    # and 1 (one pass per epoch; train.seed 0)
    sampler = PKSampler([s.pid for s in ds.train], 16, 4, seed=0)
    drawn = [i for epoch in (0, 1) for batch in sampler.global_batches(epoch)[:3] for i in batch]
    assert skipped == sum(i in bad for i in drawn) > 0
    assert "unreadable image" in done.stderr
