"""Metric losses, distances and the classification loss (docs/design.md, "The losses")."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reid_core.config import LossConfig
from reid_core.losses import (LOSSES, HardDistanceElasticLoss, TripletLoss, build_loss, cross_entropy_ls,
                              pairwise_distance)
from reid_core.losses import reference

CASES = [
    ("triplet", {"margin": 0.3}),
    ("triplet", {"margin": 0.0}),
    ("triplet", {"margin": 0.0, "mining": "weighted"}),
    ("triplet", {"margin": 0.3, "mining": "weighted"}),
    ("npair", {"k": 1}),
    ("npair", {"k": 5}),
    ("npair", {"k": 60}),  # more than any anchor has: uses those available
    ("ranked_list", {}),
    ("ranked_list", {"alpha": 1.0, "beta": 0.5, "tn": 0.0, "imbalance": 0.3}),
    ("ranked_list", {"tn": 40.0, "imbalance": 1.0}),
    ("he", {}),
    ("he", {"margin": 0.3}),
    ("he", {"scale": 2.5, "norm": "elastic"}),
    ("he", {"margin": 0.1, "norm": "positives"}),
]


def random_problem(seed: int, b: int = 10, m: int = 48, ids: int = 4):
    """Distances in [0, 2] with identity masks, some references masked out (neither), one anchor
    without positives and one without negatives."""
    g = torch.Generator().manual_seed(seed)
    dist = torch.rand(b, m, generator=g, dtype=torch.float64) * 2
    anchor_ids = torch.randint(0, ids, (b,), generator=g)
    ref_ids = torch.randint(0, ids, (m,), generator=g)
    pos = anchor_ids[:, None] == ref_ids[None, :]
    neg = ~pos
    hidden = torch.rand(b, m, generator=g) < 0.15
    pos &= ~hidden
    neg &= ~hidden
    pos[0] = False
    neg[1] = False
    return dist, pos, neg


def run(loss_fn, dist, pos, neg, weights=None):
    leaf = dist.clone().requires_grad_(True)
    out = loss_fn(leaf, pos, neg)
    (out * (weights if weights is not None else 1)).sum().backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_loss_matches_the_per_anchor_reference(name, params, seed):
    dist, pos, neg = random_problem(seed)
    weights = torch.rand(dist.shape[0], dtype=dist.dtype, generator=torch.Generator().manual_seed(seed))
    loss = build_loss(name, **params)
    value, grad = run(loss, dist, pos, neg, weights)
    ref_value, ref_grad = run(lambda d, p, n: reference.REFERENCES[name](d, p, n, **params), dist, pos, neg, weights)
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9)
    assert value.shape == (dist.shape[0],)


@pytest.mark.parametrize("name", list(LOSSES))
def test_anchors_without_positive_or_negative_give_zero_and_are_counted(name):
    dist, pos, neg = random_problem(3)
    loss = build_loss(name)
    value, grad = run(loss, dist, pos, neg)
    assert value[0] == 0 and value[1] == 0
    assert torch.all(grad[:2] == 0)
    stats = loss.stats
    assert stats["valid"] == dist.shape[0] - 2
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("name,params", CASES)
def test_masked_out_distances_change_nothing(name, params):
    dist, pos, neg = random_problem(4)
    hidden = ~(pos | neg)
    assert hidden.sum() > 10
    loss = build_loss(name, **params)
    value, grad = run(loss, dist, pos, neg)
    for fill in (0.0, 5.0):
        changed = torch.where(hidden, fill, dist)
        value2, grad2 = run(loss, changed, pos, neg)
        torch.testing.assert_close(value2, value, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad2, grad, rtol=0, atol=1e-12)
        assert torch.all(grad2[hidden] == 0)


def separated_problem(seed: int, b: int = 6, m: int = 40):
    """Positives at distance 0.1-0.4, negatives at 1.0-1.6: every anchor's hardest positive is far
    closer than its hardest negative."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(b, m, generator=g) < 0.3
    pos[:, 0] = True
    neg = ~pos
    dist = torch.where(pos, 0.1 + 0.3 * torch.rand(b, m, generator=g, dtype=torch.float64),
                       1.0 + 0.6 * torch.rand(b, m, generator=g, dtype=torch.float64))
    return dist, pos, neg


