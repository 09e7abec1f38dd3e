"""Evaluation shared by the workers of a data-parallel run: each rank extracts its contiguous shard of the test
set, the shards are gathered in dataset order, and the metrics equal one process's.

Two real processes with a gloo process group (torch.multiprocessing spawn, file:// rendezvous), on real JPEG
trees written by the synthetic generator, some of them made unreadable.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from reid_core.config import Config
from reid_core.data import CorruptImageWarning, load_dataset
from reid_core.data.loader import build_test_loader, shard_bounds

WORLD = 2
TIMEOUT_S = 240
# Unreadable files, by index in the dataset's query / gallery lists (18 queries, 36 gallery images): both
# ranks' shards lose some, and rank 1's gallery shard loses more than rank 0's (unequal shard sizes).
BAD_QUERY = (2, 12, 13)
BAD_GALLERY = (0, 20, 29, 35)


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in WORLD processes; fail (and kill them) after TIMEOUT_S seconds."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} gloo workers were still running after {TIMEOUT_S} s (a hang?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _init(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)


@pytest.fixture(scope="module")
def damaged_root(tmp_path_factory):
    """12 identities x 3 cameras x 3 images at 64x32 (6 test identities: 18 query, 36 gallery JPEGs),
    with BAD_QUERY and BAD_GALLERY overwritten by bytes no decoder reads."""
    from reid_core.data import synthetic

    root = synthetic.generate(tmp_path_factory.mktemp("evalshard") / "data", "market1501", ids=12, cams=3,
                              images_per_id_cam=3, height=64, width=32, seed=3)
    dataset = load_dataset(_config(root, "/unused").data)
    assert (len(dataset.query), len(dataset.gallery)) == (18, 36)
    for index in BAD_QUERY:
        Path(dataset.query[index].path).write_bytes(b"not an image " * 20)
    for index in BAD_GALLERY:
        path = Path(dataset.gallery[index].path)
        path.write_bytes(path.read_bytes()[:60])  # a truncated JPEG
    return root


def _config(root, out_dir, **overrides) -> Config:
    """ResNet-18 at 64x32, CPU, no loader workers; test batches of 4 so that shard ends fall inside batches."""
    base = {"data.dataset": "synthetic", "data.root": str(root), "data.height": 64, "data.width": 32,
            "data.batch_size": 8, "data.num_instance": 4, "data.workers": 0, "model.arch": "resnet18",
            "framework.name": "moreid", "framework.dict_size": 64, "optim.lr": 1e-3, "train.epochs": 1,
            "train.iters_per_epoch": 2, "train.device": "cpu", "train.output_dir": str(out_dir),
            "eval.batch_size": 4, "eval.flip": True, "eval.max_rank": 10}
    base.update(overrides)
    return Config().replace(base)


RERANK_QE = {"eval.rerank": True, "eval.rerank_k1": 6, "eval.rerank_k2": 2, "eval.query_expansion": True,
             "eval.qe_k": 2}


# ---- the shards -------------------------------------------------------------------------------------

@pytest.mark.parametrize("num, world, expected", [
    (7, 2, [(0, 4), (4, 7)]),
    (10, 3, [(0, 4), (4, 8), (8, 10)]),
    (9, 4, [(0, 3), (3, 6), (6, 9), (9, 9)]),  # ceil(9/4) = 3: the last rank gets nothing
    (1, 2, [(0, 1), (1, 1)]),
    (5, 1, [(0, 5)]),
])
def test_shard_bounds_are_contiguous_ceil_sized_and_cover_the_set(num, world, expected):
    assert [shard_bounds(num, rank, world) for rank in range(world)] == expected


@pytest.mark.parametrize("rank, world", [(2, 2), (-1, 2), (0, 0)])
def test_shard_bounds_reject_a_rank_outside_the_world(rank, world):
    with pytest.raises(ValueError, match=f"rank={rank} .*world_size={world}"):
        shard_bounds(10, rank, world)


def test_test_loader_shards_concatenate_to_the_whole_set(damaged_root):
    dataset = load_dataset(_config(damaged_root, "/unused").data)
    cfg = _config(damaged_root, "/unused").data
    readable = [s.pid for i, s in enumerate(dataset.gallery) if i not in BAD_GALLERY]
    pids, skipped = [], 0
    for rank in range(3):
        loader = build_test_loader(dataset.gallery, cfg, batch_size=5, rank=rank, world_size=3)
        assert len(loader.loader.dataset) == 12  # 36 / 3
        with pytest.warns(CorruptImageWarning):  # each shard holds an unreadable image
            pids += [int(p) for _, batch, _ in loader for p in batch]
        skipped += loader.skipped
    assert pids == readable and skipped == len(BAD_GALLERY)


# ---- the gather, on plain loaders ----------------------------------------------------------------------

class _Linear(nn.Module):
    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(2, dim)

    def forward(self, x):
        return self.linear(x.flatten(1))


def _batches(first: int, count: int, size: int = 2):
    """Images [count, 1, 1, 2] whose values encode their dataset index; pid = index, camid = index % 3."""
    index = torch.arange(first, first + count)
    images = torch.stack([index, -index], 1).float().view(-1, 1, 1, 2)
    return [(images[i:i + size], index[i:i + size], index[i:i + size] % 3) for i in range(0, count, size)]


def _gather_worker(rank: int, folder: str) -> None:
    from reid_core.evaluation.features import extract_features_sharded, gather_shards

    _init(rank, folder)
    try:
        torch.manual_seed(0)
        model = _Linear()
        out = {}
        # unequal shards: rank 0 has 5 images, rank 1 has 2 (a short last shard)
        out["unequal"] = extract_features_sharded(model, _batches(0, 5) if rank == 0 else _batches(5, 2), "cpu",
                                                  progress=False)
        # rank 1's shard yields nothing (empty, or every image unreadable and dropped)
        out["empty"] = extract_features_sharded(model, _batches(0, 3) if rank == 0 else [], "cpu", progress=False)
        errors = []
        try:  # no rank has a batch: the same error on every rank, no hang
            extract_features_sharded(model, [], "cpu", progress=False)
        except ValueError as exc:
            errors.append(str(exc))
        wide = _Linear(4 if rank else 3)
        try:  # ranks with different models: refused on every rank
            extract_features_sharded(wide, _batches(2 * rank, 2), "cpu", progress=False)
        except ValueError as exc:
            errors.append(str(exc))
        out["errors"] = errors
        out["padded_types"] = [t.dtype for t in gather_shards(torch.ones(rank, 2, dtype=torch.float16),
                                                              torch.arange(rank), torch.arange(rank))]
        torch.save(out, f"{folder}/gather{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_puts_unequal_and_empty_shards_in_rank_order(tmp_path):
    from reid_core.evaluation import extract_features

    _spawn(_gather_worker, str(tmp_path))
    results = [torch.load(tmp_path / f"gather{rank}.pt") for rank in range(WORLD)]
    torch.manual_seed(0)
    model = _Linear()
    for name, total in (("unequal", 7), ("empty", 3)):
        expected = extract_features(model, _batches(0, total), "cpu", progress=False)
        for rank, result in enumerate(results):
            feats, pids, camids = result[name]
            assert feats.shape == (total, 3) and feats.dtype == torch.float32, (name, rank)
            torch.testing.assert_close(feats, expected[0], rtol=0, atol=1e-6)
            assert pids.tolist() == list(range(total)) and torch.equal(camids, expected[2]), (name, rank)
    for result in results:
        assert len(result["errors"]) == 2
        assert "all 2 ranks yielded no batch" in result["errors"][0]
        assert "different sizes" in result["errors"][1] and "(2, 3)" in result["errors"][1]
        assert result["padded_types"] == [torch.float32, torch.long, torch.long]


# ---- the Trainer: 2 workers against one process ------------------------------------------------------

def _trainer_worker(rank: int, root: str, folder: str) -> None:
    from reid_core.engine.trainer import Trainer

    _init(rank, folder)
    try:
        cfg = _config(root, folder)
        tr = Trainer(cfg, log_dir=f"{folder}/tb")
        tr.train_epoch()  # two DDP steps
        # Training keeps the ranks' BatchNorm statistics equal (rank 0's are broadcast after every step);
        # make rank 1's differ, as a user's own DDP loop may leave them, so the test shows each rank
        # extracting with rank 0's.
        if rank == 1:
            with torch.no_grad():
                for name, buffer in tr.model.named_buffers():
                    if name.endswith("running_mean"):
                        buffer.add_(0.5)
        own = {k: v.clone() for k, v in tr.model.state_dict().items() if "running" in k}
        rng = torch.get_rng_state()  # the test loaders draw their seed from it
        metrics = tr.evaluate()
        rng_kept = torch.equal(rng, torch.get_rng_state())
        buffers_kept = all(torch.equal(v, tr.model.state_dict()[k]) for k, v in own.items())
        features = tr.test_features()
        tr.save_checkpoint(f"{folder}/ckpt.pt")
        tr.cfg = cfg.replace(RERANK_QE)
        reranked = tr.evaluate()
        skipped = tr.skipped_images()
        # A diverged model (NaN statistics on rank 0, so NaN features on both ranks): the metrics fail on
        # rank 0, and every rank raises instead of waiting for rank 0's broadcast.
        tr.cfg = cfg
        if rank == 0:
            for name, buffer in tr.model.named_buffers():
                if name.endswith("running_mean"):
                    buffer.fill_(float("nan"))
        try:
            tr.evaluate()
            failure = ""
        except (ValueError, RuntimeError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        torch.save({"metrics": metrics, "reranked": reranked, "features": features, "own_buffers": own,
                    "rng_kept": rng_kept, "buffers_kept": buffers_kept, "skipped": skipped, "failure": failure,
                    "shard_sizes": (len(tr.query_loader.loader.dataset), len(tr.gallery_loader.loader.dataset))},
                   f"{folder}/rank{rank}.pt")
        tr.close()
    finally:
        dist.destroy_process_group()


def test_two_workers_evaluate_exactly_as_one_process(damaged_root, tmp_path):
    from reid_core.engine.trainer import Trainer

    _spawn(_trainer_worker, str(damaged_root), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD))
    assert (r0["shard_sizes"], r1["shard_sizes"]) == ((9, 18), (9, 18))
    # The test is only meaningful if the ranks' BatchNorm statistics differ: each rank must extract with rank 0's.
    assert any(not torch.equal(v, r1["own_buffers"][k]) for k, v in r0["own_buffers"].items())
    assert r0["rng_kept"] and r1["rng_kept"] and r0["buffers_kept"] and r1["buffers_kept"]

    # One process, the same model (rank 0's checkpoint), the whole test sets.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _config(damaged_root, tmp_path / "single")
        single = Trainer(cfg)
        single.load_checkpoint(tmp_path / "ckpt.pt")
        with pytest.warns(CorruptImageWarning, match="unreadable image"):
            metrics = single.evaluate()
        features = single.test_features()
        single.cfg = cfg.replace(RERANK_QE)
        reranked = single.evaluate()
        single.close()
    finally:
        torch.set_num_threads(threads)

    qf, gf, qp, gp, qc, gc = features
    assert (qf.shape[0], gf.shape[0]) == (18 - len(BAD_QUERY), 36 - len(BAD_GALLERY))  # unreadable: left out
    for rank, result in enumerate((r0, r1)):
        got = result["features"]
        for mine, theirs in zip(got[:2], (qf, gf)):
            assert mine.shape == theirs.shape and mine.dtype == torch.float32
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
        for mine, theirs in zip(got[2:], (qp, gp, qc, gc)):
            assert torch.equal(mine, theirs), rank
        assert result["metrics"] == metrics, rank  # mAP, R1, R5, R10, mINP, every CMC value
        assert set(result["metrics"]) == set(metrics) >= {"mAP", "R1", "R5", "R10", "mINP", "cmc"}
        assert result["reranked"] == reranked, rank
        assert {"mAP_rerank", "mINP_rerank", "cmc_rerank"} <= set(result["reranked"])
        # three passes over the test sets, each skipping every unreadable image once, whichever rank read it
        assert result["skipped"] == single.skipped_images() == 3 * (len(BAD_QUERY) + len(BAD_GALLERY))
    assert reranked["mAP"] != metrics["mAP"]  # query expansion did change the features

    assert r0["failure"].startswith("ValueError") and "NaN" in r0["failure"]
    assert r1["failure"] == f"RuntimeError: evaluation failed on rank 0: {r0['failure']}"
