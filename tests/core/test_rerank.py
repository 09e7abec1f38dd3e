"""k-reciprocal re-ranking and average query expansion (reid_core/evaluation/rerank.py, query_expansion.py)
against the dense reference of benchmarks/rerank_reference.py and a per-row query-expansion reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.rerank_reference import re_ranking_dense
from reid_core.config import Config, ConfigError
from reid_core.evaluation import (average_query_expansion, evaluate_features, evaluate_rank, query_gallery_distances,
                                  re_ranking)
from reid_core.evaluation import rerank as rerank_module


def _distances(x: np.ndarray, num_q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q_g, q_q, g_g) euclidean distances of the rows of ``x`` (queries first)."""
    full = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    return full[:num_q, num_q:], full[:num_q, :num_q], full[num_q:, num_q:]


def _labels(rng: np.random.Generator, num_q: int, num_g: int, ids: int = 12, cams: int = 3):
    """Labels with junk (same id and camera), queries without a true match and gallery-only identities."""
    q_pids = rng.integers(0, ids + 2, num_q)  # ids, ids + 1: no gallery entry
    g_pids = rng.integers(0, ids, num_g)
    g_pids = np.where(rng.random(num_g) < 0.2, g_pids + ids + 2, g_pids)  # distractors
    return q_pids, g_pids, rng.integers(0, cams, num_q), rng.integers(0, cams, num_g)


@pytest.mark.parametrize("num_q, num_g, dim, k1, k2, lam", [
    (25, 160, 8, 20, 6, 0.3),
    (40, 200, 16, 5, 1, 0.5),  # round(5 / 2) = 2 (half to even), no local query expansion
    (12, 90, 4, 7, 3, 0.0),
    (3, 12, 2, 20, 6, 1.0),  # k1 + 1 beyond the number of images
])
def test_agrees_with_dense_reference(num_q, num_g, dim, k1, k2, lam):
    rng = np.random.default_rng(num_q)
    x = rng.standard_normal((num_q + num_g, dim)).astype(np.float32)
    dists = _distances(x, num_q)
    expected = re_ranking_dense(*dists, k1=k1, k2=k2, lambda_value=lam)
    got = re_ranking(*dists, k1=k1, k2=k2, lambda_value=lam)
    assert isinstance(got, np.ndarray) and got.shape == (num_q, num_g) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_dense_reference_on_ties(seed):
    # Features on a 3-valued grid: many exactly equal distances, duplicates (distance 0) included.
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(5, 30)), int(rng.integers(40, 120))
    x = rng.integers(0, 3, (num_q + num_g, 3)).astype(np.float64)
    dists = _distances(x, num_q)
    k1, k2 = int(rng.integers(2, 21)), int(rng.integers(1, 8))
    expected = re_ranking_dense(*dists, k1=k1, k2=k2)
    got = re_ranking(*(torch.from_numpy(d) for d in dists), k1=k1, k2=k2)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)


def test_small_steps_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((150, 6)).astype(np.float32)
    dists = _distances(x, 30)
    whole = re_ranking(*dists)
    monkeypatch.setattr(rerank_module, "CONTRIBUTIONS_PER_STEP", 7)
    monkeypatch.setattr(rerank_module, "ROWS_PAIRS", 1)
    np.testing.assert_array_equal(re_ranking(*dists, memory_budget_mb=0.01), whole)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_features_rerank_matches_dense_metrics(metric, monkeypatch):
    rng = np.random.default_rng(3)
    num_q, num_g, ids = 40, 260, 12
    q_pids, g_pids, q_cams, g_cams = _labels(rng, num_q, num_g, ids)
    centers = rng.standard_normal((2 * ids + 2, 16))
    q = torch.from_numpy(centers[q_pids] + 0.9 * rng.standard_normal((num_q, 16))).float()
    g = torch.from_numpy(centers[g_pids] + 0.9 * rng.standard_normal((num_g, 16))).float()
    unit = (lambda t: F.normalize(t, dim=1)) if metric == "cosine" else (lambda t: t)
    dists = [query_gallery_distances(a, b).numpy() for a, b in ((unit(q), unit(g)), (unit(q), unit(q)), (unit(g), unit(g)))]
    labels = (q_pids, g_pids, q_cams, g_cams)
    expected = evaluate_rank(re_ranking_dense(*dists), *labels)
    plain = evaluate_features(q, g, *labels, metric=metric)
    got = evaluate_features(q, g, *labels, metric=metric, rerank=True)
    assert 0 < got["num_valid"] < num_q  # junk and queries without a match are in the problem
    assert got["mAP"] != plain["mAP"]
    for key in ("mAP", "mINP"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6)
    np.testing.assert_allclose(got["cmc"], expected["cmc"], rtol=0, atol=1e-6)
    # Many small chunks of queries and of neighbour rows: the same numbers.
    monkeypatch.setattr(rerank_module, "ROWS_PAIRS", 1)
    small = evaluate_features(q, g, *labels, metric=metric, rerank=True, chunk_size=3)
    assert small["mAP"] == pytest.approx(got["mAP"], abs=1e-12)