def test_he_equals_hinge_triplet_with_margin_0_when_each_anchor_has_one_positive():
    dist, pos, neg = random_problem(8)
    one = torch.zeros_like(pos)
    first = torch.where(pos.any(1), pos.float().argmax(1), 0)
    one[torch.arange(len(first)), first] = pos[torch.arange(len(first)), first]  # keep one positive per anchor
    dist = torch.where(one & (torch.arange(len(dist)) % 2 == 0)[:, None], 0.01, dist)  # half of them easy

    def hinge_triplet(d, p, n):
        d_p, d_n = torch.where(p, d, -math.inf).amax(1), torch.where(n, d, math.inf).amin(1)
        return torch.where(p.any(1) & n.any(1), torch.relu(d_p - d_n), 0.0)

    he_value, he_grad = run(HardDistanceElasticLoss(), dist, one, neg)
    tr_value, tr_grad = run(hinge_triplet, dist, one, neg)
    torch.testing.assert_close(he_value, tr_value)
    torch.testing.assert_close(he_grad, tr_grad)
    assert he_value[2:].gt(0).any() and he_value[2:].eq(0).any()  # both sides of the hinge are exercised


def test_he_closed_form_by_hand_elastic_count_and_subgradient():
    # Positives 0.2, 0.7, 0.95 against negatives 0.8, 0.9, 1.05, 1.5 (sorted far-to-near / near-to-far):
    # pairs (0.95, 0.8) and (0.7, 0.9), (0.2, 1.05): only the first violates. Elastic count 1, L = 0.15.
    dist = torch.tensor([[0.2, 0.7, 0.95, 0.8, 0.9, 1.05, 1.5]], dtype=torch.float64)
    pos = torch.tensor([[True, True, True, False, False, False, False]])
    he = HardDistanceElasticLoss()
    value, grad = run(he, dist, pos, ~pos)
    assert value.item() == pytest.approx(0.15)
    torch.testing.assert_close(grad, torch.tensor([[0, 0, 1, -1, 0, 0, 0]], dtype=torch.float64))
    assert he.stats == {"hard_pos": 1.0, "hard_neg": 1.0, "valid": 1.0}
    # a margin of 0.3 inside each pair makes the second pair violate too: (0.95-0.8+0.3) + (0.7-0.9+0.3)
    wide = HardDistanceElasticLoss(margin=0.3)
    value, grad = run(wide, dist, pos, ~pos)
    assert value.item() == pytest.approx(0.45 + 0.1)
    torch.testing.assert_close(grad, torch.tensor([[0, 1, 1, -1, -1, 0, 0]], dtype=torch.float64))
    assert wide.stats["hard_pos"] == 2.0
    # normalisations: by the elastic count (2) and by the positive count (3); scale multiplies
    for norm, denom in (("elastic", 2), ("positives", 3)):
        value, _ = run(HardDistanceElasticLoss(margin=0.3, scale=4.0, norm=norm), dist, pos, ~pos)
        assert value.item() == pytest.approx(4.0 * 0.55 / denom)


def test_he_matches_brute_force_with_ties():
    # distances on a grid of 0.25: many exact ties within and across the positive and negative sets
    for seed in range(4):
        dist, pos, neg = random_problem(seed, b=12, m=30)
        dist = (dist * 4).round() / 4
        for params in ({}, {"margin": 0.25}, {"margin": 0.5, "norm": "elastic"}):
            value, grad = run(build_loss("he", **params), dist, pos, neg)
            torch.testing.assert_close(value, reference.he(dist, pos, neg, **params), rtol=0, atol=1e-12)
            # whichever tied sample receives it, each pair moves its positive by +1 and its negative by -1
            torch.testing.assert_close(grad.sum(1), torch.zeros(len(grad), dtype=grad.dtype), rtol=0, atol=1e-12)
            assert torch.all(grad[pos] >= 0) and torch.all(grad[neg] <= 0)
            assert torch.all(grad[~(pos | neg)] == 0)


def test_he_elastic_count_rises_when_the_dictionary_holds_more_violators():
    g = torch.Generator().manual_seed(0)
    b = 8
    batch = torch.cat([0.3 + 0.2 * torch.rand(b, 4, generator=g), 1.2 + 0.3 * torch.rand(b, 12, generator=g)], 1)
    pos = torch.zeros(b, 16, dtype=torch.bool)
    pos[:, :4] = True
    counts = []
    for violators in (0, 1, 2, 3, 40):
        # dictionary keys: a number of violators (closer than every positive), the rest far away
        past = torch.full((b, 100), 1.8)
        past[:, :violators] = 0.05 + 0.2 * torch.rand(b, violators, generator=g)
        dist = torch.cat([batch, past], 1)
        p = torch.cat([pos, torch.zeros(b, 100, dtype=torch.bool)], 1)
        n = torch.cat([~pos, torch.ones(b, 100, dtype=torch.bool)], 1)
        he = HardDistanceElasticLoss()
        _, grad = run(he, dist, p, n)
        counts.append(he.stats["hard_neg"])
        assert he.stats["hard_pos"] == he.stats["hard_neg"]
        assert torch.count_nonzero(grad[:, :4] > 0) == b * min(violators, 4)  # hard positives: +1 each
    assert counts == [0.0, 1.0, 2.0, 3.0, 4.0]  # bounded by the 4 positives


