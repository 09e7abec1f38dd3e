"""data.batch_size is the global batch: W ranks each load batch_size / W images, and their slices at a step,
concatenated in rank order, are the one-process batch of that step (same images, same order)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from reid_core.config import Config, ConfigError, DataConfig
from reid_core.data import PKSampler, build_dataset, build_train_loader, check_global_batch, synthetic

BATCH, K = 16, 2  # P = 8 identities; 4 ranks get 2 identities each


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("global") / "data", "market1501", ids=22, cams=2,
                              images_per_id_cam=3, height=32, width=16, seed=2)
    return build_dataset("market1501", root)  # 11 training identities of 6 images


def plain(**kw) -> DataConfig:
    """No random augmentation: a batch's images depend only on which files it holds."""
    base = dict(height=32, width=16, batch_size=BATCH, num_instance=K, workers=0, flip_prob=0.0, padding=0,
                random_erasing=0.0)
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_concatenate_to_the_one_process_batch(dataset, world_size):
    labels = [s.pid for s in dataset.train]
    one = PKSampler(labels, BATCH, K, seed=5)
    ranks = [PKSampler(labels, BATCH, K, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in (0, 3):
        whole = one.batches(epoch)
        parts = [r.batches(epoch) for r in ranks]
        assert all(len(p) == len(whole) == len(one) for p in parts)
        for step, batch in enumerate(whole):
            slices = [p[step] for p in parts]
            assert all(len(s) == BATCH // world_size for s in slices)
            assert [i for s in slices for i in s] == batch
            # each rank holds whole identities: no identity is split between ranks
            owners = [{labels[i] for i in s} for s in slices]
            assert sum(len(o) for o in owners) == len(set().union(*owners)) == BATCH // K

    # the same through the loaders: images and labels, step by step
    loaders = [build_train_loader(dataset, plain(), rank=r, world_size=world_size, seed=5)
               for r in range(world_size)]
    reference = build_train_loader(dataset, plain(), seed=5)
    assert all(len(loader) == len(reference) for loader in loaders)
    for step, (images, labels_1, camids) in enumerate(reference):
        if step == 3:
            break
        if step == 0:
            rank_iters = [iter(loader) for loader in loaders]
        got = [next(it) for it in rank_iters]
        assert all(g[0].shape[0] == BATCH // world_size for g in got)
        assert torch.equal(torch.cat([g[0] for g in got]), images)
        assert torch.equal(torch.cat([g[1] for g in got]), labels_1)
        assert torch.equal(torch.cat([g[2] for g in got]), camids)


def test_batches_per_epoch_do_not_depend_on_the_number_of_workers(dataset):
    lengths = {w: len(build_train_loader(dataset, plain(), rank=0, world_size=w)) for w in (1, 2, 4)}
    assert len(set(lengths.values())) == 1 and lengths[1] > 1, lengths


def test_check_global_batch_names_the_numbers_and_the_fix():
    cfg = Config().replace({"data.batch_size": 64, "data.num_instance": 16})
    check_global_batch(cfg, 1)
    check_global_batch(cfg, 4)  # 16 images = one identity per worker
    with pytest.raises(ConfigError) as err:
        check_global_batch(cfg, 8)
    text = str(err.value)
    assert "data.batch_size 64 is not divisible by workers x K = 8 x 16 = 128" in text
    assert "data.batch_size=128" in text and "4 worker(s)" in text
    with pytest.raises(ConfigError, match=r"52 is not divisible by workers x K = 2 x 4 = 8.*data.batch_size=56 or 48"):
        check_global_batch(DataConfig(batch_size=52, num_instance=4), 2)  # the DataConfig alone works too
    with pytest.raises(ConfigError, match="positive integer"):
        check_global_batch(cfg, 0)


def test_loader_refuses_a_batch_the_ranks_cannot_share(dataset):
    with pytest.raises(ConfigError, match="workers x K = 4 x 2 = 8"):
        build_train_loader(dataset, plain(batch_size=12), rank=0, world_size=4)


def test_the_check_imports_no_torch():
    code = ("import sys; from reid_core.data import check_global_batch; from reid_core.config import DataConfig; "
            "check_global_batch(DataConfig(batch_size=64, num_instance=16), 4); assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
