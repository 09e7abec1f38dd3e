"""The Ray Train loop of one trial, run by every worker of its TorchTrainer (DDP: gloo on CPU, NCCL on GPU).

Per epoch every worker trains (``reid_core.engine.Trainer``), evaluates when due (every
``train.eval_period``, the last epoch, and each ASHA rung so that the scheduler compares real numbers),
writes a checkpoint when due (rank 0 writes; the folder is handed to ``ray.train.report``) and reports one
result. Every result holds the last evaluation (``mAP``, ``R1``, ``R5``, ``R10``, ``mINP``, in percent, and
``mAP_rerank`` ... ``mINP_rerank`` with ``eval.rerank``;
NaN before the first one, with ``eval_epoch`` = 0), the best one so far (``best_*``, ``best_epoch``,
``best_cmc``: CMC at ranks 1..20), ``start_epoch`` (the epoch this worker group resumed from),
``world_size``, ``ddp_backend`` (``gloo`` / ``nccl``), ``rank_nodes`` (the Ray node id of every rank, in rank
order, joined by ``,``: where the worker group runs, which changes when a lost node's trial is retried) and
``epoch_s`` (seconds of training and evaluation).

A checkpoint folder holds the Trainer's ``checkpoint.pt`` and ``study_state.json`` (last and best
evaluation), so a restarted worker group (``ray.train.get_checkpoint()``) carries on where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch.distributed as dist

from reid_core.config import Config
from study.preflight import TRIAL_ERROR_KEY, error_result, is_deterministic, write_trial_error

EVAL_KEYS = ("mAP", "R1", "R5", "R10", "mINP")
CMC_RANKS = 20
STATE_FILE = "study_state.json"
HOOK_WAIT_S = 5.0


def empty_state() -> dict[str, Any]:
    nan = float("nan")
    return {"last": {k: nan for k in EVAL_KEYS}, "eval_epoch": 0,
            "best": {k: nan for k in EVAL_KEYS}, "best_epoch": 0, "best_cmc": []}


def update_state(state: dict[str, Any], evaluation: dict[str, Any], epoch: int, metric: str, mode: str) -> None:
    """Record an evaluation (percent) as the last one, and as the best when it beats the best ``metric``."""
    reranked = [f"{k}_rerank" for k in EVAL_KEYS if f"{k}_rerank" in evaluation]  # with eval.rerank
    state["last"] = {k: float(evaluation[k]) for k in (*EVAL_KEYS, *reranked)}
    state["eval_epoch"] = epoch
    best = state["best"][metric]
    value = state["last"][metric]
    better = math.isnan(best) or (value > best if mode == "max" else value < best)
    if better:
        state["best"] = dict(state["last"])
        state["best_epoch"] = epoch
        state["best_cmc"] = [float(c) for c in evaluation.get("cmc", [])[:CMC_RANKS]]


def result_of(train_metrics: dict[str, Any], state: dict[str, Any], start_epoch: int,
              world: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict reported to Tune for one epoch (``world``: ``world_size`` and ``ddp_backend``)."""
    out = {k: float(v) for k, v in train_metrics.items() if isinstance(v, (int, float)) and k != "epoch"}
    out["epoch"] = int(train_metrics["epoch"])
    out.update(state["last"])
    out["eval_epoch"] = state["eval_epoch"]
    out.update({f"best_{k}": v for k, v in state["best"].items()})
    out["best_epoch"] = state["best_epoch"]
    out["best_cmc"] = list(state["best_cmc"])
    out["start_epoch"] = start_epoch
    out.update(world or {})
    return out


def _maybe_fail(hook: dict[str, Any] | None, epoch: int, rank: int) -> None:
    """Test hook: the rank-0 worker process dies once after reporting ``hook['epoch']`` (a marker file
    records that it happened, so the restarted worker goes on). It waits a few seconds first, so that
    the Train controller (which polls every 2 s) has registered that epoch's checkpoint."""
    if not hook or rank != 0 or epoch != int(hook["epoch"]):
        return
    marker = Path(hook["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker died after epoch {epoch}\n")
    time.sleep(HOOK_WAIT_S)
    os._exit(17)


def rank_nodes() -> str:
    """The Ray node id of every rank, in rank order, joined by ``,`` (a collective: every rank calls it)."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return node
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return ",".join(nodes)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker. ``loop_config``: ``config`` (Config as a nested dict),
    ``eval_epochs`` (extra epochs to evaluate: ASHA rungs), ``metric``, ``mode``, ``fail_hook`` (tests)."""
    try:
        _train(loop_config)
    except Exception as exc:
        if not is_deterministic(exc):
            raise  # a crash: Train retries the worker group from its last checkpoint
        # The same input fails the same way on every attempt: report it instead of raising, so that
        # neither Train nor Tune retries (the trainable raises it once the run ended).
        result = error_result(exc, loop_config.get("metric", "mAP"))
        if ray.train.get_context().get_world_rank() == 0 and loop_config.get("trial_folder"):
            write_trial_error(loop_config["trial_folder"], result[TRIAL_ERROR_KEY])
        ray.train.report(result)


def _train(loop_config: dict[str, Any]) -> None:
    from reid_core.engine import Trainer  # imported in the worker: pulls in torch models and data

    cfg = Config.from_dict(loop_config["config"]).validate()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    scratch = Path(tempfile.mkdtemp(prefix="moreid-trial-"))
    cfg = cfg.replace({"train.output_dir": str(scratch)})
    device = ray.train.torch.get_device() if cfg.train.device != "cpu" else "cpu"
    eval_epochs = {int(e) for e in loop_config.get("eval_epochs", [])}
    metric, mode = loop_config.get("metric", "mAP"), loop_config.get("mode", "max")

    index = loop_config.get("dataset")  # the driver's dataset index (an object reference), if handed over
    trainer = Trainer(cfg, log_dir=scratch / "tensorboard", device=device,
                      dataset=ray.get(index) if index is not None else None)
    state = empty_state()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_checkpoint(folder)
            state_file = Path(folder) / STATE_FILE
            if state_file.is_file():
                state = json.loads(state_file.read_text())
    start_epoch = trainer.epoch
    world = {"world_size": context.get_world_size(),
             "ddp_backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else "none",
             "rank_nodes": rank_nodes()}
    try:
        if start_epoch >= cfg.train.epochs:
            # The run had finished before its driver went away: report its final result once more, so
            # that Tune (which may not have recorded the last epochs) ends the trial with it.
            ray.train.report(result_of({"epoch": trainer.epoch}, state, start_epoch, world))
        while trainer.epoch < cfg.train.epochs:
            began = time.perf_counter()
            train_metrics = trainer.train_epoch()
            epoch = trainer.epoch
            if trainer.eval_due() or epoch in eval_epochs:
                update_state(state, trainer.evaluate(), epoch, metric, mode)
            result = result_of(train_metrics, state, start_epoch, world)
            result["epoch_s"] = time.perf_counter() - began  # training + evaluation, without Ray's overheads
            result["skipped_images"] = trainer.skipped_images()
            if trainer.checkpoint_due():
                folder = Path(tempfile.mkdtemp(prefix="ckpt-", dir=scratch))
                trainer.save_checkpoint(folder)  # every rank takes part; rank 0 writes
                if rank == 0:
                    (folder / STATE_FILE).write_text(json.dumps(state))
                    ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
                else:
                    ray.train.report(result)
                shutil.rmtree(folder, ignore_errors=True)
            else:
                ray.train.report(result)
            _maybe_fail(loop_config.get("fail_hook"), epoch, rank)
    finally:
        trainer.close()
        shutil.rmtree(scratch, ignore_errors=True)