def test_npair_uses_exactly_the_k_hardest_negatives_and_the_hardest_positive():
    g = torch.Generator().manual_seed(1)
    b, m, k = 5, 60, 7
    dist = torch.rand(b, m, generator=g, dtype=torch.float64) * 2
    pos = torch.rand(b, m, generator=g) < 0.2
    pos[:, 0] = True
    neg = ~pos
    value, grad = run(build_loss("npair", k=k), dist, pos, neg)
    for i in range(b):
        d_neg = torch.where(neg[i], dist[i], math.inf)
        hardest_neg = set(torch.topk(d_neg, k, largest=False).indices.tolist())
        hardest_pos = int(torch.where(pos[i], dist[i], -math.inf).argmax())
        assert set(torch.nonzero(grad[i]).flatten().tolist()) == hardest_neg | {hardest_pos}
        assert torch.all(grad[i, list(hardest_neg)] < 0) and grad[i, hardest_pos] > 0
        d_p = dist[i, hardest_pos]
        expected = torch.log(1 + torch.exp(d_p - dist[i, list(hardest_neg)]).sum())
        assert value[i].item() == pytest.approx(expected.item())


def test_npair_with_fewer_negatives_than_k_uses_those_available():
    dist = torch.tensor([[0.5, 0.4, 1.0, 1.2]], dtype=torch.float64)
    pos = torch.tensor([[True, True, False, False]])
    loss = build_loss("npair", k=15)
    value, grad = run(loss, dist, pos, ~pos)
    assert value.item() == pytest.approx(math.log(1 + math.exp(0.5 - 1.0) + math.exp(0.5 - 1.2)))
    assert loss.stats["hard_neg"] == 2.0 and loss.stats["hard_pos"] == 1.0
    assert grad[0, 1] == 0


def test_ranked_list_thresholds_and_weights_by_hand():
    # alpha 1.2, beta 0.4: hard positives d > 0.8, hard negatives d < 1.2, w = exp(10 (1.2 - d)).
    dist = torch.tensor([[0.5, 0.9, 1.0, 1.0, 1.1, 1.3]], dtype=torch.float64)
    pos = torch.tensor([[True, True, True, False, False, False]])
    loss = build_loss("ranked_list", alpha=1.2, beta=0.4, tn=10.0, imbalance=0.5)
    value, grad = run(loss, dist, pos, ~pos)
    l_p = ((0.9 - 0.8) + (1.0 - 0.8)) / 2
    w1, w2 = math.exp(10 * 0.2), math.exp(10 * 0.1)
    l_n = (w1 * 0.2 + w2 * 0.1) / (w1 + w2)
    assert value.item() == pytest.approx(0.5 * l_p + 0.5 * l_n)
    expected = [0, 0.25, 0.25, -0.5 * w1 / (w1 + w2), -0.5 * w2 / (w1 + w2), 0]
    torch.testing.assert_close(grad[0], torch.tensor(expected, dtype=torch.float64))
    assert loss.stats == {"hard_pos": 2.0, "hard_neg": 2.0, "valid": 1.0}
    # empty hard sets give 0 for their term
    easy = torch.tensor([[0.5, 0.6, 1.5, 1.9]], dtype=torch.float64)
    value, grad = run(loss, easy, torch.tensor([[True, True, False, False]]), torch.tensor([[False, False, True, True]]))
    assert value.item() == 0 and torch.all(grad == 0)


def test_ranked_list_huge_temperature_does_not_overflow():
    dist, pos, neg = random_problem(6)
    value, grad = run(build_loss("ranked_list", tn=1000.0), dist.float(), pos, neg)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


def test_triplet_soft_margin_and_hinge():
    dist = torch.tensor([[0.5, 0.9, 0.7, 1.4]])
    pos = torch.tensor([[True, True, False, False]])
    hinge, _ = run(build_loss("triplet", margin=0.3), dist, pos, ~pos)
    soft, _ = run(build_loss("triplet", margin=0.0), dist, pos, ~pos)
    assert hinge.item() == pytest.approx(0.9 - 0.7 + 0.3)
    assert soft.item() == pytest.approx(math.log1p(math.exp(0.9 - 0.7)))


