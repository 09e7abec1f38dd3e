"""MoReID and baseline frameworks: dictionary, momentum encoder, reference masks, steps (docs/design.md, "The method")."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reid_core.config import Config
from reid_core.losses import cross_entropy_ls, pairwise_distance
from reid_core.models import ReIDOutput, build_model
from reid_core.models.classifier import CircleClassifier
from reid_core.moreid import Baseline, KeyDictionary, MoReID, build_framework, make_key_encoder, momentum_update


class TinyReID(nn.Module):
    """A small real re-ID model with the ReIDModel interface: conv + BN, pooled feat, BNNeck, classifier."""

    def __init__(self, num_classes: int = 8, dim: int = 6) -> None:
        super().__init__()
        self.feat_dim = dim
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(dim)
        self.bnneck = nn.BatchNorm1d(dim)
        self.classifier = nn.Linear(dim, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> ReIDOutput:
        feat = F.relu(self.bn(self.conv(x))).mean((2, 3))
        bn_feat = self.bnneck(feat)
        return ReIDOutput(feat, bn_feat, self.classifier(bn_feat))


def make_cfg(**overrides) -> Config:
    base = {"model.arch": "resnet18", "framework.dict_size": 12, "data.batch_size": 8, "data.num_instance": 2}
    return Config().replace({**base, **overrides})


def batch(seed: int = 0, b: int = 8, ids: int = 4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 8, 8, generator=g)
    labels = torch.arange(ids).repeat_interleave(b // ids)
    return images, labels


def make_framework(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_framework(make_cfg(**overrides), TinyReID())


# ---- momentum encoder ----------------------------------------------------------------------------

def test_momentum_update_math_for_parameters_and_buffers():
    torch.manual_seed(0)
    query = TinyReID()
    key = make_key_encoder(query)
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
        query.bn.running_mean.add_(1.5)
        query.bn.running_var.mul_(3.0)
        query.bn.num_batches_tracked.fill_(7)
    before_k = copy.deepcopy(key.state_dict())
    momentum_update(key, query, 0.9)
    for name, value in key.state_dict().items():
        q = query.state_dict()[name]
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before_k[name] + 0.1 * q)
        else:
            assert torch.equal(value, q)  # integer buffers are copied
    assert key.bn.num_batches_tracked.item() == 7
    momentum_update(key, query, 0.0)
    for name, value in key.state_dict().items():
        torch.testing.assert_close(value, query.state_dict()[name].to(value.dtype))
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(key, query, 1.5)
    with pytest.raises(ValueError, match="structure"):
        momentum_update(key, nn.Linear(2, 2), 0.9)


def test_key_encoder_has_no_gradient_and_its_forward_keeps_running_stats():
    torch.manual_seed(0)
    query = TinyReID()
    key = make_key_encoder(query)
    assert all(not p.requires_grad for p in key.parameters())
    assert all(p.requires_grad for p in query.parameters())
    images, _ = batch()
    key.train()
    query.train()
    before = copy.deepcopy(key.bn.running_mean)
    out_k = key(images).feat
    out_q = query(images).feat
    torch.testing.assert_close(out_k, out_q)  # batch statistics in train mode, like f_q
    torch.testing.assert_close(key.bn.running_mean, before)  # f_k's own forward leaves them alone
    assert not torch.equal(query.bn.running_mean, before)


# ---- dictionary ---------------------------------------------------------------------------------

def keys_of(values):
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).repeat(1, 2)


def test_dictionary_is_a_fifo_ring_that_wraps_around():
    d = KeyDictionary(5, 2)
    assert d.fill == 0.0 and not d.valid_mask().any()
    d.enqueue(keys_of([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert d.labels.tolist() == [0, 1, 2, -1, -1]
    assert d.valid_mask().tolist() == [True, True, True, False, False]
    assert d.fill == pytest.approx(0.6) and d.ptr.item() == 3
    d.enqueue(keys_of([3, 4, 5, 6]), torch.tensor([3, 4, 5, 6]))
    assert d.labels.tolist() == [5, 6, 2, 3, 4]
    assert d.keys[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert d.fill == 1.0 and d.ptr.item() == 2
    # more keys than slots: the newest 5 stay, oldest first from the pointer on
    d.enqueue(keys_of(range(10, 17)), torch.arange(10, 17))
    assert d.ptr.item() == 2
    assert d.labels.tolist() == [15, 16, 12, 13, 14]
    assert d.keys[:, 1].tolist() == [15, 16, 12, 13, 14]


def test_dictionary_state_and_bad_input():
    d = KeyDictionary(4, 3)
    assert set(d.state_dict()) == {"keys", "labels", "ptr"}
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        d.enqueue(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        d.enqueue(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="size"):
        KeyDictionary(0, 3)


# ---- reference masks ----------------------------------------------------------------------------

def filled_framework(include_past_positives: bool) -> MoReID:
    fw = make_framework(**{"framework.include_past_positives": include_past_positives})
    fw.dictionary.enqueue(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))  # 4 of 12 slots stored
    return fw


@pytest.mark.parametrize("include", [False, True])
def test_moreid_masks_past_positives_and_empty_slots(include):
    fw = filled_framework(include)
    queries, keys = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([0, 0, 1, 3])
    dist, pos, neg = fw.references(queries, keys, labels)
    assert dist.shape == pos.shape == neg.shape == (4, 4 + 12)
    torch.testing.assert_close(dist[:, :4], pairwise_distance(queries, keys))
    torch.testing.assert_close(dist[:, 4:8], pairwise_distance(queries, fw.dictionary.keys[:4]))
    same = labels[:, None] == labels[None, :]
    assert torch.equal(pos[:, :4], same)  # own key included
    assert pos[:, :4].diagonal().all()
    assert torch.equal(neg[:, :4], ~same)
    past = torch.tensor([0, 1, 2, 0])
    same_past = labels[:, None] == past[None, :]
    assert torch.equal(neg[:, 4:8], ~same_past)
    assert torch.equal(pos[:, 4:8], same_past if include else torch.zeros_like(same_past))
    assert not (pos[:, 8:] | neg[:, 8:]).any()  # empty slots are neither
    assert not (pos & neg).any()
    if not include:  # past keys of the query's own identity are neither positive nor negative
        assert not (pos[0, 4:] | neg[0, 4:])[[0, 3]].any()


def test_past_positive_switch_acts_through_the_loss():
    images, labels = batch()
    results = {}
    for include in (False, True):
        fw = make_framework(**{"framework.include_past_positives": include, "loss.name": "triplet"}).eval()
        before = fw(images, labels)
        with torch.no_grad():
            own_key = fw.features(fw.key_encoder(images).feat)[:1]
        # a past key identical to query 0's key (a would-be violator) and one far away, both of its identity
        fw.dictionary.enqueue(torch.cat([own_key, own_key + 50.0]), labels[:1].repeat(2))
        after = fw(images, labels)
        results[include] = (before.terms["metric"].item(), after.terms["metric"].item())
    same_before, same_after = results[False]
    assert same_after == pytest.approx(same_before)  # excluded: neither positive nor negative
    with_before, with_after = results[True]
    assert with_after > with_before + 1.0  # the far past positive became query 0's hardest positive


def test_empty_dictionary_adds_no_samples():
    fw = make_framework()
    labels = torch.tensor([0, 0, 1, 1])
    _, pos, neg = fw.references(torch.randn(4, 6), torch.randn(4, 6), labels)
    assert not (pos[:, 4:] | neg[:, 4:]).any()


def test_baseline_excludes_self():
    fw = make_framework(**{"framework.name": "baseline", "loss.name": "triplet"})
    assert isinstance(fw, Baseline)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    feats = torch.randn(6, 6)
    dist, pos, neg = fw.references(feats, labels)
    assert dist.shape == (6, 6)
    assert not pos.diagonal().any() and not neg.diagonal().any()
    assert pos.sum(1).tolist() == [1] * 6 and neg.sum(1).tolist() == [4] * 6
    # all identities distinct: no anchor has a positive once self is excluded
    fw.train()
    images, _ = batch(b=4)
    out = fw(images, torch.tensor([0, 1, 2, 3]))
    assert out.stats["valid"] == 0.0 and out.terms["metric"].item() == 0.0


# ---- steps --------------------------------------------------------------------------------------

def test_step_output_composition_and_stats():
    fw = make_framework(**{"loss.ce_weight": 0.5, "loss.metric_weight": 2.0})
    images, labels = batch()
    out = fw(images, labels)
    assert set(out.terms) == {"ce", "metric"}
    torch.testing.assert_close(out.loss, 0.5 * out.terms["ce"] + 2.0 * out.terms["metric"])
    assert set(out.stats) == {"hard_pos", "hard_neg", "valid", "dict_fill", "refs"}
    assert all(isinstance(v, float) for v in out.stats.values())
    assert out.stats["refs"] == 8.0 and out.stats["dict_fill"] == 0.0 and out.stats["valid"] == 8.0
    assert out.stats["hard_pos"] == out.stats["hard_neg"] >= 0.0  # HE: the elastic count, 0 when nothing violates


def test_cross_entropy_takes_the_circle_softmax_logits():
    fw = make_framework(**{"framework.name": "baseline", "loss.name": "triplet"})
    fw.encoder.classifier = CircleClassifier(6, 8, scale=16.0, margin=0.25)
    images, labels = batch()
    out = fw(images, labels)
    scores = fw.encoder(images).logits
    expected = cross_entropy_ls(fw.encoder.classifier.train_logits(scores, labels), labels, 0.1)
    torch.testing.assert_close(out.terms["ce"], expected)
    assert not torch.allclose(out.terms["ce"], cross_entropy_ls(scores, labels, 0.1))


def test_training_steps_enqueue_keys_and_update_the_key_encoder():
    fw = make_framework(**{"framework.momentum": 0.9, "framework.dict_size": 32})
    fw.train()
    optimizer = torch.optim.SGD([p for p in fw.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        images, labels = batch(seed=step)
        with torch.no_grad():
            expected_keys = fw.features(copy.deepcopy(fw.key_encoder)(images).feat)
        key_before = copy.deepcopy(fw.key_encoder.state_dict())
        out = fw(images, labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert out.stats["refs"] == 8.0 + 8 * step
        fw.after_optimizer_step()
        # the batch's keys (f_k before its update) are in the dictionary, in order
        assert fw.dictionary.ptr.item() == 8 * (step + 1)
        torch.testing.assert_close(fw.dictionary.keys[8 * step:8 * (step + 1)], expected_keys)
        assert fw.dictionary.labels[8 * step:8 * (step + 1)].tolist() == labels.tolist()
        query = fw.encoder.state_dict()
        for name, value in fw.key_encoder.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, 0.9 * key_before[name] + 0.1 * query[name])
    assert fw.dictionary.fill == pytest.approx(16 / 32)
    assert all(p.grad is None for p in fw.key_encoder.parameters())


def test_he_elastic_count_rises_with_violators_in_the_dictionary_up_to_its_bound():
    fw = make_framework(**{"loss.name": "he", "framework.dict_size": 64}).eval()
    images, labels = batch(ids=2)  # K = 4: each query's positives are its own key (nearest) and 3 more
    counts = [fw(images, labels).stats["hard_neg"]]
    with torch.no_grad():
        keys = fw.features(fw.key_encoder(images).feat)
    for copies in range(1, 4):
        # copies of each query's own key under identities not in the batch: negatives closer than any
        # positive but the query's own key, so each round can pair one more far positive
        fw.dictionary.enqueue(keys + 1e-3 * torch.randn_like(keys), torch.arange(8) + 100 + 10 * copies)
        stats = fw(images, labels).stats
        assert stats["hard_pos"] == stats["hard_neg"] >= copies
        counts.append(stats["hard_neg"])
    assert counts == sorted(counts) and counts[0] < counts[-1] == 3.0


def test_test_encoder_and_normalized_keys():
    fw = make_framework(**{"framework.test_encoder": "key", "loss.normalize": True})
    assert fw.test_encoder() is fw.key_encoder
    fw.train()
    images, labels = batch()
    fw(images, labels)
    fw.after_optimizer_step()
    norms = fw.dictionary.keys[:8].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(8))
    query_fw = make_framework()
    assert query_fw.test_encoder() is query_fw.encoder
    baseline = make_framework(**{"framework.name": "baseline"})
    assert baseline.test_encoder() is baseline.encoder


def test_moreid_under_cpu_autocast_keeps_float32_keys():
    fw = make_framework(**{"loss.name": "npair"})
    fw.train()
    images, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fw(images, labels)
    out.loss.backward()
    fw.after_optimizer_step()
    assert torch.isfinite(out.loss) and fw.dictionary.keys.dtype == torch.float32
    assert fw.dictionary.valid_mask().sum() == 8


def test_moreid_needs_feat_dim_and_unknown_framework_is_named():
    class NoDim(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="feat_dim"):
        build_framework(make_cfg(), NoDim())
    cfg = make_cfg()
    cfg.framework.name = "simclr"
    with pytest.raises(ValueError, match="'simclr'"):
        build_framework(cfg, TinyReID())


@pytest.mark.parametrize("name", ["moreid", "baseline"])
@pytest.mark.parametrize("loss", ["triplet", "npair", "ranked_list", "he"])
def test_every_loss_trains_in_both_frameworks(loss, name):
    fw = make_framework(**{"loss.name": loss, "framework.name": name, "loss.normalize": loss == "ranked_list"})
    fw.train()
    optimizer = torch.optim.Adam([p for p in fw.parameters() if p.requires_grad], lr=1e-2)
    for step in range(4):
        images, labels = batch(seed=step % 2)
        out = fw(images, labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        fw.after_optimizer_step()
        assert torch.isfinite(out.loss) and out.stats["valid"] == 8.0
    if name == "moreid":
        assert fw.dictionary.valid_mask().sum() == 12 and out.stats["refs"] == 8.0 + 12


def test_resnet18_reid_model_in_both_frameworks():
    images = torch.randn(8, 3, 32, 16)
    labels = torch.arange(4).repeat_interleave(2)
    for loss, name in (("he", "moreid"), ("triplet", "baseline")):
        cfg = make_cfg(**{"loss.name": loss, "framework.name": name})
        torch.manual_seed(0)
        fw = build_framework(cfg, build_model(cfg.model, num_classes=4))
        optimizer = torch.optim.Adam([p for p in fw.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):
            out = fw(images, labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            fw.after_optimizer_step()
            assert torch.isfinite(out.loss)
        if name == "moreid":
            assert fw.dictionary.valid_mask().sum() == 12 and out.stats["refs"] == 16.0
            assert fw.test_encoder() is fw.encoder
