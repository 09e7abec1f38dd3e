"""The re-ID model: backbone, pooling, BNNeck embedding head and classifier (docs/design.md, "The model" and "The authors' regime").

``feat`` (pooled, before the BNNeck) feeds the metric losses, ``bn_feat`` (after the BNNeck) feeds the
classifier (Luo et al., "Bag of Tricks", 2019); test features are either, per ``ModelConfig.test_feature``.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from torch import Tensor, nn

from reid_core.config import ModelConfig
from reid_core.data.normalize import PixelNormalize
from reid_core.models.backbone import ResNetBackbone, build_backbone
from reid_core.models.pretrained import PretrainedReport, resolve_pretrained
from reid_core.models.classifier import build_classifier
from reid_core.models.layers import AvgPool, GeM

TEST_FEATURES = ("before_bn", "after_bn")
POOLINGS = ("gem", "avg")


class ReIDOutput(NamedTuple):
    """Output of :meth:`ReIDModel.forward` (train and eval mode alike)."""

    feat: Tensor  # float[B, D], pooled feature before the BNNeck
    bn_feat: Tensor  # float[B, D], after the BNNeck
    logits: Tensor  # float[B, C], classifier scores (C = training identities; cosines for CircleSoftmax)


class ReIDModel(nn.Module):
    """``backbone`` -> ``pool`` -> ``bnneck`` (BatchNorm1d, bias frozen at 0) -> ``classifier``.

    ``classifier`` is ``linear`` (no bias) or ``circle`` (CircleSoftmax with ``cls_scale``, ``cls_margin``);
    the cross-entropy takes ``classifier.train_logits(logits, labels)``.

    ``feat_dim`` is D, the backbone's channel count. ``backbone`` is the part frozen during
    ``optim.freeze_iters``; ``pool``, ``bnneck`` and ``classifier`` are the heads.
    """

    def __init__(self, backbone: ResNetBackbone, num_classes: int, pooling: str = "gem", gem_p: float = 3.0,
                 test_feature: str = "after_bn", classifier: str = "linear", cls_scale: float = 64.0,
                 cls_margin: float = 0.35) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if test_feature not in TEST_FEATURES:
            raise ValueError(f"model.test_feature must be one of {', '.join(TEST_FEATURES)}; got {test_feature!r}")
        self.backbone = backbone
        self.feat_dim: int = backbone.out_channels
        self.num_classes = num_classes
        self.test_feature = test_feature
        self.pool: nn.Module = GeM(gem_p) if pooling == "gem" else AvgPool()
        self.bnneck = nn.BatchNorm1d(self.feat_dim)
        nn.init.ones_(self.bnneck.weight)
        nn.init.zeros_(self.bnneck.bias)
        self.bnneck.bias.requires_grad_(False)
        self.classifier = build_classifier(classifier, self.feat_dim, num_classes, cls_scale, cls_margin)
        self.input_norm = PixelNormalize()  # the loaders' uint8 images -> normalised float32, on the device

    @property
    def pretrained_report(self) -> PretrainedReport | None:
        """What was loaded from ``model.pretrained`` (None for random initialization)."""
        return getattr(self.backbone, "pretrained_report", None)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` uint8[B, 3 or 4, H, W] (see PixelNormalize) or normalised float[B, 3, H, W] -> (feat [B, D],
        bn_feat [B, D])."""
        feat = self.pool(self.backbone(self.input_norm(x)))
        return feat, self.bnneck(feat)

    def forward(self, x: Tensor) -> ReIDOutput:
        feat, bn_feat = self.embed(x)
        return ReIDOutput(feat, bn_feat, self.classifier(bn_feat))

    def test_features(self, x: Tensor) -> Tensor:
        """Test-time embedding float[B, D]: ``feat`` for ``before_bn``, ``bn_feat`` for ``after_bn``.

        Call it in eval mode, where the BNNeck uses its running statistics.
        """
        feat, bn_feat = self.embed(x)
        return feat if self.test_feature == "before_bn" else bn_feat


def _weights(cfg: ModelConfig) -> Path | None:
    """The local file ``cfg.pretrained`` means (:func:`resolve_pretrained`)."""
    return resolve_pretrained(cfg.pretrained, cfg.arch, ibn=cfg.ibn, cache_dir=cfg.pretrained_cache or None)


def build_model(cfg: ModelConfig, num_classes: int) -> ReIDModel:
    """The :class:`ReIDModel` described by ``cfg`` with a classifier over ``num_classes`` identities.

    ``model.pretrained: imagenet`` is resolved here too (a cached file is checked, not fetched again);
    a study's driver resolves it before the trials start (:func:`check_pretrained`).
    """
    weights = _weights(cfg)
    backbone = build_backbone(cfg.arch, last_stride=cfg.last_stride, ibn=cfg.ibn, non_local=cfg.non_local,
                              pretrained=weights or "", non_local_form=cfg.non_local_form)
    return ReIDModel(backbone, num_classes, pooling=cfg.pooling, gem_p=cfg.gem_p, test_feature=cfg.test_feature,
                     classifier=cfg.classifier, cls_scale=cfg.cls_scale, cls_margin=cfg.cls_margin)


def check_pretrained(cfg: ModelConfig) -> tuple[Path | None, PretrainedReport | None]:
    """Resolve ``cfg.pretrained`` (fetching ``imagenet`` once) and load it into a CPU backbone of ``cfg``'s
    architecture: ``(local file, report)``, or ``(None, None)`` for random initialization. Raises the
    loader's errors, so a driver calling it finds a bad file before any trial starts."""
    weights = _weights(cfg)
    if weights is None:
        return None, None
    backbone = build_backbone(cfg.arch, last_stride=cfg.last_stride, ibn=cfg.ibn, non_local=cfg.non_local,
                              pretrained=weights, non_local_form=cfg.non_local_form)
    return weights, backbone.pretrained_report


def compile_backbones(*models: nn.Module | None, backend: str = "inductor") -> None:
    """``torch.compile`` the forward of each model's ``backbone`` in place (``nn.Module.compile``: parameter
    names, state dicts and checkpoints stay as they are). Compile f_k after it was copied from f_q: a
    copy of a compiled module would call the original's forward. None entries are skipped."""
    for model in models:
        if model is not None:
            model.backbone.compile(backend=backend)
