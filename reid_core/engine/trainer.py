"""The training engine: one process, or one rank of a torch.distributed (DDP) job.

``Trainer`` owns everything a run needs (data, model, framework, optimizer, schedule, AMP scaler,
TensorBoard) and exposes the loop in pieces so that it can be driven from outside (Ray Train):

    while trainer.epoch < cfg.train.epochs:
        metrics = trainer.train_epoch()
        if trainer.eval_due():
            metrics.update(trainer.evaluate())
        if trainer.checkpoint_due():
            trainer.save_checkpoint(folder)       # every rank calls it; rank 0 writes
        report(metrics)

:meth:`Trainer.fit` is that loop with the latest checkpoint in ``{output_dir}/checkpoints/checkpoint.pt``.

Checkpoints are one file (a folder path means ``<folder>/checkpoint.pt``) holding f_q, the rest of the
framework (f_k, dictionary), optimizer, schedule, AMP scaler, epoch, iteration, sampler pass and every
rank's RNG states. Resuming continues bit for bit with ``data.workers = 0``; with worker processes the
augmentation streams restart from the restored RNG, so the run is equally valid but not identical.
Evaluation saves and restores the RNG, so when it happens does not change the training.

Distributed: when ``torch.distributed`` is initialised, f_q (``framework.encoder``) is wrapped in
DistributedDataParallel, each rank loads its slice of the global batch (data.batch_size / ranks), training metrics are
averaged over ranks, and evaluation shares the work: each rank extracts the features of its contiguous
shard of query and gallery, the shards are all-gathered in dataset order, and rank 0 computes the metrics
and broadcasts them, so every rank returns the same dict (the one a single process computes). Only rank 0
writes TensorBoard and checkpoints.

The global batch: each rank's metric loss takes its own anchors against every rank's samples (gathered in
rank order with their gradient, :mod:`reid_core.moreid.collective`), so a run's numbers do not depend on
how many ranks share it; cross-entropy stays per rank, and DDP's gradient averaging makes it the global
mean. Rank 0's BatchNorm statistics reach the other ranks in one broadcast per step, by the framework
(DDP's own per-forward broadcast is off). A training step does not wait for the device: its statistics
and the non-finite guard (:mod:`reid_core.engine.finite`) are read every ``train.log_every`` steps and at
the end of an epoch. Checkpoints hold tensors and plain containers only (``weights_only=True`` reads them).
"""
from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from reid_core.config import Config, ConfigError
from reid_core.data import (DatasetError, ReIDDataset, build_test_loader, build_train_loader, dataset_num_classes,
                            load_dataset)
from reid_core.engine import checkpoint as ckpt
from reid_core.ddp import unwrap
from reid_core.engine.finite import FiniteGuard
from reid_core.engine.optim import BackboneFreeze, build_optimizer, build_scheduler, trainable_parameters
from reid_core.engine.tensorboard import ScalarLogger
from reid_core.evaluation import evaluate_features
from reid_core.evaluation.features import extract_features_sharded, rank0_buffers
from reid_core.models import build_model, compile_backbones
from reid_core.moreid import STAT_NAMES, build_framework
from reid_core.pretrain import with_resolved_weights

# Training metric name -> key of StepOutput.stats it is read from.
STAT_METRICS = {"hard/pos": "hard_pos", "hard/neg": "hard_neg", "dict/fill": "dict_fill"}
_STAT_INDEX = [STAT_NAMES.index(key) for key in STAT_METRICS.values()]
TRAIN_METRICS = ("loss/total", "loss/ce", "loss/metric", *STAT_METRICS, "lr")
CHECKPOINT_FORMAT = 1


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU. On CUDA the device is ``LOCAL_RANK`` when set
    (torchrun) or the current CUDA device (what Ray Train selects)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    local_rank = os.environ.get("LOCAL_RANK")
    index = int(local_rank) if local_rank is not None and int(local_rank) < torch.cuda.device_count() \
        else torch.cuda.current_device()
    return torch.device("cuda", index)


# DDP's own per-forward buffer broadcast, switched off (the keyword was renamed in recent PyTorch).
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


