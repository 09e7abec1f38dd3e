"""Run a hyperparameter study: ``python -m study.run <space> [options]``.

``<space>`` names a file in ``search_spaces/`` (``quickstart``) or is a path to a YAML file. The study
lives in ``<storage>/<study name>/``: Ray Tune's experiment (one folder per trial, checkpoints included),
``results.csv`` (one row per trial), ``tensorboard/<trial_id>/`` (scalars + HParams), ``study.json`` (the
space as run, for ``--resume``) and, at the end, ``results.md`` and ``plots/`` (``study.results``).

Examples::

    python -m study.run quickstart                       # the demo: 8 small trials on synthetic data
    python -m study.run npair_k --dry-run                # validate and print the trial plan
    python -m study.run ranked_list --data-root /data/VeRi --storage s3://bucket/studies --address auto
    python -m study.run ranked_list --resume             # carry on after the driver was killed
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from study.driver.checks import (check_address, check_data, check_optuna_storage, check_space_name, check_storage,
                                 check_study_name, replace_unfinished, run_preflight)
from study.driver.storage import DEFAULT_STORAGE, StorageError, StudyStorage, is_uri
from study.layout import STUDY_FILE
from study.space import SearchSpace, SpaceError, load_space, parse_space, resolve_path, validate_plan
from study.space.plan import batch_lines
from study.trial.errors import PreflightError, error_line

# --set keys a resumed study may change: where the data are and how they are read, never what a trial
# trains (its finished trials would not be comparable with the rest).
RESUME_KEYS = ("data.root", "data.workers", "eval.batch_size", "eval.memory_budget_mb")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Examples::")[1])
    p.add_argument("space", help="a search space name (file in search_spaces/) or a path to a YAML file")
    p.add_argument("--dataset", help="override data.dataset of the space's base config")
    p.add_argument("--data-root", help="override data.root (the dataset folder, on every node)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"folder or URI (s3://, gs://, ...) holding studies (default: ./{DEFAULT_STORAGE})")
    p.add_argument("--name", help="study name (default: the space's name); the folder is <storage>/<name>")
    p.add_argument("--num-samples", type=int, help="trials per grid cell (Optuna: proposals per cell)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers (DDP processes) per trial")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (0: CPU training with gloo)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker")
    p.add_argument("--address", help="an existing Ray cluster (e.g. auto, 10.0.0.1:6379); default: start a local one")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="SQLAlchemy URL of the Optuna record (postgresql://user@host/db); default: "
                        "sqlite:///<study folder>/optuna.db")
    p.add_argument("--resume", action="store_true",
                   help="resume the study in <storage>/<name> without re-running finished trials (may take a "
                        "corrected --data-root; the searched space stays as it was started)")
    p.add_argument("--restart", action="store_true",
                   help="replace the study in <storage>/<name>, finished trials included, with a new one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the base (loss.margin=0.2; pins a searched key) or a space "
                        "setting (scheduler.grace_epochs=2, seeds=[0,1], searcher.seed=3); repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trial plan; train nothing")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    if args.dataset:
        out.append(f"data.dataset={args.dataset}")
        if not args.data_root:
            out.append("data.root=")  # the space's root belongs to its own dataset
    if args.data_root:
        root = args.data_root if is_uri(args.data_root) else str(Path(args.data_root).expanduser().resolve())
        out.append(f"data.root={root}")
    if args.num_samples is not None:
        out.append(f"num_samples={args.num_samples}")
    return out


def _resources(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_concurrent": args.max_concurrent, "workers_per_trial": args.workers_per_trial,
            "gpus_per_worker": args.gpus_per_worker, "cpus_per_worker": args.cpus_per_worker}


def print_plan(space: SearchSpace, trials: list, limit: int = 40) -> None:
    print(space.describe())
    print(f"  data: {space.base['data.dataset']}"
          + (f" at {space.base['data.root']}" + ("" if Path(space.base['data.root']).exists() else
                                                 " (not found on this machine: it must exist on the workers)")
             if space.base["data.root"] else " (generated into the cache)")
          + f", {space.epochs} epochs, eval every {space.base['train.eval_period']}")
    for line in batch_lines(getattr(trials, "configs", None) or [], space.resources.workers_per_trial):
        print(f"  {line}")
    print(f"trial plan ({len(trials)} trials):")
    if space.searcher == "optuna":
        sampled = ", ".join(p.name for p in space.sampled_params)
        for index, cell in enumerate(space.cells()):
            values = " ".join(f"{k}={_short(v)}" for k, v in cell.items()) or "(base config)"
            print(f"  cell {index:2d}  {values}: {space.num_samples} trials, Optuna TPE "
                  f"(seed {space.searcher_seed + index}) picks {sampled}")
        return
    for index, trial in enumerate(trials[:limit]):
        values = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items()) or "(base config)"
        print(f"  {index:3d}  cell {trial.cell:2d}  {values}")
    if len(trials) > limit:
        print(f"  ... {len(trials) - limit} more")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def resume_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides a resumed study takes (``--data-root``, ``--set`` of RESUME_KEYS); any other setting
    is refused by name, since the study keeps the space and settings it started with."""
    refused = [flag for flag, value in (("--dataset", args.dataset), ("--num-samples", args.num_samples),
                                        ("--max-concurrent", args.max_concurrent),
                                        ("--workers-per-trial", args.workers_per_trial),
                                        ("--gpus-per-worker", args.gpus_per_worker),
                                        ("--cpus-per-worker", args.cpus_per_worker)) if value is not None]
    out = []
    for text in args.set:
        key = text.partition("=")[0].strip()
        if key in RESUME_KEYS:
            out.append(text)
        else:
            refused.append(f"--set {key}")
    if refused:
        raise SpaceError(f"--resume keeps the settings the study started with: {', '.join(refused)} cannot change "
                         f"(a resumed study may take --data-root and --set {', --set '.join(RESUME_KEYS[1:])}); "
                         f"start a new study with another --name, or --restart to replace this one")
    if args.data_root:
        root = args.data_root if is_uri(args.data_root) else str(Path(args.data_root).expanduser().resolve())
        out.append(f"data.root={root}")
    return out


