"""Evaluation: evaluate_rank against the per-query NumPy reference, chunked evaluate_features, errors,
a hand-computed example, and extract_features."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from reid_core.evaluation import (chunk_plan, evaluate_features, evaluate_rank, evaluate_rank_reference,
                                  extract_features, query_gallery_distances)
from reid_core.evaluation.rank import BYTES_PER_PAIR


def _problem(seed: int, num_q: int = 40, num_g: int = 250, ids: int = 15, cams: int = 3, ties: bool = False):
    """Random labels with junk (same id and camera), queries without a match and distractor gallery ids."""
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, ids + 3, num_q)  # ids, ..., ids + 2 have no gallery entry: skipped queries
    g_pids = rng.integers(0, ids + 5, num_g)
    g_pids = np.where(g_pids >= ids, g_pids + 3, g_pids)  # ids + 3, ... are gallery-only distractors
    q_cams = rng.integers(0, cams, num_q)
    g_cams = rng.integers(0, cams, num_g)
    dist = rng.integers(0, 6, (num_q, num_g)).astype(np.float64) if ties else rng.random((num_q, num_g))
    return dist, q_pids, g_pids, q_cams, g_cams


def _assert_same(result: dict, expected: dict, tol: float = 1e-9) -> None:
    assert result["num_valid"] == expected["num_valid"]
    assert result["mAP"] == pytest.approx(expected["mAP"], abs=tol)
    assert result["mINP"] == pytest.approx(expected["mINP"], abs=tol)
    assert result["cmc"].shape == expected["cmc"].shape
    np.testing.assert_allclose(result["cmc"], expected["cmc"], rtol=0, atol=tol)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_agrees_with_reference_on_random_problems(seed, ties):
    dist, q_pids, g_pids, q_cams, g_cams = _problem(seed, ties=ties)
    expected = evaluate_rank_reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank=30)
    assert 0 < expected["num_valid"] < len(q_pids)  # the problem does skip some queries
    _assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=30), expected)
    dist32 = dist.astype(np.float32)
    expected32 = evaluate_rank_reference(dist32, q_pids, g_pids, q_cams, g_cams, max_rank=30)
    _assert_same(evaluate_rank(torch.from_numpy(dist32), torch.from_numpy(q_pids), torch.from_numpy(g_pids),
                               torch.from_numpy(q_cams), torch.from_numpy(g_cams), max_rank=30), expected32)


def test_agrees_with_reference_on_crafted_ties():
    dist, q_pids, g_pids, q_cams, g_cams = _problem(11, num_q=30, num_g=200, ids=8)
    rng = np.random.default_rng(0)
    for q in range(len(q_pids)):
        same = g_pids == q_pids[q]
        matches = np.flatnonzero(same & (g_cams != q_cams[q]))
        junk = np.flatnonzero(same & (g_cams == q_cams[q]))
        others = np.flatnonzero(~same)
        if len(matches) >= 3:
            dist[q, matches[:3]] = dist[q, matches[0]]  # matches tied among themselves
        if len(matches) and len(junk):
            dist[q, junk] = dist[q, matches[-1]]  # junk tied with a match
        if len(matches) and q % 2:
            dist[q, rng.choice(others, 3)] = dist[q, matches[0]]  # non-matches tied with a match
    expected = evaluate_rank_reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    _assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10), expected)


@pytest.mark.parametrize("scale", [1e-30, -1.0, 1e30])
def test_agrees_with_reference_at_extreme_scales(scale):
    dist, q_pids, g_pids, q_cams, g_cams = _problem(3)
    dist = dist * scale
    expected = evaluate_rank_reference(dist, q_pids, g_pids, q_cams, g_cams)
    _assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams), expected)


def test_hand_computed_example():
    # Query: identity 1, camera 0. Gallery (index: distance, identity, camera):
    #   0: 0.2, id 1, cam 1  -> true match
    #   1: 0.2, id 2, cam 1  -> non-match, tied with entry 0 but after it in gallery order
    #   2: 0.05, id 1, cam 0 -> junk (same identity and camera): removed
    #   3: 0.1, id 3, cam 0  -> non-match
    # Ranking of the kept entries: 3 (rank 1), 0 (rank 2, match), 1 (rank 3).
    # AP = precision at the only match = 1/2; CMC@1 = 0, CMC@k>=2 = 1; mINP = 1 match / rank 2 = 1/2.
    result = evaluate_rank(np.array([[0.2, 0.2, 0.05, 0.1]]), [1], [1, 2, 1, 3], [0], [1, 1, 0, 0], max_rank=4)
    assert result["mAP"] == pytest.approx(0.5)
    assert result["mINP"] == pytest.approx(0.5)
    np.testing.assert_allclose(result["cmc"], [0.0, 1.0, 1.0, 1.0])
    assert result["num_valid"] == 1


def test_hand_computed_example_two_matches():
    # Query id 1, cam 0. Gallery: 0: 0.3 id 1 cam 1 (match), 1: 0.1 id 2 (non-match),
    # 2: 0.2 id 1 cam 0 (junk), 3: 0.2 id 1 cam 2 (match). Kept ranking: 1, 3 (match), 0 (match).
    # AP = (1/2 + 2/3) / 2 = 7/12; CMC@1 = 0, CMC@2 = 1; mINP = 2 matches / rank 3 = 2/3.
    result = evaluate_rank(np.array([[0.3, 0.1, 0.2, 0.2]]), [1], [1, 2, 1, 1], [0], [1, 0, 0, 2], max_rank=3)
    assert result["mAP"] == pytest.approx(7 / 12)
    assert result["mINP"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(result["cmc"], [0.0, 1.0, 1.0])


def test_many_chunks_over_worker_threads(monkeypatch):
    import reid_core.evaluation.rank as rank

    dist, q_pids, g_pids, q_cams, g_cams = _problem(7, num_q=60, ties=True)
    expected = evaluate_rank_reference(dist, q_pids, g_pids, q_cams, g_cams)
    threads = torch.get_num_threads()
    monkeypatch.setattr(rank, "CPU_CHUNK_PAIRS", 3 * dist.shape[1])  # 3 queries per chunk
    _assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams), expected)
    assert torch.get_num_threads() == threads  # intra-op threads restored


def test_feature_blocks_split_into_rank_chunks(monkeypatch):
    import reid_core.evaluation.rank as rank

    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = _features(4, num_q=50)
    expected = evaluate_rank(query_gallery_distances(q_feats, g_feats), q_pids, g_pids, q_cams, g_cams)
    monkeypatch.setattr(rank, "CPU_CHUNK_PAIRS", 4 * g_feats.shape[0])  # ranked 4 queries at a time
    monkeypatch.setattr(rank, "GEMM_BLOCK_ROWS", 12)  # distances for 12 at a time
    assert rank.chunk_plan(g_feats.shape[0], 4, torch.device("cpu"), block_rows=12) == (12, 4)
    _assert_same(evaluate_features(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams), expected, tol=1e-12)


def test_chunk_plan_respects_the_memory_budget():
    gallery, budget = 138_517, 1024
    block, rows = chunk_plan(gallery, 4, torch.device("cpu"), memory_budget_mb=budget, block_rows=256)
    assert rows == (1 << 21) // gallery and block % rows == 0 and rows < block <= 256
    used = block * gallery * 4 + rows * gallery * (4 + BYTES_PER_PAIR)
    assert used <= budget * 2**20
    block, rows = chunk_plan(gallery, 4, torch.device("cuda"), memory_budget_mb=budget, block_rows=256)
    assert rows == budget * 2**20 // (gallery * (8 + BYTES_PER_PAIR)) and block == rows  # no room left
    assert chunk_plan(gallery, 4, torch.device("cpu"), memory_budget_mb=1, block_rows=256) == (1, 1)
    assert chunk_plan(gallery, 4, torch.device("cpu"), chunk_size=7) == (7, 7)


def test_cmc_beyond_the_gallery_size_stays_at_its_last_value():
    dist, q_pids, g_pids, q_cams, g_cams = _problem(5, num_q=10, num_g=12, ids=3)
    expected = evaluate_rank_reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    result = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    _assert_same(result, expected)
    assert result["cmc"][-1] == 1.0


def _features(seed: int, num_q: int = 30, num_g: int = 200, dim: int = 16, ids: int = 12):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(ids, dim, generator=gen)
    q_pids = torch.randint(0, ids + 2, (num_q,), generator=gen)
    g_pids = torch.randint(0, ids + 4, (num_g,), generator=gen)
    q_feats = centers[q_pids % ids] + 0.8 * torch.randn(num_q, dim, generator=gen)
    g_feats = torch.cat([centers, torch.randn(4, dim)])[g_pids] + 0.8 * torch.randn(num_g, dim, generator=gen)
    q_cams = torch.randint(0, 3, (num_q,), generator=gen)
    g_cams = torch.randint(0, 3, (num_g,), generator=gen)
    return q_feats, g_feats, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunk_size", [1, 7, 0])
def test_chunked_features_equal_full_matrix(metric, chunk_size):
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = _features(0)
    full = query_gallery_distances(q_feats, g_feats, metric)
    expected = evaluate_rank(full, q_pids, g_pids, q_cams, g_cams)
    assert 0.05 < expected["mAP"] < 0.99  # neither trivial nor hopeless
    result = evaluate_features(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, metric=metric,
                               chunk_size=chunk_size)
    _assert_same(result, expected, tol=1e-12)
    tiny_budget = evaluate_features(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, metric=metric,
                                    memory_budget_mb=0.01)  # one query per chunk
    _assert_same(tiny_budget, expected, tol=1e-12)
    _assert_same(evaluate_rank_reference(full.numpy(), q_pids.numpy(), g_pids.numpy(), q_cams.numpy(),
                                         g_cams.numpy()), expected)


def test_distances_match_their_definitions():
    q_feats, g_feats, *_ = _features(1, num_q=5, num_g=9)
    q64, g64 = q_feats.double(), g_feats.double()
    euclid = query_gallery_distances(q64, g64, "euclidean")
    torch.testing.assert_close(euclid, torch.cdist(q64, g64), rtol=1e-9, atol=1e-9)
    cosine = query_gallery_distances(q64, g64, "cosine")
    expected = -torch.nn.functional.normalize(q64, dim=1) @ torch.nn.functional.normalize(g64, dim=1).T
    torch.testing.assert_close(cosine, expected)


def test_numpy_and_torch_inputs_agree():
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = _features(2)
    from_torch = evaluate_features(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams)
    from_numpy = evaluate_features(q_feats.numpy(), g_feats.numpy(), q_pids.numpy(), g_pids.numpy(),
                                   q_cams.numpy(), g_cams.numpy())
    _assert_same(from_numpy, from_torch, tol=0)
    from_lists = evaluate_features(q_feats.tolist(), g_feats.tolist(), q_pids.tolist(), g_pids.tolist(),
                                   q_cams.tolist(), g_cams.tolist())  # float64 features from lists
    _assert_same(from_lists, from_torch, tol=1e-9)


def test_bad_inputs_name_the_argument():
    dist, q_pids, g_pids, q_cams, g_cams = _problem(0, num_q=5, num_g=8)
    with pytest.raises(ValueError, match="q_pids"):
        evaluate_rank(dist, q_pids[:4], g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match="g_camids"):
        evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams[:-1])
    with pytest.raises(ValueError, match="distmat must be 2-D"):
        evaluate_rank(dist[0], q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match="g_pids must hold integers"):
        evaluate_rank(dist, q_pids, g_pids.astype(float), q_cams, g_cams)
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=0)
    bad = dist.copy()
    bad[0, 0] = np.nan
    all_valid_q = np.zeros(5, dtype=int)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(bad, all_valid_q, np.zeros(8, dtype=int), np.zeros(5, dtype=int), np.ones(8, dtype=int))
    q_feats, g_feats, fq, fg, fqc, fgc = _features(0, num_q=4, num_g=6)
    with pytest.raises(ValueError, match="feature dims differ"):
        evaluate_features(q_feats, g_feats[:, :3], fq, fg, fqc, fgc)
    with pytest.raises(ValueError, match="metric"):
        evaluate_features(q_feats, g_feats, fq, fg, fqc, fgc, metric="manhattan")
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_features(q_feats, g_feats, fq, fg, fqc, fgc, chunk_size=-1)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        evaluate_features(q_feats, g_feats, fq, fg, fqc, fgc, memory_budget_mb=0)
    with pytest.raises(ValueError, match="features too large"):
        evaluate_features(q_feats * 1e19, g_feats, fq, fg, fqc, fgc)
    with pytest.raises(ValueError, match="q_feats contains NaN"):
        evaluate_features(q_feats.clone().fill_(float("nan")), g_feats, fq, fg, fqc, fgc)


def test_no_query_with_a_match_is_an_error():
    dist = np.random.default_rng(0).random((3, 4))
    # Identity 1 appears in the gallery only under the query's own camera: everything is junk.
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_rank(dist, [1, 1, 2], [1, 1, 3, 3], [0, 0, 0], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_rank_reference(dist, [1, 1, 2], [1, 1, 3, 3], [0, 0, 0], [0, 0, 1, 1])


# ---- extract_features -------------------------------------------------------------------------------

class _TinyEncoder(nn.Module):
    """Not flip-invariant (a linear map of the flattened image), with a BatchNorm to catch train mode."""

    def __init__(self, use_bn_feature: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * 4 * 2, 5)
        self.norm = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.norm(self.linear(x.flatten(1)))


class _WithTestFeatures(_TinyEncoder):
    def test_features(self, x):
        return self.linear(x.flatten(1)) * 2


def _loader():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, 4, 2, generator=gen)
    pids = torch.tensor([3, 3, 5, 5, 8, 8, 9])
    camids = torch.tensor([0, 1, 0, 1, 0, 1, 2])
    return [(images[i:i + 3], pids[i:i + 3], camids[i:i + 3]) for i in range(0, 7, 3)], images, pids, camids


def test_extract_features_uses_test_features_and_restores_mode():
    batches, images, pids, camids = _loader()
    model = _WithTestFeatures().train()
    feats, got_pids, got_cams = extract_features(model, batches, "cpu", progress=False)
    with torch.no_grad():
        expected = model.linear(images.flatten(1)) * 2
    torch.testing.assert_close(feats, expected)
    assert feats.dtype == torch.float32 and not feats.requires_grad
    assert torch.equal(got_pids, pids) and torch.equal(got_cams, camids)
    assert model.training  # restored


def test_extract_features_forward_in_eval_mode_with_flip():
    batches, images, _, _ = _loader()
    model = _TinyEncoder().eval()
    mean_before = model.norm.running_mean.clone()
    feats, _, _ = extract_features(model, batches, torch.device("cpu"), flip=True, progress=False)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(3))) / 2
        plain = model(images)
    torch.testing.assert_close(feats, expected)
    assert not torch.allclose(feats, plain)  # the mirror image does change the feature
    assert torch.equal(model.norm.running_mean, mean_before)  # BatchNorm ran in eval mode
    assert not model.training


def test_extract_features_rejects_bad_batches():
    model = _TinyEncoder()
    with pytest.raises(ValueError, match=r"\(images, pids, camids\)"):
        extract_features(model, [torch.zeros(2, 3, 4, 2)], "cpu", progress=False)
    with pytest.raises(ValueError, match="no batch"):
        extract_features(model, [], "cpu", progress=False)
    assert model.training
