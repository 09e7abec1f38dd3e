"""Training frameworks: the baseline (references from the current batch) and MoReID (f_k + dictionary).

``framework(images, labels) -> StepOutput``; the metric loss sees a distance matrix and masks built here
(docs/design.md, "The method" and "The losses"). ``framework.encoder`` is f_q; a trainer may replace it by a
DistributedDataParallel wrapper, so the model inside is always reached through ``.module`` when present.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from reid_core.config import Config
from reid_core.ddp import unwrap
from reid_core.losses import build_loss, cross_entropy_ls, prepare_features, prepared_distance

from .collective import broadcast_float_buffers_, gather, gather_with_grad, world
from .dictionary import KeyDictionary
from .momentum import make_key_encoder, momentum_update


STAT_NAMES = ("hard_pos", "hard_neg", "valid", "dict_fill", "refs")
FINITE_TERMS = ("loss/ce", "loss/metric", "keys")  # what StepOutput.finite checks, in order


class StepOutput:
    """One step's result, kept on the device (nothing here synchronizes with the host until read).

    ``loss``: scalar to back-propagate; ``terms``: the unweighted ``ce`` and ``metric`` (mean over this
    worker's anchors) scalars; ``stats_tensor``: float ``[5]`` in :data:`STAT_NAMES` order, ``hard_pos``,
    ``hard_neg``, ``valid`` (from the metric loss, this worker's anchors), ``dict_fill`` (fraction, 0 for
    the baseline) and ``refs`` (references each anchor was compared against); :attr:`stats` is the same
    as Python floats, read from the device on first access. ``finite``: bool ``[3]``, in
    :data:`FINITE_TERMS` order, whether the CE loss, the metric loss and the step's keys (gathered from
    every worker; True for the baseline) are finite.
    """

    __slots__ = ("loss", "terms", "stats_tensor", "finite", "_stats")

    def __init__(self, loss: Tensor, terms: dict[str, Tensor], stats_tensor: Tensor, finite: Tensor) -> None:
        self.loss, self.terms, self.stats_tensor, self.finite = loss, terms, stats_tensor, finite
        self._stats: dict[str, float] | None = None

    @property
    def stats(self) -> dict[str, float]:
        if self._stats is None:
            self._stats = dict(zip(STAT_NAMES, self.stats_tensor.tolist()))
        return self._stats


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

    def _finish(self, logits: Tensor, labels: Tensor, metric: Tensor, extra: list[Tensor],
                keys_finite: Tensor | None = None) -> StepOutput:
        classifier = getattr(unwrap(self.encoder), "classifier", None)
        if hasattr(classifier, "train_logits"):  # CircleSoftmax re-weights the scores by the labels
            logits = classifier.train_logits(logits, labels)
        # Cross-entropy stays on this worker's samples: DDP's gradient averaging makes it the global mean.
        ce = cross_entropy_ls(logits, labels, self.label_smoothing)
        metric = metric.mean()
        loss = self.ce_weight * ce + self.metric_weight * metric
        with torch.no_grad():
            device = metric.device
            stats = torch.cat([self.metric_loss.stats_tensor().float().to(device),
                               torch.stack([torch.as_tensor(t, dtype=torch.float32).to(device) for t in extra])])
            if keys_finite is None:
                keys_finite = torch.ones((), dtype=torch.bool, device=device)
            finite = torch.stack([ce.isfinite(), metric.isfinite(), keys_finite.to(device)])
        return StepOutput(loss, {"ce": ce, "metric": metric}, stats, finite)

    def max_positives(self, instances: int | None) -> int | None:
        """Bound on any anchor's positives for the metric loss's top-k (no host synchronization), from
        ``instances``, the most images of one identity in the global batch (K); None: unknown."""
        return instances

    def after_optimizer_step(self, keep: Tensor | None = None) -> None:
        """Called by the trainer after every optimizer step: f_q's BatchNorm statistics become rank 0's
        on every worker (the one buffer broadcast of a step). ``keep`` (device bool scalar): False when
        the step was not finite (MoReID then enqueues nothing)."""
        broadcast_float_buffers_(unwrap(self.encoder))

    def test_encoder(self) -> nn.Module:
        """The encoder whose features are evaluated."""
        return unwrap(self.encoder)


class Baseline(Framework):
    """Anchors, positives and negatives all from the current batch of f_q features (self excluded, or
    counted as a positive when the loss asks for it, as FastReID's weighted mining does).

    Under data parallelism the references are the whole global batch: every worker's features, gathered
    with their gradient (:func:`~reid_core.moreid.collective.gather_with_grad`), against this worker's
    anchors, so the loss and the averaged gradients do not depend on the number of workers.
    """

    def forward(self, images: Tensor, labels: Tensor, instances: int | None = None) -> StepOutput:
        """``instances``: the most images of one identity in the global batch (K of P x K), if known."""
        out = self.encoder(images)
        feats = self.features(out.feat)
        refs, ref_labels = gather_with_grad(feats), gather(labels)
        with torch.autocast(feats.device.type, enabled=False):
            dist, pos, neg = self.references(feats, labels, refs, ref_labels, world()[0] * len(labels))
            metric = self.metric_loss(dist, pos, neg, max_pos=self.max_positives(instances))
        zero = torch.zeros((), device=feats.device)
        return self._finish(out.logits, labels, metric, [zero, torch.tensor(float(len(ref_labels)))])

    def max_positives(self, instances: int | None) -> int | None:
        if instances is None:
            return None
        return instances if self.metric_loss.anchor_is_positive else instances - 1

    def references(self, feats: Tensor, labels: Tensor, refs: Tensor | None = None, ref_labels: Tensor | None = None,
                   offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``(dist [b, B], pos, neg)`` of the anchors ``feats [b, D]`` against ``refs [B, D]`` (default: the
        anchors themselves), anchor i being reference ``offset + i``. Positives: same label, self
        excluded (or included, at distance exactly 0, when the loss's ``anchor_is_positive``);
        negatives: another label."""
        if refs is None:
            refs, ref_labels = feats, labels
        assert ref_labels is not None
        dist = prepared_distance(feats, refs, self.metric)
        same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        rows = torch.arange(len(labels), device=labels.device).unsqueeze(1) + offset
        itself = rows == torch.arange(len(ref_labels), device=labels.device).unsqueeze(0)
        if self.metric_loss.anchor_is_positive:
            # The matmul form of the distance leaves rounding noise on the diagonal; its true value is 0.
            dist = dist.masked_fill(itself, 0.0)
            return dist, same, ~same
        return dist, same & ~itself, ~same


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

    def forward(self, images: Tensor, labels: Tensor, instances: int | None = None) -> StepOutput:
        """One step's loss. In training mode the batch's keys are enqueued after the loss, once the
        backward pass no longer needs the dictionary: by :meth:`after_optimizer_step`, or at the start of
        the next forward (the distance's backward reads the stored keys, which enqueueing overwrites).

        Under data parallelism the current keys and labels are every worker's (gathered in rank order,
        the order they are enqueued in), against this worker's queries. ``instances``: the most images of
        one identity in the global batch (K of P x K), if known: it bounds the positives when past
        positives are off."""
        self.flush()
        out = self.encoder(images)
        queries = self.features(out.feat)
        with torch.no_grad():  # f_k runs in the caller's autocast context, without gradient
            keys = gather(self.features(self.key_encoder(images).feat))
            key_labels = gather(labels)
            keys_finite = keys.isfinite().all()
        with torch.autocast(queries.device.type, enabled=False):
            dist, pos, neg = self.references(queries, keys, labels, key_labels)
            metric = self.metric_loss(dist, pos, neg, max_pos=self.max_positives(instances))
        if self.training:
            self._pending = (keys, key_labels)
        n_refs = len(key_labels) + self.dictionary.valid_mask().sum()
        return self._finish(out.logits, labels, metric, [self.dictionary.fill_tensor(), n_refs], keys_finite)

    def max_positives(self, instances: int | None) -> int | None:
        # Past positives come from the dictionary, up to K per past batch: no useful bound without
        # counting them on the device, so the ablation reads the count (one host synchronization).
        return None if self.include_past_positives else instances

    def references(self, queries: Tensor, keys: Tensor, labels: Tensor,
                   key_labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(dist [b, B + S], pos, neg)`` of the queries ``[b, D]`` against [current keys ``[B, D]`` ++
        dictionary slots]; ``key_labels`` are the keys' labels (default ``labels``: the keys of the queries'
        own images).

        Positives: current keys with the query's label; each query's own key counts as a positive
        (MoCo-style, docs/design.md, "The method": "positives = keys of the current batch with the same identity").
        Negatives: current and dictionary keys with another label. Past keys with the query's label are
        neither ("negative samples at large"), or positives with ``include_past_positives``. Empty
        dictionary slots are neither.
        """
        if key_labels is None:
            key_labels = labels
        stored = self.dictionary.valid_mask()
        # Distances to the two reference sets are computed apart and joined: cheaper than joining the
        # [S, D] keys into a new array every step.
        dist = torch.cat([prepared_distance(queries, keys, self.metric),
                          prepared_distance(queries, self.dictionary.keys, self.metric)], dim=1)
        same_now = labels.unsqueeze(1) == key_labels.unsqueeze(0)
        same_past = labels.unsqueeze(1) == self.dictionary.labels.unsqueeze(0)  # empty slots: -1, never equal
        past_pos = same_past if self.include_past_positives else torch.zeros_like(same_past)
        pos = torch.cat([same_now, past_pos], dim=1)
        neg = torch.cat([~same_now, ~same_past & stored], dim=1)
        return dist, pos, neg

    def flush(self, keep: Tensor | None = None) -> None:
        """Enqueue the last training step's keys and labels (gathered already) if that has not happened
        yet; ``keep`` False (device bool scalar) drops them instead, on the device."""
        if self._pending is not None:
            keys, labels = self._pending
            self._pending = None
            self.dictionary.enqueue(keys, labels, gathered=True, keep=keep)

    def after_optimizer_step(self, keep: Tensor | None = None) -> None:
        """Enqueue this step's keys (unless ``keep`` is False), make f_q's BatchNorm statistics rank 0's,
        then the momentum update of f_k from f_q."""
        self.flush(keep)
        broadcast_float_buffers_(unwrap(self.encoder))
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