def load_for_run(args: argparse.Namespace) -> tuple[SearchSpace, StudyStorage, dict[str, Any]]:
    """The space to run, its storage and what study.json records. A resumed study reads the space it
    was started with from ``study.json`` (edits to the YAML file in between do not change it), with the
    corrections :func:`resume_overrides` allows applied after its own overrides."""
    if args.resume:
        corrections = resume_overrides(args)
        name = args.name or _space_name(args.space)
        if not args.name:  # --name was checked by main
            check_space_name(name, str(resolve_path(args.space)))
        storage = StudyStorage(args.storage, name)
        check_storage(storage)
        text = storage.read_text(STUDY_FILE)
        if text is None:
            raise SpaceError(f"nothing to resume: {storage.location(STUDY_FILE)} does not exist "
                             f"(start the study without --resume)")
        storage.check_private()  # before anything unpickles the study's state
        saved = json.loads(text)
        saved["overrides"] = [*saved["overrides"], *corrections]
        space = parse_space(saved["space"], source=saved["source"], overrides=saved["overrides"],
                            resources=saved["resources"])
        for text in corrections:
            print(f"resume: {text} applied", flush=True)
        return space, storage, saved
    raw = yaml.safe_load(resolve_path(args.space).read_text())
    space = load_space(args.space, _overrides(args), _resources(args))
    storage = StudyStorage(args.storage, args.name or space.name)
    check_storage(storage)
    return space, storage, {"space": raw, "source": space.source, "overrides": _overrides(args),
                            "resources": _resources(args)}


def _space_name(name_or_path: str) -> str:
    raw = yaml.safe_load(resolve_path(name_or_path).read_text())
    return raw.get("name") if isinstance(raw, dict) and raw.get("name") else Path(name_or_path).stem


def resume_command(args: argparse.Namespace, storage: StudyStorage) -> str:
    """The exact command that resumes this study."""
    space = str(Path(args.space).resolve()) if Path(args.space).is_file() else args.space
    words = [sys.executable, "-m", "study.run", space, "--storage", storage.root, "--name", storage.name, "--resume"]
    if args.address:
        words += ["--address", args.address]
    return shlex.join(words)


def main(argv: Sequence[str] | None = None) -> int:
    # Owner-only files and folders: the study folder, Ray's (Tune's and Train's pyarrow copies use the
    # process umask) and a local Ray's workers, which inherit it.
    previous = os.umask(0o077)
    try:
        return _main(argv)
    finally:
        os.umask(previous)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.resume and args.restart:
            raise SpaceError("--resume and --restart exclude each other")
        check_study_name(args.name)
        space, storage, study_file = load_for_run(args)
        check_data(space)
        trials = validate_plan(space)
        checked = run_preflight(space, generate=not args.dry_run, trials=trials,
                                unseen="defer" if args.address else "error")
    except (SpaceError, PreflightError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_plan(space, trials)
    print("\n".join(checked.lines()))
    if args.dry_run:
        print(f"dry run: nothing trained; the study would live in {storage.location()}")
        return 0
    if args.address:
        try:
            check_address(args.address)
        except SpaceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    # Ray is imported only now: a dry run and every input error above answer without it.
    from ray import tune

    from study.driver.ray_runtime import RayStartError
    from study.driver.study import run_study

    try:
        if args.resume:
            if not tune.Tuner.can_restore(storage.uri):
                raise SpaceError(f"{storage.uri} holds no Tune experiment to resume (no trial ever started): "
                                 f"start it again without --resume")
        else:
            replaced = replace_unfinished(storage, args.restart)
        optuna_url = check_optuna_storage(args, space, storage, study_file, replaced=not args.resume and replaced)
        return run_study(space, storage, resume=args.resume, address=args.address, checked=checked,
                         study_file=study_file, resume_command=resume_command(args, storage), optuna_url=optuna_url,
                         trials=trials)
    except (SpaceError, PreflightError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"error: --address {args.address}: {error_line(exc)}", file=sys.stderr)
        return 2
    except RayStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
