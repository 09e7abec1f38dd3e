"""FastReID's in-batch masks count the anchor itself as a positive; its weighted mining gives it weight.
The baseline does the same with the weighted triplet (the VeRi-Wild recipe's loss), and keeps the anchor
out with hard mining (where it never is the farthest positive) and with every other loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reid_core.config import Config
from reid_core.models import build_model
from reid_core.moreid import build_framework


def _baseline(**overrides):
    cfg = Config().replace({"model.arch": "resnet18", "framework.name": "baseline", "loss.name": "triplet",
                            "data.batch_size": 8, "data.num_instance": 2, **overrides})
    torch.manual_seed(0)
    return build_framework(cfg, build_model(cfg.model, num_classes=4))


def _fastreid_weighted_soft_margin(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The weighted example mining with a soft margin, as FastReID defines it, written out per anchor:
    positives = same label, the anchor included (at distance 0); softmax(d) over the positives,
    softmax(-d) over the negatives; mean over anchors of log(1 + exp(d_ap - d_an))."""
    dist = torch.cdist(feats, feats)
    losses = []
    for i in range(len(labels)):
        same = labels == labels[i]
        d_p = torch.where(torch.arange(len(labels)) == i, 0.0, dist[i])[same]
        d_n = dist[i][~same]
        d_ap = (torch.softmax(d_p, 0) * d_p).sum()
        d_an = (torch.softmax(-d_n, 0) * d_n).sum()
        losses.append(F.softplus(d_ap - d_an))
    return torch.stack(losses).mean()


def test_weighted_triplet_counts_the_anchor_as_a_positive_like_fastreid():
    fw = _baseline(**{"loss.triplet_mining": "weighted", "loss.margin": 0.0})
    feats = torch.randn(8, 6, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    dist, pos, neg = fw.references(feats, labels)
    assert pos.diagonal().all() and (dist.diagonal() == 0).all()
    assert pos.sum(1).tolist() == [2] * 8 and neg.sum(1).tolist() == [6] * 8
    ours = fw.metric_loss(dist, pos, neg, max_pos=fw.max_positives(2)).mean()
    expected = _fastreid_weighted_soft_margin(feats, labels)
    torch.testing.assert_close(ours, expected)
    # the anchor's weight matters: without it the loss is another number
    without = fw.metric_loss(dist, pos & ~torch.eye(8, dtype=torch.bool), neg).mean()
    assert not torch.allclose(without, expected)
    # gradients through the zero self-distance stay finite
    feats.requires_grad_(True)
    fw.metric_loss(*fw.references(feats, labels)).mean().backward()
    assert torch.isfinite(feats.grad).all()


def test_other_losses_and_hard_mining_keep_the_anchor_out():
    labels = torch.tensor([0, 0, 1, 1])
    for overrides in ({"loss.triplet_mining": "hard"}, {"loss.name": "he"}, {"loss.name": "npair"}):
        fw = _baseline(**overrides)
        _, pos, neg = fw.references(torch.randn(4, 6), labels)
        assert not pos.diagonal().any() and not neg.diagonal().any(), overrides
        assert fw.max_positives(2) == 1, overrides  # K - 1: the top-k bound without the anchor
    assert _baseline(**{"loss.triplet_mining": "weighted"}).max_positives(2) == 2