def test_float32_large_problem_matches_float64():
    dist, pos, neg = random_problem(7, b=16, m=3000, ids=40)
    for name, params in CASES:
        loss = build_loss(name, **params)
        v32, g32 = run(loss, dist.float(), pos, neg)
        v64, g64 = run(loss, dist, pos, neg)
        torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-6)


def test_build_loss_from_config_and_bad_input():
    for name in LOSSES:
        assert isinstance(build_loss(name, **LossConfig(name=name).params()), torch.nn.Module)
    with pytest.raises(ValueError, match="'contrastive'"):
        build_loss("contrastive")
    with pytest.raises(ValueError, match="'slack'"):
        build_loss("he", slack=0.1)
    bad = [("triplet", {"margin": -1.0}, "margin"), ("npair", {"k": 0}, "k"), ("npair", {"k": 2.5}, "k"),
           ("ranked_list", {"beta": 1.5}, "beta"), ("ranked_list", {"imbalance": 1.5}, "imbalance"),
           ("he", {"norm": "max"}, "norm"), ("he", {"scale": 0.0}, "scale"), ("he", {"margin": -0.1}, "margin")]
    for name, params, word in bad:
        with pytest.raises(ValueError, match=word):
            build_loss(name, **params)
    loss = build_loss("he")
    dist = torch.rand(3, 5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="pos"):
        loss(dist, mask.float(), mask)
    with pytest.raises(ValueError, match="neg"):
        loss(dist, mask, mask[:, :4])
    with pytest.raises(ValueError, match="dist"):
        loss(dist[0], mask[0], mask[0])


def test_euclidean_distance_values_and_finite_gradient_at_identical_points():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g, dtype=torch.float64)
    y = torch.randn(9, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pairwise_distance(x, y), torch.cdist(x, y))
    assert torch.autograd.gradcheck(lambda a, b: pairwise_distance(a, b), (x.requires_grad_(), y.requires_grad_()))
    same = x.detach().clone().requires_grad_(True)
    dist = pairwise_distance(same, same)
    assert torch.all(dist.diagonal() < 1e-5)
    dist.sum().backward()
    assert torch.isfinite(same.grad).all()
    # the gradient of d(x, x) itself is 0, not NaN or inf, where the expansion cancels exactly (small
    # integers: every product and sum is exact in float32; a random float32 x can leave a rounding residual
    # of ~1e-6 in |x|^2 + |x|^2 - 2 x.x, above the clamp, in about 15 % of draws)
    lone = torch.randint(-3, 4, (1, 16), generator=g).to(torch.float32).requires_grad_(True)
    pairwise_distance(lone, lone.detach()).sum().backward()
    assert torch.all(lone.grad == 0)


def test_cosine_distance_and_normalization():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    y = torch.randn(5, 8, generator=g, dtype=torch.float64)
    expected = -F.cosine_similarity(x[:, None, :], y[None, :, :], dim=2)
    torch.testing.assert_close(pairwise_distance(x, y, "cosine"), expected)
    torch.testing.assert_close(pairwise_distance(3 * x, y, "cosine", normalize=True), expected)
    unit = pairwise_distance(x, y, "euclidean", normalize=True)
    torch.testing.assert_close(unit, torch.cdist(F.normalize(x, dim=1), F.normalize(y, dim=1)))
    torch.testing.assert_close(unit ** 2, 2 + 2 * expected)  # |x̂ - ŷ|² = 2 - 2 x̂ᵀŷ
    with pytest.raises(ValueError, match="'manhattan'"):
        pairwise_distance(x, y, "manhattan")
    with pytest.raises(ValueError, match="dims differ"):
        pairwise_distance(x, y[:, :4])


def test_cross_entropy_with_label_smoothing():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    eps = 0.1
    log_p = logits.log_softmax(1)
    target = torch.full_like(log_p, eps / 5)
    target[torch.arange(6), labels] += 1 - eps
    expected = -(target * log_p).sum(1).mean()
    assert cross_entropy_ls(logits, labels, eps).item() == pytest.approx(expected.item())
    assert cross_entropy_ls(logits, labels, 0.0).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    with pytest.raises(ValueError, match="epsilon"):
        cross_entropy_ls(logits, labels, 1.0)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_ls(logits, labels[:3], 0.1)
