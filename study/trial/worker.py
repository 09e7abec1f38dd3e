"""The training loop of one trial, in one of two places:

- **in the Tune trial's own process** (:func:`run_in_trial`) when the trial has one worker: no Train
  controller, worker group or process group to start, and a reused trial process (``reuse_actors``)
  keeps torch imported between trials;
- **in every worker of the trial's TorchTrainer** (:func:`train_loop`) when it has several (DDP: gloo
  on CPU, NCCL on GPU).

Both run :func:`run_loop`; a :class:`Session` hides where results go (``ray.tune.report`` or
``ray.train.report``) and where the checkpoint to resume from comes from.

Per epoch every worker trains (``reid_core.engine.Trainer``), evaluates when due (every
``train.eval_period``, the last epoch, and each ASHA rung so that the scheduler compares real numbers),
writes a checkpoint when due (rank 0 writes; the folder is handed to the session's report) and reports one
result. Every result holds the last evaluation (``mAP``, ``R1``, ``R5``, ``R10``, ``mINP``, in percent, and
``mAP_rerank`` ... ``mINP_rerank`` with ``eval.rerank``;
NaN before the first one, with ``eval_epoch`` = 0), the best one so far (``best_*``, ``best_epoch``,
``best_cmc``: CMC at ranks 1..20), ``start_epoch`` (the epoch this worker group resumed from),
``world_size``, ``ddp_backend`` (``gloo`` / ``nccl`` / ``none``), ``rank_nodes`` (the Ray node id of every
rank, in rank order, joined by ``,``: where the trial runs, which changes when a lost node's trial is
retried), ``skipped_images`` (unreadable images skipped so far), ``epoch_s`` (seconds of training and
evaluation of this epoch) and the trial's set-up times, in seconds (see :data:`TIMING_KEYS`).

A config or data error (:func:`study.trial.errors.is_deterministic`) fails the same way on every attempt: the
loop reports it once (``trial_error``), rank 0 writes ``trial_error.txt`` in the trial folder, and the loop
returns, so that neither Train nor Tune retries; the trainable then raises it (see :mod:`study.trial.trainable`).

A checkpoint folder holds the Trainer's ``checkpoint.pt`` and ``study_state.json`` (last and best
evaluation), so a restarted trial or worker group carries on where it stopped.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import pyarrow.fs as pafs
import ray
import ray.train
from ray import tune
from ray.tune import Checkpoint

from reid_core.config import EVAL_METRICS, Config
from study.trial.errors import (COLLECTIVE_RETRIES, TRIAL_ERROR_KEY, CollectiveError, collective_errors, error_line,
                                error_result, is_collective, is_deterministic, record_collective_error, translate,
                                write_trial_error)

CMC_RANKS = 20
STATE_FILE = "study_state.json"
SAVED_RESULT_KEY = "result"  # in STATE_FILE: the result reported with the checkpoint
# Result keys with where a trial's time went (benchmarks/study.py reads them): wall-clock time (s since
# the epoch) when the loop was entered; seconds importing the engine, building the Trainer (data, model,
# optimizer), loading the checkpoint; this epoch's evaluation; the previous epoch's checkpoint save and its
# report call (Ray copies the checkpoint into the trial folder; a Tune trial then waits for the driver to
# take the result).
TIMING_KEYS = ("entered_at", "import_s", "build_s", "restore_s", "eval_s", "checkpoint_s", "report_s")


class Session(Protocol):
    """Where a trial loop reports to and resumes from."""

    rank: int
    world_size: int
    hook_wait_s: float  # how long the test hook waits after a checkpointed report before dying

    def resume_from(self) -> tuple[Any, bool]:
        """The ray Checkpoint to resume from (None: from the start), and whether Ray had registered it
        (when not, the driver may never have taken the result reported with it)."""
        ...

    def report(self, result: dict[str, Any], folder: Path | None) -> None:
        ...


class TuneSession:
    """The Tune trial's own process: ``ray.tune.report`` / ``ray.tune.get_checkpoint`` (results are
    handed over synchronously, so a checkpoint is registered when the driver takes the result).

    A killed driver's study resumes from Tune's last experiment snapshot, which is taken every few
    seconds and so may predate the trial's newest checkpoints; those are on disk all the same (Tune copies
    a checkpoint into the trial folder before ``tune.report`` returns). So the trial resumes from the
    newest complete one it finds there when that is newer than Tune's, as Ray Train does with its own
    snapshot."""

    rank, world_size, hook_wait_s = 0, 1, 2.0

    def __init__(self, trial_folder: str | None = None) -> None:
        self.trial_folder = trial_folder

    def resume_from(self) -> tuple[Any, bool]:
        registered = tune.get_checkpoint()
        found = persisted_checkpoints(self.trial_folder) if self.trial_folder else []
        if found and (registered is None or _checkpoint_index(found[0].path) > _checkpoint_index(registered.path)):
            return found[0], False
        return registered, True

    def report(self, result: dict[str, Any], folder: Path | None) -> None:
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(folder)) if folder else None)


class TrainSession:
    """A Ray Train worker: ``ray.train.report`` / ``ray.train.get_checkpoint``. The Train controller polls
    its workers every 2 s, so the test hook waits longer before killing a worker."""

    hook_wait_s = 5.0

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def resume_from(self) -> tuple[Any, bool]:
        # Train's own snapshot in the trial folder, written before its report reaches Tune
        return ray.train.get_checkpoint(), True

    def report(self, result: dict[str, Any], folder: Path | None) -> None:
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None)


def _checkpoint_index(path: str) -> int:
    """The N of a Tune checkpoint folder ``.../checkpoint_00000N`` (-1 for any other name)."""
    name = PurePosixPath(path).name
    suffix = name[len("checkpoint_"):]
    return int(suffix) if name.startswith("checkpoint_") and suffix.isdigit() else -1


def persisted_checkpoints(trial_folder: str) -> list[Any]:
    """The complete checkpoints in a Tune trial's folder (a local path or a pyarrow URI), newest first.

    Complete: the folder holds the study state and a ``checkpoint.pt`` whose zip directory (written last
    by ``torch.save``) is intact, so a copy cut short by a dying process is passed over."""
    # reid_core.engine imports the whole engine (torch, models, data): kept out of this module's import
    from reid_core.engine.checkpoint import CHECKPOINT_FILE

    fs, root = pafs.FileSystem.from_uri(trial_folder)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    folders = [i.path for i in fs.get_file_info(pafs.FileSelector(root))
               if i.type == pafs.FileType.Directory and _checkpoint_index(i.path) >= 0]
    complete = []
    for folder in sorted(folders, key=_checkpoint_index, reverse=True):
        if fs.get_file_info(f"{folder}/{STATE_FILE}").type != pafs.FileType.File:
            continue
        try:
            with fs.open_input_file(f"{folder}/{CHECKPOINT_FILE}") as fh:
                intact = zipfile.is_zipfile(fh)
        except OSError:
            intact = False
        if intact:
            complete.append(Checkpoint(folder, filesystem=fs))
    return complete


def empty_state() -> dict[str, Any]:
    nan = float("nan")
    return {"last": {k: nan for k in EVAL_METRICS}, "eval_epoch": 0,
            "best": {k: nan for k in EVAL_METRICS}, "best_epoch": 0, "best_cmc": []}


def update_state(state: dict[str, Any], evaluation: dict[str, Any], epoch: int, metric: str, mode: str) -> None:
    """Record an evaluation (percent) as the last one, and as the best when it beats the best ``metric``."""
    reranked = [f"{k}_rerank" for k in EVAL_METRICS if f"{k}_rerank" in evaluation]  # with eval.rerank
    state["last"] = {k: float(evaluation[k]) for k in (*EVAL_METRICS, *reranked)}
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
    """The dict reported to Tune for one epoch (``world``: ``world_size``, ``ddp_backend``, timings)."""
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


def _maybe_fail(hook: dict[str, Any] | None, epoch: int, session: Session) -> None:
    """Test hook: the rank-0 worker process (the trial's process on the one-worker path) dies once after
    reporting ``hook['epoch']`` (a marker file records that it happened, so the restarted one goes on).
    It waits a little first, so that Ray has registered that epoch's checkpoint. With ``hook['raises']``
    (``oom``, ``nccl``) every worker raises that torch error instead, after every epoch from ``hook['epoch']``
    on, on every attempt (rank 0 adds a line to the marker file each time)."""
    if hook and hook.get("raises") and epoch >= int(hook["epoch"]):
        _raise_for_test(hook, epoch, session)
    if not hook or session.rank != 0 or epoch != int(hook["epoch"]):
        return
    marker = Path(hook["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker died after epoch {epoch}\n")
    time.sleep(session.hook_wait_s)
    os._exit(17)


def _raise_for_test(hook: dict[str, Any], epoch: int, session: Session) -> None:
    import torch  # see _train

    if session.rank == 0:
        marker = Path(hook["marker"])
        marker.parent.mkdir(parents=True, exist_ok=True)
        with marker.open("a") as fh:
            fh.write(f"{hook['raises']} raised after epoch {epoch}\n")
    if hook["raises"] == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB of which 1.06 GiB is free (raised by the test hook)")
    raise torch.distributed.DistBackendError(
        "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=42, OpType=ALLREDUCE) ran for "
        "600000 milliseconds before timing out (raised by the test hook)")


def checkpoint_due(trainer: Any, cfg: Config) -> bool:
    """The Trainer's rule (every ``train.checkpoint_period`` epochs and the last), except that a period
    beyond the budget turns a trial's checkpoints off (tiny trials whose restart costs less than a save)."""
    return cfg.train.checkpoint_period <= cfg.train.epochs and trainer.checkpoint_due()


def rank_nodes() -> str:
    """The Ray node id of every rank, in rank order, joined by ``,`` (a collective: every rank calls it)."""
    import torch.distributed as dist  # torch: see _train

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return node
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return ",".join(nodes)


def run_in_trial(loop_config: dict[str, Any]) -> None:
    """The one-worker path: the loop in the Tune trial's own process."""
    os.umask(0o077)  # checkpoints and trial files owner-only (Ray copies them with pyarrow, under this umask)
    run_loop(loop_config, TuneSession(loop_config.get("trial_folder")), entered_at=time.time())


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (several-worker trials)."""
    os.umask(0o077)  # checkpoints owner-only (Ray Train copies them with pyarrow, under this umask)
    run_loop(loop_config, TrainSession(), entered_at=time.time())


def run_loop(loop_config: dict[str, Any], session: Session, entered_at: float) -> None:
    """Train one trial to its budget. ``loop_config``: ``config`` (the trial's validated Config, built once by
    the trainable),
    ``eval_epochs`` (extra epochs to evaluate: ASHA rungs), ``metric``, ``mode``, ``fail_hook`` (tests),
    ``dataset`` (the driver's dataset index as an object reference, or None), ``trial_folder`` (the Tune
    trial's folder, where a deterministic error is written)."""
    folder = loop_config.get("trial_folder")
    collective_before = collective_errors(folder) if folder else 0  # every rank reads it before any error
    try:
        _train(loop_config, session, entered_at)
    except Exception as exc:
        cfg = loop_config["config"]
        exc = translate(exc, batch_size=cfg.data.batch_size, world_size=session.world_size,
                        gpu_share=float(loop_config.get("gpu_share", 0.0)))
        if is_collective(exc) and not is_deterministic(exc):
            if session.rank == 0 and folder:
                record_collective_error(folder, exc)
            if collective_before < COLLECTIVE_RETRIES:
                raise  # retried once: it may be a passing fault of a node or link
            exc = CollectiveError(f"{error_line(exc)} (a collective error again after {collective_before} "
                                  f"retry: not retried again; check the nodes' GPUs and network)")
        elif not is_deterministic(exc):
            raise  # a crash: retried from the last checkpoint (by Train, or by Tune on the one-worker path)
        # The same input fails the same way on every attempt: report it instead of raising, so that
        # neither Train nor Tune retries (the trainable raises it once the loop returned).
        result = error_result(exc, loop_config.get("metric", "mAP"))
        if session.rank == 0 and loop_config.get("trial_folder"):
            write_trial_error(loop_config["trial_folder"], result[TRIAL_ERROR_KEY])
        session.report(result, None)


def _train(loop_config: dict[str, Any], session: Session, entered_at: float) -> None:
    began = time.perf_counter()
    # torch and the engine are imported here, not with this module: Ray unpickles the trainable by module
    # path in light processes, and import_s measures what a fresh trial process pays (nothing when reused).
    import torch.distributed as dist

    from reid_core.engine import Trainer

    imported = time.perf_counter()
    note = cap_gpu_memory(float(loop_config.get("gpu_share", 0.0)))
    if note:
        print(note, flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="moreid-trial-"))
    cfg: Config = copy.deepcopy(loop_config["config"])  # validated by the trainable; this copy writes to scratch
    cfg.train.output_dir = str(scratch)
    index = loop_config.get("dataset")  # the driver's dataset index (an object reference), if handed over
    trainer = Trainer(cfg, log_dir=scratch / "tensorboard", device=_device(cfg, session),
                      dataset=ray.get(index) if index is not None else None)
    built = time.perf_counter()
    state, saved_result, registered = _restore(trainer, session)
    start_epoch = trainer.epoch
    world = {"world_size": session.world_size,
             "ddp_backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else "none",
             "rank_nodes": rank_nodes(), "entered_at": entered_at, "import_s": imported - began,
             "build_s": built - imported, "restore_s": time.perf_counter() - built,
             # data.batch_size is the global batch of a step; each worker loads its share. Pretrained: counts
             # loaded from model.pretrained (absent for random init).
             "batch_global": cfg.data.batch_size, "workers": session.world_size,
             "batch_per_worker": cfg.data.batch_size // session.world_size,
             **(trainer.pretrained_report.metrics() if trainer.pretrained_report is not None else {})}
    try:
        if start_epoch > 0 and (start_epoch >= cfg.train.epochs or not registered):
            # The run had finished before its driver went away, or its driver died before it took the result
            # of the checkpoint resumed from: report that result once more, so that Tune (and the study's
            # record) has every epoch and a finished run ends with it. Same keys in the same order as the
            # other results (Tune's progress.csv keeps its first header).
            final = result_of({"epoch": trainer.epoch}, state, start_epoch, world)
            session.report({**saved_result, **final} if saved_result else final, None)
        _epochs(trainer, cfg, loop_config, session, state, start_epoch, world, scratch)
    finally:
        trainer.close()
        shutil.rmtree(scratch, ignore_errors=True)


def cap_gpu_memory(share: float) -> str:
    """A one-worker trial that reserves ``share`` (0 < share < 1) of a GPU caps its CUDA memory to that share
    (``torch.cuda.set_per_process_memory_fraction``), so that trials sharing a GPU cannot starve each other:
    one that outgrows its share fails alone, on an out-of-memory error. Returns one line saying what it did
    ('' for a whole GPU or none); without CUDA (Ray's declared GPUs only) it caps nothing."""
    if not 0 < share < 1:
        return ""
    import torch  # see _train

    if not torch.cuda.is_available():
        return f"GPU share {share:g}: no CUDA device in this process, so no memory cap"
    device = torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(share, device)
    return f"GPU share {share:g}: CUDA memory of device {device} capped to {share:g} of it"


def _device(cfg: Config, session: Session) -> Any:
    """The GPU Ray Train assigned to this worker; None for the Trainer's own choice."""
    if cfg.train.device != "cpu" and isinstance(session, TrainSession):
        from ray.train.torch import get_device  # imports torch (see _train)

        return get_device()
    return None


def _restore(trainer: Any, session: Session) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
    """Load the session's checkpoint into ``trainer``: the study state, the result reported with that
    checkpoint (or None), and whether Ray registered the checkpoint."""
    state = empty_state()
    checkpoint, registered = session.resume_from()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_checkpoint(folder)
            state_file = Path(folder) / STATE_FILE
            if state_file.is_file():
                state = json.loads(state_file.read_text())
    saved_result = state.pop(SAVED_RESULT_KEY, None)  # the result reported with that checkpoint
    return state, saved_result, registered


def _epochs(trainer: Any, cfg: Config, loop_config: dict[str, Any], session: Session, state: dict[str, Any],
            start_epoch: int, world: dict[str, Any], scratch: Path) -> None:
    """Train the remaining epochs: evaluate when due, checkpoint when due, report every epoch."""
    eval_epochs = {int(e) for e in loop_config.get("eval_epochs", [])}
    metric, mode = loop_config.get("metric", "mAP"), loop_config.get("mode", "max")
    checkpoint_s = report_s = 0.0
    while trainer.epoch < cfg.train.epochs:
        epoch_began = time.perf_counter()
        train_metrics = trainer.train_epoch()
        epoch = trainer.epoch
        eval_s = 0.0
        if trainer.eval_due() or epoch in eval_epochs:
            eval_began = time.perf_counter()
            update_state(state, trainer.evaluate(), epoch, metric, mode)
            eval_s = time.perf_counter() - eval_began
        result = result_of(train_metrics, state, start_epoch, world)
        result["epoch_s"] = time.perf_counter() - epoch_began  # training + evaluation, without Ray's overheads
        result["skipped_images"] = trainer.skipped_images()
        result["eval_s"] = eval_s
        result["checkpoint_s"], result["report_s"] = checkpoint_s, report_s
        saving = time.perf_counter()
        folder = None
        if checkpoint_due(trainer, cfg):
            folder = Path(tempfile.mkdtemp(prefix="ckpt-", dir=scratch))
            trainer.save_checkpoint(folder)  # every rank takes part; rank 0 writes
            if session.rank == 0:
                (folder / STATE_FILE).write_text(json.dumps({**state, SAVED_RESULT_KEY: result}))
            else:
                shutil.rmtree(folder, ignore_errors=True)
                folder = None
        reporting = time.perf_counter()
        session.report(result, folder)
        report_s = time.perf_counter() - reporting
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        checkpoint_s = reporting - saving
        _maybe_fail(loop_config.get("fail_hook"), epoch, session)