def _query_expansion_reference(q: np.ndarray, g: np.ndarray, k: int, alpha: float):
    feats = np.concatenate([q, g])
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    out = np.empty_like(feats)
    for i in range(len(feats)):
        sim = unit @ unit[i]
        nearest = np.argsort(-sim, kind="stable")[:k]
        weight = np.maximum(sim[nearest], 0.0) ** alpha
        out[i] = np.mean(feats[nearest] * weight[:, None], axis=0)
    return out[:len(q)], out[len(q):]


@pytest.mark.parametrize("k, alpha", [(10, 3.0), (1, 0.0), (4, 1.5)])
def test_query_expansion_matches_reference(k, alpha):
    rng = np.random.default_rng(k)
    q, g = rng.standard_normal((15, 8)), rng.standard_normal((70, 8))
    q[1] = g[5]  # an exact duplicate: a tie in similarity
    expected = _query_expansion_reference(q, g, k, alpha)
    got = average_query_expansion(torch.from_numpy(q), torch.from_numpy(g), k, alpha, memory_budget_mb=0.001)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-10, atol=1e-12)


def test_evaluate_features_with_query_expansion_uses_the_expanded_features():
    rng = np.random.default_rng(5)
    q_pids, g_pids, q_cams, g_cams = _labels(rng, 30, 150)
    q, g = torch.randn(30, 8, dtype=torch.float64), torch.randn(150, 8, dtype=torch.float64)
    qe, ge = average_query_expansion(q, g, 5, 2.0)
    expected = evaluate_features(qe, ge, q_pids, g_pids, q_cams, g_cams, metric="cosine")
    got = evaluate_features(q, g, q_pids, g_pids, q_cams, g_cams, metric="cosine", query_expansion=True, qe_k=5,
                            qe_alpha=2.0)
    assert got["mAP"] == expected["mAP"]


def test_bad_arguments_are_named():
    d = _distances(np.random.default_rng(0).standard_normal((20, 3)), 5)
    for kwargs, word in (({"k1": 0}, "k1"), ({"k2": 1.5}, "k2"), ({"lambda_value": 1.2}, "lambda_value")):
        with pytest.raises(ValueError, match=word):
            re_ranking(*d, **kwargs)
    with pytest.raises(ValueError, match="g_g_dist"):
        re_ranking(d[0], d[1], d[2][:-1])
    with pytest.raises(ValueError, match="q_q_dist"):
        re_ranking(d[0], np.full_like(d[1], np.nan), d[2])
    with pytest.raises(ValueError, match="all zero"):
        re_ranking(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3)))
    q, g = torch.randn(4, 3), torch.randn(9, 3)
    labels = (np.arange(4), np.arange(9) % 4, np.zeros(4, int), np.ones(9, int))
    with pytest.raises(ValueError, match="k1"):
        evaluate_features(q, g, *labels, rerank=True, k1=-1)
    with pytest.raises(ValueError, match="query expansion k"):
        evaluate_features(q, g, *labels, query_expansion=True, qe_k=0)


@pytest.mark.parametrize("overrides, name", [
    ({"eval.rerank_k1": 0}, "eval.rerank_k1"),
    ({"eval.rerank_k2": -2}, "eval.rerank_k2"),
    ({"eval.rerank_lambda": 1.5}, "eval.rerank_lambda"),
    ({"eval.qe_k": 0}, "eval.qe_k"),
    ({"eval.qe_alpha": -1.0}, "eval.qe_alpha"),
    ({"eval.rerank": "yes"}, "eval.rerank"),
    ({"eval.rerank_k3": 4}, "eval.rerank_k3"),
])
def test_config_rejects_bad_rerank_settings_by_name(overrides, name):
    with pytest.raises(ConfigError, match=name):
        Config().replace(overrides)


def test_market_recipe_re_ranks_as_the_authors_did():
    configs = Path(__file__).parents[2] / "configs"
    e = Config.from_yaml(configs / "market1501_moreid_he.yaml").eval
    assert (e.rerank, e.rerank_k1, e.rerank_k2, e.rerank_lambda) == (True, 20, 6, 0.3)
    # The authors' baseline config does not re-rank.
    assert not Config.from_yaml(configs / "market1501_baseline_triplet.yaml").eval.rerank


def test_trainer_reports_rerank_metrics_beside_the_plain_ones(tmp_path):
    from reid_core.data import synthetic
    from reid_core.engine.trainer import Trainer

    root = synthetic.generate(tmp_path / "data", "market1501", ids=12, cams=3, images_per_id_cam=3, height=64,
                              width=32, seed=0)
    base = {"data.dataset": "synthetic", "data.root": str(root), "data.height": 64, "data.width": 32,
            "data.batch_size": 16, "data.num_instance": 4, "data.workers": 0, "model.arch": "resnet18",
            "train.device": "cpu", "train.output_dir": str(tmp_path / "run"), "eval.batch_size": 64}
    trainer = Trainer(Config().replace({**base, "eval.rerank_k1": 6, "eval.rerank_k2": 3}))
    a = trainer.evaluate()
    trainer.cfg.eval.rerank = True
    b = trainer.evaluate()
    trainer.close()
    assert not any(key.endswith("_rerank") for key in a)
    for key in ("mAP", "R1", "R5", "R10", "mINP"):
        assert b[key] == a[key]  # the plain metrics are unchanged
        assert 0.0 <= b[f"{key}_rerank"] <= 100.0
    assert b["mAP_rerank"] != b["mAP"] and len(b["cmc_rerank"]) == len(b["cmc"])
