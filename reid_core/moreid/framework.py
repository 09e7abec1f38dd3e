"""Training frameworks: the baseline (references from the current batch) and MoReID (f_k + dictionary).

``framework(images, labels) -> StepOutput``; the metric loss sees a distance matrix and masks built here
(docs/design.md, "The method" and "The losses"). ``framework.encoder`` is f_q; a trainer may replace it by a
DistributedDataParallel wrapper, so the model inside is always reached through ``.module`` when present.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from reid_core.config import Config
from reid_core.ddp import unwrap
from reid_core.losses import build_loss, cross_entropy_ls, prepare_features, prepared_distance

from .dictionary import KeyDictionary
from .momentum import make_key_encoder, momentum_update


class StepOutput(NamedTuple):
    """``loss``: scalar to back-propagate; ``terms``: the unweighted ``ce`` and ``metric`` (mean over
    anchors) scalars; ``stats``: floats ``hard_pos``, ``hard_neg``, ``valid`` (from the metric loss),
    ``dict_fill`` (fraction, 0 for the baseline) and ``refs`` (references the loss compared against)."""

    loss: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, float]


class Framework(nn.Module):
    """Shared parts: f_q, the metric loss and the classification loss."""

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        super().__init__()
        self.encoder = model
        self.metric_loss = build_loss(cfg.loss.name, **cfg.loss.params())
        self.metric = cfg.loss.distance
        self.normalize = cfg.loss.normalize
        self.ce_weight = cfg.loss.ce_weight
        self.metric_weight = cfg.loss.metric_weight
        self.label_smoothing = cfg.loss.label_smoothing

    def features(self, feat: Tensor) -> Tensor:
        """Pre-BNNeck features ``[B, D]`` in float32, in the form the distance uses (normalized if set)."""
        return prepare_features(feat.float(), self.metric, self.normalize)

    def _finish(self, logits: Tensor, labels: Tensor, metric: Tensor, extra: list[Tensor]) -> StepOutput:
        classifier = getattr(unwrap(self.encoder), "classifier", None)
        if hasattr(classifier, "train_logits"):  # CircleSoftmax re-weights the scores by the labels
            logits = classifier.train_logits(logits, labels)
        ce = cross_entropy_ls(logits, labels, self.label_smoothing)
        metric = metric.mean()
        loss = self.ce_weight * ce + self.metric_weight * metric
        # One host synchronization for every statistic of the step.
        values = torch.cat([self.metric_loss.stats_tensor().float().to(metric.device),
                            torch.stack([t.float().to(metric.device) for t in extra])]).tolist()
        stats = dict(zip(("hard_pos", "hard_neg", "valid", "dict_fill", "refs"), values))
        return StepOutput(loss, {"ce": ce, "metric": metric}, stats)

    def after_optimizer_step(self) -> None:
        """Called by the trainer after every optimizer step."""

    def test_encoder(self) -> nn.Module:
        """The encoder whose features are evaluated."""
        return unwrap(self.encoder)


class Baseline(Framework):
    """Anchors, positives and negatives all from the current batch of f_q features (self excluded)."""

    def forward(self, images: Tensor, labels: Tensor) -> StepOutput:
        out = self.encoder(images)
        feats = self.features(out.feat)
        with torch.autocast(feats.device.type, enabled=False):
            metric = self.metric_loss(*self.references(feats, labels))
        zero = torch.zeros((), device=feats.device)
        return self._finish(out.logits, labels, metric, [zero, torch.tensor(float(len(labels)))])

    def references(self, feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(dist [B, B], pos, neg)``: same label except self, and different label."""
        dist = prepared_distance(feats, feats, self.metric)
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        return dist, pos, ~same


class MoReID(Framework):
    """f_q (trained) and f_k (its momentum average) with a dictionary of past keys (docs/design.md, "The method")."""

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        super().__init__(cfg, model)
        feat_dim = getattr(unwrap(model), "feat_dim", None)
        if not isinstance(feat_dim, int):
            raise ValueError("MoReID needs a model with an integer feat_dim (the feature size D); "
                             f"{type(unwrap(model)).__name__} has feat_dim={feat_dim!r}")
        self.key_encoder = make_key_encoder(model)
        self.dictionary = KeyDictionary(cfg.framework.dict_size, feat_dim)
        self.momentum = cfg.framework.momentum
        self.include_past_positives = cfg.framework.include_past_positives
        self.test_encoder_name = cfg.framework.test_encoder
        self._pending: tuple[Tensor, Tensor] | None = None  # this step's keys and labels, not yet enqueued

    def forward(self, images: Tensor, labels: Tensor) -> StepOutput:
        """One step's loss. In training mode the batch's keys are enqueued after the loss, once the
        backward pass no longer needs the dictionary: by :meth:`after_optimizer_step`, or at the start of
        the next forward (the distance's backward reads the stored keys, which enqueueing overwrites)."""
        self.flush()
        out = self.encoder(images)
        queries = self.features(out.feat)
        with torch.no_grad():  # f_k runs in the caller's autocast context, without gradient
            keys = self.features(self.key_encoder(images).feat)
        with torch.autocast(queries.device.type, enabled=False):
            metric = self.metric_loss(*self.references(queries, keys, labels))
        if self.training:
            self._pending = (keys, labels)
        n_refs = len(labels) + self.dictionary.valid_mask().sum()
        return self._finish(out.logits, labels, metric, [self.dictionary.fill_tensor(), n_refs])

    def references(self, queries: Tensor, keys: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(dist [B, B + S], pos, neg)`` of the queries against [current keys ++ dictionary slots].

        Positives: current keys with the query's label; each query's own key counts as a positive
        (MoCo-style, docs/design.md, "The method": "positives = keys of the current batch with the same identity").
        Negatives: current and dictionary keys with another label. Past keys with the query's label are
        neither ("negative samples at large"), or positives with ``include_past_positives``. Empty
        dictionary slots are neither.
        """
        stored = self.dictionary.valid_mask()
        # Distances to the two reference sets are computed apart and joined: cheaper than joining the
        # [S, D] keys into a new array every step.
        dist = torch.cat([prepared_distance(queries, keys, self.metric),
                          prepared_distance(queries, self.dictionary.keys, self.metric)], dim=1)
        same_now = labels.unsqueeze(1) == labels.unsqueeze(0)
        same_past = labels.unsqueeze(1) == self.dictionary.labels.unsqueeze(0)  # empty slots: -1, never equal
        past_pos = same_past if self.include_past_positives else torch.zeros_like(same_past)
        pos = torch.cat([same_now, past_pos], dim=1)
        neg = torch.cat([~same_now, ~same_past & stored], dim=1)
        return dist, pos, neg

    def flush(self) -> None:
        """Enqueue the last training step's keys and labels if that has not happened yet."""
        if self._pending is not None:
            keys, labels = self._pending
            self._pending = None
            self.dictionary.enqueue(keys, labels)

    def after_optimizer_step(self) -> None:
        """Enqueue this step's keys, then the momentum update of f_k from f_q."""
        self.flush()
        momentum_update(self.key_encoder, self.encoder, self.momentum)

    def test_encoder(self) -> nn.Module:
        """f_q or f_k, per ``framework.test_encoder``."""
        return self.key_encoder if self.test_encoder_name == "key" else unwrap(self.encoder)


FRAMEWORKS = {"baseline": Baseline, "moreid": MoReID}


def build_framework(cfg: Config, model: nn.Module) -> Framework:
    """The :class:`Baseline` or :class:`MoReID` framework of ``cfg.framework.name`` around ``model`` (f_q)."""
    name = cfg.framework.name
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}; choose one of {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[name](cfg, model)