def wrap_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """f_q in DistributedDataParallel, without DDP's per-forward buffer broadcast: the framework broadcasts
    rank 0's BatchNorm statistics once per step (after the optimizer step, before the momentum update
    reads them), so a second broadcast would only repeat it."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False, **_NO_FORWARD_BUFFER_SYNC)


class TrainStep:
    """One optimizer step of a framework, with everything it needs: optimizer, per-iteration
    schedule, AMP (autocast and, for float16, a gradient scaler), backbone freeze, gradient clipping and
    the non-finite guard. :class:`Trainer` drives one; the step benchmark times one directly.

    ``framework`` must already be on ``device`` (and in channels_last when ``channels_last``);
    ``model`` is f_q unwrapped (its ``backbone`` is what ``optim.freeze_iters`` freezes). ``amp_dtype``:
    ``torch.float16`` (scaled gradients) or ``torch.bfloat16`` (no scaler); distances, losses, keys and
    the momentum update stay float32 either way.

    A step does not synchronize with the host: its statistics stay on the device
    (``StepOutput.stats_tensor``) and a non-finite loss or key is recorded in :attr:`guard` (read it with
    ``guard.check()``). Exceptions: float16's GradScaler reads its inf check each step, and the
    ``framework.include_past_positives`` ablation reads its largest positive count.
    """

    def __init__(self, cfg: Config, framework: nn.Module, model: nn.Module, device: torch.device,
                 iters_per_epoch: int, *, amp: bool = False, channels_last: bool = False,
                 amp_dtype: torch.dtype = torch.float16) -> None:
        if amp_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be torch.float16 or torch.bfloat16; got {amp_dtype}")
        self.cfg = cfg
        self.framework = framework
        self.device = device
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.params = trainable_parameters(framework)
        self.optimizer = build_optimizer(cfg, framework)
        self.scheduler = build_scheduler(cfg, self.optimizer, iters_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
        self.freeze = BackboneFreeze.for_framework(framework, model, cfg.optim.freeze_iters)
        self.guard = FiniteGuard(device)
        self.instances = cfg.data.num_instance  # K: bounds the in-batch positives (P x K batches)
        self.iteration = 0  # optimizer steps taken

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step on a batch (images float[B,3,H,W], labels long[B]); returns the
        framework's StepOutput. Order: forward (autocast), non-finite guard, scaled backward, freeze,
        clip, step, enqueue of the keys (unless non-finite) and momentum update of f_k, schedule."""
        self._check_instances(labels)
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        self.freeze.before_step(self.iteration)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out = self.framework(images, labels, instances=self.instances)
        keep = self.guard.update(out.finite, self.iteration)
        self.scaler.scale(out.loss).backward()
        freeze = self.freeze.frozen(self.iteration)
        clip = self.cfg.optim.grad_clip
        if freeze or clip > 0:
            self.scaler.unscale_(self.optimizer)
        if freeze:
            self.freeze.after_backward(self.iteration)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        unwrap(self.framework).after_optimizer_step(keep)
        self.scheduler.step()
        self.iteration += 1
        return out

    def _check_instances(self, labels: torch.Tensor) -> None:
        """The metric loss's top-k relies on at most K images of an identity per batch (the P x K
        sampler's, each worker holding whole identities); checked on host-side labels, which cost no
        device synchronization."""
        if labels.device.type != "cpu" or not len(labels):
            return
        ids, counts = np.unique(labels.numpy(), return_counts=True)
        if counts.max() > self.instances:
            raise DatasetError(f"a training batch holds {counts.max()} images of identity {ids[counts.argmax()]}, "
                               f"more than data.num_instance = {self.instances} (K of the P x K batches), which "
                               "bounds the metric loss's positives")

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        """Restore the GradScaler's state where both sides scale (float16 AMP); a checkpoint saved without
        it (AMP off, or bfloat16) leaves a float16 run's scaler at its initial scale, and a bfloat16 or
        AMP-off run ignores a saved one."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


class Trainer:
    """Trains and evaluates one model described by ``cfg`` (see the module docstring).

    ``log_dir``: TensorBoard folder (default ``{train.output_dir}/tensorboard``). ``device``
    overrides ``train.device`` (e.g. the device Ray Train assigned to this worker). ``amp`` overrides
    the rule "``train.amp`` on CUDA only" (tests run AMP on the CPU with it).
    """

    def __init__(self, cfg: Config, *, log_dir: str | os.PathLike | None = None,
                 device: torch.device | str | None = None, dataset: ReIDDataset | None = None,
                 amp: bool | None = None) -> None:
        self.cfg = cfg.validate()
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
        on_cuda = self.device.type == "cuda"
        self.amp = cfg.train.amp and on_cuda if amp is None else amp
        self.amp_dtype = getattr(torch, cfg.train.amp_dtype)
        self.channels_last = cfg.train.channels_last and on_cuda
        if on_cuda:
            torch.cuda.set_device(self.device)

        ckpt.seed_all(cfg.train.seed)  # same on every rank: identical initial weights
        # ``dataset``: an index already read (a study's driver hands one to every trial); else it is read
        # here (synthetic data are generated into the cache when root is empty).
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data)
        self.num_classes = dataset_num_classes(self.dataset)
        self.train_loader = build_train_loader(self.dataset, cfg.data, rank=self.rank,
                                               world_size=self.world_size, seed=cfg.train.seed)
        self.iters_per_epoch = cfg.train.iters_per_epoch or len(self.train_loader)
        if self.iters_per_epoch < 1:
            raise ConfigError(f"the training split of {cfg.data.dataset} gives no batch of "
                              f"data.batch_size={cfg.data.batch_size}")
        # Each rank reads its own shard of the test sets; evaluate() gathers the features.
        shard = dict(rank=self.rank, world_size=self.world_size)
        self.query_loader = build_test_loader(self.dataset.query, cfg.data, cfg.eval.batch_size, **shard)
        self.gallery_loader = build_test_loader(self.dataset.gallery, cfg.data, cfg.eval.batch_size, **shard)
        self.test_skipped = 0  # unreadable query/gallery images of every rank's shard, over all evaluations

        self.model = build_model(with_resolved_weights(cfg.model), self.num_classes)
        self.framework = build_framework(cfg, self.model).to(self.device)
        if self.channels_last:
            self.framework.to(memory_format=torch.channels_last)
        self.pretrained_report = self.model.pretrained_report  # counts loaded from model.pretrained; None: random
        if on_cuda:
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        if cfg.train.compile:
            compile_backbones(self.model, getattr(self.framework, "key_encoder", None))
        self.step = TrainStep(cfg, self.framework, self.model, self.device, self.iters_per_epoch,
                              amp=self.amp, channels_last=self.channels_last, amp_dtype=self.amp_dtype)
        self.optimizer, self.scheduler, self.scaler = self.step.optimizer, self.step.scheduler, self.step.scaler
        if self.distributed:
            self.framework.encoder = wrap_ddp(self.model, self.device)

        self.epoch = 0  # epochs completed
        self.sampler_pass = 0  # passes over the sampler started (its epoch number)
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        if log_dir is None:
            log_dir = self.output_dir / "tensorboard"
        self.logger = ScalarLogger(log_dir if self.rank == 0 else None)
        ckpt.seed_all(cfg.train.seed + self.rank)  # per-rank stream for data augmentation

    # ---- training -------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Optimizer steps taken."""
        return self.step.iteration

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step (see :class:`TrainStep`); returns the framework's StepOutput."""
        return self.step(images, labels)

    def _batches(self) -> Iterator[Any]:
        """Training batches without end: a new sampler pass (with its own shuffle) whenever one runs out."""
        while True:
            _set_sampler_epoch(self.train_loader, self.sampler_pass)
            self.sampler_pass += 1
            yielded = 0
            for batch in self.train_loader:
                yielded += 1
                yield batch
            if not yielded:  # every image of a whole pass was unreadable: no step could ever be taken
                raise DatasetError(f"{self.cfg.data.dataset}: every training image read in a pass over "
                                   f"{len(self.train_loader)} batches was unreadable (first: "
                                   f"{self.train_loader.first_bad}); check the JPEG files under {self.dataset.root}")

    def skipped_images(self) -> int:
        """Unreadable images met so far: training images (replaced) summed over ranks, and the query and
        gallery images of all ranks (left out; the same count as one process evaluating the whole test sets).
        Under DDP every rank must call it (one all-reduce)."""
        count = self.train_loader.skipped
        if self.distributed:
            total = torch.tensor([count], dtype=torch.int64, device=self.device)
            dist.all_reduce(total)
            count = int(total.item())
        return count + self.test_skipped

    def train_epoch(self) -> dict[str, float]:
        """Train ``iters_per_epoch`` steps; returns epoch means of :data:`TRAIN_METRICS` (averaged
        over ranks) plus ``epoch`` (epochs completed) and ``images_per_s`` (all ranks together).

        The step statistics stay on the device and are read in one batch every ``train.log_every``
        iterations (with the non-finite guard, which raises :class:`NonFiniteError` there) and at the
        end of the epoch: no other host synchronization."""
        self.framework.train()
        log_every = self.cfg.train.log_every
        sums = torch.zeros(3 + len(STAT_METRICS), device=self.device, dtype=torch.float64)
        lr_sum = 0.0
        images_seen = 0
        start = time.perf_counter()
        for _, (images, labels, *_rest) in zip(range(self.iters_per_epoch), self._batches()):
            lr = self.optimizer.param_groups[0]["lr"]
            out = self.train_step(images, labels)
            with torch.no_grad():
                values = torch.cat([torch.stack([out.loss, out.terms["ce"], out.terms["metric"]]).float(),
                                    out.stats_tensor[_STAT_INDEX]]).double()
                sums += values
            lr_sum += lr
            images_seen += images.shape[0]
            if self.iteration % log_every == 0:
                read = torch.cat([values, self.step.guard.record.double()]).tolist()  # the one sync
                self.step.guard.check(read[-2:])
                if self.logger.enabled:
                    self.logger.scalars("train", {**dict(zip(("loss/total", "loss/ce", "loss/metric", *STAT_METRICS),
                                                             read[:-2])), "lr": lr}, self.iteration)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        n = self.iters_per_epoch
        read = torch.cat([sums, self.step.guard.record.double()]).tolist()
        self.step.guard.check(read[-2:])
        values = torch.tensor([*(v / n for v in read[:-2]), lr_sum / n, images_seen / seconds],
                              dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(values)
            values[:-1] /= self.world_size  # means average; images/s adds up
        names = ("loss/total", "loss/ce", "loss/metric", *STAT_METRICS, "lr")
        self.epoch += 1
        metrics = dict(zip(names, values[:-1].tolist()))
        metrics.update(epoch=self.epoch, images_per_s=values[-1].item())
        self.logger.scalars("epoch", {k: v for k, v in metrics.items() if k != "epoch"}, self.epoch)
        return metrics

    # ---- evaluation -----------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """mAP, R1, R5, R10, mINP and ``cmc`` (list over ranks 1..max_rank), all in percent, of the
        test encoder (``framework.test_encoder()``) on query vs gallery; with ``eval.rerank`` also the
        same keys with ``_rerank`` appended (k-reciprocal re-ranking). Every rank must call it: each
        extracts the features of its shard (:meth:`test_features`), rank 0 computes the metrics of the
        gathered features and broadcasts them, so every rank returns the same dict; an error in the
        metrics is raised on every rank."""
        # Test loaders draw a seed from the global RNG; restoring it keeps training independent of
        # when (and whether) evaluations happen.
        rng = ckpt.rng_state()
        metrics: dict[str, Any] | None = None
        error: Exception | None = None
        try:
            features = self.test_features()
            if self.rank == 0:
                try:
                    metrics = self._metrics(*features)
                except Exception as exc:
                    if not self.distributed:
                        raise
                    error = exc
        finally:
            ckpt.set_rng_state(rng)
        if self.distributed:
            box: list[Any] = [metrics if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0)
            if error is not None:
                raise error
            if isinstance(box[0], str):
                raise RuntimeError(f"evaluation failed on rank 0: {box[0]}")
            metrics = box[0]
        assert metrics is not None
        if self.rank == 0:
            self.logger.scalars("eval", metrics, self.epoch)
            self.logger.flush()
        return metrics

    @torch.no_grad()
    def test_features(self) -> tuple[torch.Tensor, ...]:
        """``(qf float32[Nq, D], gf float32[Ng, D], q_pids, g_pids, q_camids, g_camids)`` of the test encoder,
        on the CPU, in dataset order, unreadable images left out, on every rank: each rank extracts its
        shard (with rank 0's BatchNorm statistics) and the shards are all-gathered. Every rank must call it.
        Adds the unreadable images skipped on all ranks to ``test_skipped``. Uses the global RNG (see
        :meth:`evaluate`)."""
        encoder = unwrap(unwrap(self.framework).test_encoder())
        flip = self.cfg.eval.flip
        skipped = self.query_loader.skipped + self.gallery_loader.skipped
        # extract_features switches to eval mode and back; autocast as in training (features come back fp32)
        with rank0_buffers(encoder), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            qf, qp, qc = extract_features_sharded(encoder, self.query_loader, self.device, flip=flip, progress=False)
            gf, gp, gc = extract_features_sharded(encoder, self.gallery_loader, self.device, flip=flip,
                                                  progress=False)
        new = torch.tensor([self.query_loader.skipped + self.gallery_loader.skipped - skipped], device=self.device)
        if self.distributed:
            dist.all_reduce(new)
        self.test_skipped += int(new.item())
        return qf, gf, qp, gp, qc, gc

    def _metrics(self, qf: torch.Tensor, gf: torch.Tensor, qp: torch.Tensor, gp: torch.Tensor, qc: torch.Tensor,
                 gc: torch.Tensor) -> dict[str, Any]:
        """The reported metrics of the gathered features (query expansion and re-ranking as configured)."""
        e = self.cfg.eval
        qf, gf = qf.to(self.device), gf.to(self.device)  # ranking runs on the training device (chunked)
        options = dict(metric=e.metric, max_rank=e.max_rank, chunk_size=e.chunk_size,
                       memory_budget_mb=e.memory_budget_mb, query_expansion=e.query_expansion, qe_k=e.qe_k,
                       qe_alpha=e.qe_alpha)
        metrics = _percent(evaluate_features(qf, gf, qp, gp, qc, gc, **options))
        if e.rerank:
            reranked = _percent(evaluate_features(qf, gf, qp, gp, qc, gc, **options, rerank=True, k1=e.rerank_k1,
                                                  k2=e.rerank_k2, lambda_value=e.rerank_lambda))
            metrics.update({f"{key}_rerank": value for key, value in reranked.items()})
        return metrics

    # ---- checkpoints ----------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint to ``path`` (a file, or a folder that gets ``checkpoint.pt``)
        atomically. Call it on every rank: RNG states are gathered from all ranks; rank 0 writes.
        Returns the file path. A run whose loss or keys went non-finite raises NonFiniteError instead."""
        self.step.guard.check()
        rng = ckpt.rng_state()
        if self.distributed:
            states: list[Any] = [None] * self.world_size
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        target = ckpt.resolve_path(path)
        if self.rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": self.epoch,
                "iteration": self.iteration,
                "sampler_pass": self.sampler_pass,
                "model": self.model.state_dict(),
                "framework": self._framework_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": states,
                "config": self.cfg.to_dict(),
            }
            target = ckpt.save_atomic(state, target)
        return target

    def _framework_state(self) -> dict[str, torch.Tensor]:
        """The framework's state without f_q, which is saved once under ``model``."""
        return {k: v for k, v in unwrap(self.framework).state_dict().items() if not k.startswith("encoder.")}

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (any rank count; each rank takes
        its own RNG state when the counts match, else rank 0's)."""
        state = ckpt.load(path)
        where = ckpt.resolve_path(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ckpt.CheckpointError(f"{where} is not a reid_core training checkpoint")
        try:
            self.model.load_state_dict(state["model"])
            missing, unexpected = unwrap(self.framework).load_state_dict(state["framework"], strict=False)
        except RuntimeError as exc:  # shape mismatches: another architecture or number of classes
            raise ckpt.CheckpointError(f"checkpoint {where} does not fit this model: {exc}") from exc
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise ckpt.CheckpointError(f"checkpoint {where} does not fit the {self.cfg.framework.name} framework: "
                                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step.load_scaler_state(state.get("scaler"))
        self.epoch = int(state["epoch"])
        self.step.iteration = int(state["iteration"])
        self.sampler_pass = int(state["sampler_pass"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[self.rank] if len(rngs) == self.world_size else rngs[0])

    # ---- the whole run --------------------------------------------------
    def eval_due(self) -> bool:
        """Whether the epoch just completed is evaluated (every ``eval_period``, and the last)."""
        return self.epoch % self.cfg.train.eval_period == 0 or self.epoch >= self.cfg.train.epochs

    def checkpoint_due(self) -> bool:
        return self.epoch % self.cfg.train.checkpoint_period == 0 or self.epoch >= self.cfg.train.epochs

    def fit(self, on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train from ``self.epoch`` to ``train.epochs``: evaluate when due, checkpoint when due into
        ``{output_dir}/checkpoints/checkpoint.pt`` (the latest only), then call
        ``on_epoch_end(epoch, metrics)``. Returns the last epoch's metrics (with its evaluation);
        a run already complete is evaluated once."""
        if self.epoch >= self.cfg.train.epochs:
            return {"epoch": self.epoch, **self.evaluate()}
        metrics: dict[str, Any] = {}
        while self.epoch < self.cfg.train.epochs:
            metrics = self.train_epoch()
            if self.eval_due():
                metrics.update(self.evaluate())
            if self.checkpoint_due():
                self.save_checkpoint(self.checkpoint_dir / ckpt.CHECKPOINT_FILE)
            if on_epoch_end is not None:
                on_epoch_end(self.epoch, metrics)
        self.logger.flush()
        return metrics

    def close(self) -> None:
        self.logger.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Tell the P x K sampler which pass this is (it reshuffles per pass)."""
    for owner in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if owner is not None and hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
            return


def _percent(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluate_features result as the reported metrics: mAP, R1, R5, R10, mINP and cmc, in percent."""
    cmc = [100.0 * float(c) for c in result["cmc"]]

    def rank(k: int) -> float:
        return cmc[min(k, len(cmc)) - 1]

    return {"mAP": 100.0 * float(result["mAP"]), "R1": rank(1), "R5": rank(5), "R10": rank(10),
            "mINP": 100.0 * float(result["mINP"]), "cmc": cmc}
