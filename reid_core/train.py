"""Train (or evaluate) one model: ``python -m reid_core.train --config FILE [--set key=value ...]
[--resume CKPT] [--eval-only]``.

Bad settings, datasets or checkpoint paths are reported as one ``error: ...`` line with exit code 2
before any training starts; a training that diverges (a non-finite loss or key) stops the same way.
Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it initialises torch.distributed and
trains with DDP.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a busy CPU (other runs,
# Ray trials side by side) spinning threads steal the cores the work needs: we measured a ResNet-18 step
# at 0.23 s with PASSIVE against 3 to 12 s with the default on 2 loaded cores. A user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from reid_core.config import Config, ConfigError, flatten  # noqa: E402

SUMMARY_KEYS = ("data.dataset", "data.root", "data.height", "data.width", "data.batch_size", "data.num_instance",
                "model.arch", "model.ibn", "model.non_local", "loss.name", "loss.distance",
                "framework.name", "framework.momentum", "framework.dict_size", "framework.test_encoder",
                "optim.name", "optim.lr", "train.epochs", "train.device", "train.amp", "train.seed",
                "train.output_dir")


def summary(cfg: Config) -> str:
    """The settings that define a run, one ``key: value`` per line."""
    flat = flatten(cfg)
    width = max(map(len, SUMMARY_KEYS))
    return "\n".join(f"  {key:<{width}}  {flat[key]!r}" for key in SUMMARY_KEYS)


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line: numbers with 4 significant digits, lists left out."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, int):
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _init_distributed() -> bool:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _fail(exc: BaseException) -> int:
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, whatever the message
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_core.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key (repeatable), e.g. --set loss.k=5")
    parser.add_argument("--resume", metavar="CKPT", help="checkpoint file or folder to resume from")
    parser.add_argument("--eval-only", action="store_true", help="evaluate (the resumed model) without training")
    args = parser.parse_args(argv)

    try:  # configuration errors first: they need no torch import
        cfg = Config.from_yaml(args.config, args.set)
        if args.resume and not os.path.exists(args.resume):
            raise FileNotFoundError(f"checkpoint not found: {args.resume}")
    except (ConfigError, FileNotFoundError) as exc:
        return _fail(exc)
    if os.environ.get("RANK", "0") == "0":
        print(f"config {args.config}\n{summary(cfg)}", flush=True)

    from reid_core.data import DatasetError
    from reid_core.engine.checkpoint import CheckpointError
    from reid_core.engine.finite import NonFiniteError
    from reid_core.engine.trainer import Trainer

    started_dist = _init_distributed()
    try:
        trainer = Trainer(cfg)
        if args.resume:
            trainer.load_checkpoint(args.resume)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as exc:
        if started_dist:
            import torch.distributed as dist

            dist.destroy_process_group()
        return _fail(exc)

    quiet = trainer.rank != 0
    if not quiet:
        print(trainer.dataset.describe())
        print(f"device {trainer.device}, {trainer.world_size} process(es), global batch {cfg.data.batch_size} "
              f"({cfg.data.batch_size // trainer.world_size} per process), {trainer.num_classes} training ids, "
              f"{trainer.iters_per_epoch} iterations/epoch, starting at epoch {trainer.epoch}", flush=True)
    start = time.perf_counter()

    def on_epoch_end(epoch: int, metrics: dict[str, Any]) -> None:
        if not quiet:
            print(f"epoch {epoch}/{cfg.train.epochs} {format_metrics(metrics)}", flush=True)

    try:
        metrics = {"epoch": trainer.epoch, **trainer.evaluate()} if args.eval_only else trainer.fit(on_epoch_end)
        metrics["skipped_images"] = trainer.skipped_images()  # every rank: a sum over ranks
    except NonFiniteError as exc:  # the training diverged: the message names the step, the terms and the fix
        return _fail(exc)
    finally:
        trainer.close()
        if started_dist:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not quiet:
        seconds = time.perf_counter() - start
        print(f"final {format_metrics(metrics)} seconds={seconds:.1f}", flush=True)
        if not args.eval_only:
            print(f"checkpoint  : {trainer.checkpoint_dir / 'checkpoint.pt'} (resume with --resume)\n"
                  f"TensorBoard : {trainer.logger.log_dir} (tensorboard --logdir {trainer.logger.log_dir})",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
