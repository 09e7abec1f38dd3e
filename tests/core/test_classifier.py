"""Identity classifiers: linear and CircleSoftmax (docs/design.md, "The model" and "The authors' regime")."""
from __future__ import annotations

import math

import pytest
import torch

from reid_core.config import Config, ConfigError
from reid_core.losses import cross_entropy_ls
from reid_core.models.classifier import CircleClassifier, LinearClassifier, build_classifier


def circle_logits_reference(x, weight, labels, scale, margin):
    """CircleSoftmax written out one sample and one class at a time (Sun et al. 2020, eq. for the
    classification case): O_p = 1 + m, O_n = -m, Δ_p = 1 - m, Δ_n = m, α detached."""
    rows = []
    for i in range(x.shape[0]):
        row = []
        for j in range(weight.shape[0]):
            cos = torch.dot(x[i], weight[j]) / (x[i].norm() * weight[j].norm())
            if j == labels[i]:
                alpha = max(1 + margin - cos.item(), 0.0)
                row.append(scale * alpha * (cos - (1 - margin)))
            else:
                alpha = max(cos.item() + margin, 0.0)
                row.append(scale * alpha * (cos - margin))
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("scale,margin", [(64.0, 0.35), (16.0, 0.1), (30.0, 0.0)])
def test_circle_softmax_matches_the_per_class_reference_in_value_and_gradient(scale, margin):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    head = CircleClassifier(8, 5, scale=scale, margin=margin).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(5, 8, generator=g, dtype=torch.float64))
        head.weight[1] = x[1] * 3  # a target at cos = 1, a clamp of alpha_p at 0 when margin = 0
        head.weight[2] = -x[0]  # a non-target at cos = -1: alpha_n clamped at 0
    xa = x.clone().requires_grad_(True)
    scores = head(xa)
    torch.testing.assert_close(scores, torch.nn.functional.cosine_similarity(x[:, None], head.weight[None], dim=2))
    loss = cross_entropy_ls(head.train_logits(scores, labels), labels, 0.1)
    loss.backward()
    xr = x.clone().requires_grad_(True)
    wr = head.weight.detach().clone().requires_grad_(True)
    ref = cross_entropy_ls(circle_logits_reference(xr, wr, labels, scale, margin), labels, 0.1)
    ref.backward()
    # cross_entropy_ls computes in float32, hence float32 tolerances
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, wr.grad, rtol=1e-4, atol=1e-6)


def test_circle_softmax_target_logit_by_hand():
    head = CircleClassifier(2, 2, scale=64.0, margin=0.35)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[math.cos(0.5), math.sin(0.5)]])
    logits = head.train_logits(head(x), torch.tensor([0]))
    cos0, cos1 = math.cos(0.5), math.sin(0.5)
    assert logits[0, 0].item() == pytest.approx(64 * (1.35 - cos0) * (cos0 - 0.65), rel=1e-6)
    assert logits[0, 1].item() == pytest.approx(64 * (cos1 + 0.35) * (cos1 - 0.35), rel=1e-6)


def test_linear_classifier_and_the_config_option():
    head = build_classifier("linear", 4, 3)
    assert isinstance(head, LinearClassifier)
    x = torch.randn(2, 4)
    torch.testing.assert_close(head(x), x @ head.weight.t())
    assert head.train_logits(head(x), torch.tensor([0, 1])) is not None
    assert isinstance(build_classifier("circle", 4, 3, 32.0, 0.25), CircleClassifier)
    with pytest.raises(ValueError, match="cosface"):
        build_classifier("cosface", 4, 3)
    with pytest.raises(ValueError, match="margin"):
        CircleClassifier(4, 3, margin=1.0)
    with pytest.raises(ConfigError, match="model.classifier"):
        Config().replace({"model.classifier": "arcface"})
    with pytest.raises(ConfigError, match="model.cls_margin"):
        Config().replace({"model.cls_margin": -0.1})
