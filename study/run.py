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
import csv
import io
import json
import logging
import os
import shlex
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from study.preflight import Preflight, PreflightError, error_line, preflight
from study.space import (_NAME_RE, SearchSpace, SpaceError, checked_params, load_space, parse_space, plan,
                         resolve_path, validate_plan)
from study.storage import DEFAULT_STORAGE, StorageError, StudyStorage, is_uri

STUDY_FILE = "study.json"
FAIL_HOOK_ENV = "MOREID_STUDY_FAIL_AT_EPOCH"  # tests: "<epoch>:<marker file>", a worker dies once
# Tune writes its experiment state at most this often (seconds); small so that a killed driver loses
# little (the state of a few trials is a few kB).
TUNE_CHECKPOINT_S = "2"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
DASHBOARD_WAIT_S = 30.0


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


# ---- space and plan -------------------------------------------------------------------------------------

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


def check_data(space: SearchSpace) -> None:
    """Real datasets need a root; relative roots are resolved (trial workers run in other folders)."""
    dataset, root = space.base["data.dataset"], space.base["data.root"]
    if dataset != "synthetic" and not root:
        raise SpaceError(f"{space.source}: data.root is empty for dataset {dataset}: give --data-root")
    if root and not is_uri(root) and not Path(root).is_absolute():
        space.base["data.root"] = str(Path(root).resolve())


def print_plan(space: SearchSpace, trials: list, limit: int = 40) -> None:
    print(space.describe())
    print(f"  data: {space.base['data.dataset']}"
          + (f" at {space.base['data.root']}" + ("" if Path(space.base['data.root']).exists() else
                                                 " (not found on this machine: it must exist on the workers)")
             if space.base["data.root"] else " (generated into the cache)")
          + f", {space.epochs} epochs, eval every {space.base['train.eval_period']}")
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


# ---- Ray ------------------------------------------------------------------------------------------------

def init_ray(address: str | None) -> bool:
    """Connect to ``address`` or start a local Ray with its dashboard on. Returns whether this process
    started Ray.

    Ray Train's placement-group cleaner asks the State API (served by the dashboard) whether a trial's
    Train controller is still alive; without an answer, a trial that Tune stops early (ASHA) never gives
    its workers' resources back and the next trial waits forever. Its client finds the dashboard by
    auto-detection, which fails when this machine runs more than one Ray instance ("Found multiple
    active Ray instances"), so every process of the study is told the address explicitly through the
    job's runtime environment (``RAY_API_SERVER_ADDRESS``).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", TUNE_CHECKPOINT_S)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's own TensorBoard logger would put a second, differently keyed run in every trial folder;
    # the study writes its own (tensorboard/<trial_id>/). The CSV and JSON loggers are passed explicitly.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Trial processes print nothing to this console (their output goes to Ray's log files): the study's
    # Progress callback prints one line per trial and evaluation, and a failed trial's error in full.
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        deadline = time.time() + DASHBOARD_WAIT_S  # a head that just started registers its dashboard late
        while True:
            url = ray.init(address=address, **quiet).dashboard_url
            ray.shutdown()  # only a connection: the cluster stays up
            if url or time.time() > deadline:
                break
            time.sleep(2.0)
        if not url:
            raise SpaceError(f"the Ray cluster at {address} runs without its dashboard; start it with "
                             f"--include-dashboard=true (and ray[default] installed): Ray Train needs it to "
                             f"release the resources of trials stopped early")
        ray.init(address=address, runtime_env={"env_vars": _job_env(url)}, **quiet)
        return False
    port = _free_port()
    url = f"127.0.0.1:{port}"
    # address="local": never join a cluster that `ray start` left on this machine (ray_current_cluster).
    try:
        context = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                           runtime_env={"env_vars": _job_env(url)}, **quiet)
    except Exception as exc:  # Ray's own start-up failures (a node that timed out on an overloaded machine)
        raise RayStartError(f"Ray did not start on this machine: {error_line(exc)}; run the study again "
                            f"(no study file was written)") from exc
    if context.dashboard_url != url:
        ray.shutdown()
        raise RuntimeError(f"Ray's dashboard came up at {context.dashboard_url!r} instead of {url}; "
                           f"run the study again (the port was taken meanwhile)")
    return True


class RayStartError(RuntimeError):
    """The local Ray did not start (not the user's input: exit status 1)."""


def _job_env(dashboard_url: str) -> dict[str, str]:
    """Environment of every process of the study's Ray job."""
    return {
        API_SERVER_ENV: f"http://{dashboard_url}",
        # Several trials share a machine's cores; OpenMP's default busy-waiting then starves the other
        # trials (a ResNet-18 step measured 10-100x slower on a loaded 2-core machine).
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_local_resources(space: SearchSpace) -> None:
    """On the local Ray, a trial that can never be placed is an error now rather than a hang later."""
    import ray

    total = ray.cluster_resources()
    r = space.resources
    need_cpu, need_gpu = r.workers_per_trial * r.cpus_per_worker, r.workers_per_trial * r.gpus_per_worker
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0):
        raise SpaceError(f"a trial needs {need_cpu:g} CPU and {need_gpu:g} GPU ({r.workers_per_trial} worker(s) x "
                         f"{r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU) but this machine offers "
                         f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU: lower --workers-per-trial, "
                         f"--cpus-per-worker or --gpus-per-worker")


def fail_hook() -> dict[str, Any] | None:
    text = os.environ.get(FAIL_HOOK_ENV)
    if not text:
        return None
    epoch, _, marker = text.partition(":")
    if not epoch.isdigit() or not marker:
        raise SpaceError(f"{FAIL_HOOK_ENV} must read '<epoch>:<marker file>', got {text!r}")
    return {"epoch": int(epoch), "marker": marker}


def trial_retries(space: SearchSpace) -> int:
    """Tune's retries of a failed trial. A one-worker trial trains in its own process, so a worker death is
    a trial failure there: it gets the worker retries too."""
    workers = space.retries.workers if space.resources.workers_per_trial == 1 else 0
    return space.retries.trials + workers


def run_study(space: SearchSpace, storage: StudyStorage, *, resume: bool, address: str | None,
              extra_callbacks: Sequence[Any] = (), checked: Preflight | None = None,
              study_file: dict[str, Any] | None = None, resume_command: str = "",
              optuna_url: str | None = None) -> int:
    """Run (or resume) the study; prints progress and the final table. Returns the exit status: 0 when
    every trial ran to its end, 1 when some failed, 2 when every trial failed on the same deterministic
    error, 130 when interrupted (Ctrl-C). ``extra_callbacks``: more Tune callbacks for a new study
    (benchmarks time trials with one). ``checked``: the driver's preflight (run here when None; datasets
    it left to the cluster are read now). ``study_file``: written as study.json once Ray is up.
    ``optuna_url``: the Optuna record's SQLAlchemy URL (default: ``optuna.db`` in the study folder)."""
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from study.callbacks import (SAME_ERROR_TRIALS, NoRetryOnTrialError, Progress, ResultsCsv, SameErrorStopper,
                                 TensorBoardHParams, TrialInfo)
    from study.nodes import check_storage_visible
    from study.optuna_record import OPTUNA_DB, OptunaRecorder
    from study.searcher import StudySearcher
    from study.trainable import TrialSetup, make_trainable

    started = time.time()
    if checked is None:
        checked = run_preflight(space, generate=True, unseen="defer" if address else "error")
    started_ray = init_ray(address)
    _forget_previous_session()
    try:
        if started_ray:
            check_local_resources(space)
        if not storage.remote:  # a folder on a multi-node cluster must be shared by every node
            check_storage_visible(storage.local)
        where = "started locally" if started_ray else f"at {address}"
        print(f"Ray {where}: {_resource_line(ray.cluster_resources())}", flush=True)
        if checked.deferred:
            checked = run_preflight(space, generate=True, unseen="remote", done=checked)
            print("\n".join(checked.lines()), flush=True)
        if study_file is not None:
            storage.write_text(STUDY_FILE, json.dumps(study_file, indent=2))

        r = space.resources
        env = {k: os.environ[k] for k in ("MOREID_CACHE",) if os.environ.get(k)}
        # The driver's dataset index goes to the trials through Ray's object store (read once, not per
        # trial). A synthetic dataset lives in this machine's cache: on a cluster, workers make their own.
        index = {key: value if isinstance(value, ray.ObjectRef) else ray.put(value)
                 for key, value in checked.index.items() if started_ray or not key.startswith("synthetic|")}
        setup = TrialSetup(base=space.base, storage=storage.root, study=storage.name, workers=r.workers_per_trial,
                           cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
                           worker_retries=space.retries.workers, eval_epochs=space.scheduler.milestones(),
                           metric=space.metric, mode=space.mode, fail_hook=fail_hook(), worker_env=env,
                           datasets=index)
        trainable = make_trainable(setup)
        record = optuna_record(space, storage, optuna_url)
        if resume:
            print(f"resuming the study in {storage.uri}", flush=True)
            tuner = tune.Tuner.restore(storage.uri, trainable, resume_unfinished=True, resume_errored=True)
        else:
            info = TrialInfo(space.base, space.searched_keys)
            total = space.total_trials()
            record.create(space.cells())
            callbacks = [NoRetryOnTrialError(), ResultsCsv(storage, storage.name, info),
                         TensorBoardHParams(storage, info, space), OptunaRecorder(record, space.metric, info.epochs),
                         Progress(info, space.metric, total), CSVLoggerCallback(), JsonLoggerCallback(),
                         *extra_callbacks]
            if space.scheduler.type == "asha":
                scheduler = ASHAScheduler(time_attr="epoch", max_t=space.epochs,
                                          grace_period=space.scheduler.grace_epochs,
                                          reduction_factor=space.scheduler.reduction_factor)
            else:
                scheduler = FIFOScheduler()
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=StudySearcher(space, record),
                                            scheduler=scheduler, num_samples=total,
                                            max_concurrent_trials=r.max_concurrent, reuse_actors=setup.in_process),
                run_config=tune.RunConfig(name=storage.name, storage_path=storage.root, callbacks=callbacks,
                                          failure_config=tune.FailureConfig(max_failures=trial_retries(space)),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                          stop=SameErrorStopper(min(space.total_trials(), SAME_ERROR_TRIALS)),
                                          verbose=0),
            )
        tuner.fit()
        if storage.path(OPTUNA_DB).is_file():
            storage.upload(OPTUNA_DB)
        outcome = study_outcome(storage, space.total_trials())
        print_summary(space, storage, time.time() - started, outcome, record)
        if outcome.interrupted:
            write_report(storage, partial=f"partial: {outcome.finished} of {outcome.total} trials finished "
                                          f"(interrupted); resume with: {resume_command}", record=record)
            print(f"interrupted: {outcome.finished} of {outcome.total} trials finished; resume with: "
                  f"{resume_command}", file=sys.stderr, flush=True)
            return 130
        write_report(storage, partial="" if outcome.complete else
                     f"partial: {outcome.finished} of {outcome.total} trials ran to their end", record=record)
        if outcome.same_error:
            print(f"error: every trial failed the same way, the study stopped: {outcome.same_error}",
                  file=sys.stderr, flush=True)
            return 2
        return 0 if outcome.complete else 1
    finally:
        ray.shutdown()  # stops the local Ray this process started; only disconnects from an existing one


def _forget_previous_session() -> None:
    """Ray Tune caches, per process, the job id of the first Ray session as the key prefix of its trainable
    registry; a second study run from the same process (tests, benchmarks) on another session would
    register its trainable under the old job's prefix and its trials would die unscheduled. Reset it."""
    from ray.tune import registry

    registry._global_registry._prefix = None


def _resource_line(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


@dataclass
class Outcome:
    """How a study's trials ended, from results.csv: ``finished`` ran to their end (TERMINATED or
    STOPPED by the scheduler), ``errors`` failed; ``same_error``: the message when the study stopped
    because its first trials all failed on one deterministic error."""

    total: int
    finished: int = 0
    errors: int = 0
    same_error: str = ""

    @property
    def complete(self) -> bool:
        return self.finished == self.total

    @property
    def interrupted(self) -> bool:
        return self.finished + self.errors < self.total and not self.same_error


def study_outcome(storage: StudyStorage, total: int) -> Outcome:
    import pandas as pd

    from study.callbacks import RESULTS_FILE, SAME_ERROR_TRIALS

    out = Outcome(total)
    path = storage.path(RESULTS_FILE)
    if not path.is_file():
        return out
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    out.finished = int(table["status"].isin(["TERMINATED", "STOPPED"]).sum())
    failed = table[table["status"] == "ERROR"]
    out.errors = len(failed)
    messages = set(failed.get("error", pd.Series(dtype=str)))
    if (not out.finished and out.errors >= min(total, SAME_ERROR_TRIALS) and len(messages) == 1
            and "traceback:" not in next(iter(messages))):
        out.same_error = next(iter(messages))
    return out


def optuna_record(space: SearchSpace, storage: StudyStorage, url: str | None) -> Any:
    """The study's Optuna record (``url``: SQLAlchemy URL; default ``optuna.db`` in the study folder)."""
    from study.optuna_record import OptunaRecord, default_url, study_names

    if not url:
        storage.local.mkdir(parents=True, exist_ok=True)
    return OptunaRecord(url or default_url(storage.local), study_names(space, storage.name), space.mode)


def print_summary(space: SearchSpace, storage: StudyStorage, seconds: float, outcome: Outcome | None = None,
                  record: Any = None) -> None:
    import pandas as pd

    from study.callbacks import RESULTS_FILE, TENSORBOARD_DIR
    from study.summary import closing_summary

    path = storage.path(RESULTS_FILE)
    how = "done" if outcome is None or outcome.complete else (
        f"ended with {outcome.finished} of {outcome.total} trials finished" + (f", {outcome.errors} failed"
                                                                              if outcome.errors else ""))
    print(f"\nstudy {storage.name} {how} in {seconds / 60:.1f} min", flush=True)
    if path.is_file():
        table = pd.read_csv(path)
        metric = f"best_{space.metric}"
        tails = [k.split(".")[-1] for k in space.searched_keys]
        short = {k: (t if tails.count(t) == 1 else k) for k, t in zip(space.searched_keys, tails)}
        columns = ["trial_id", "status", "epochs", *space.searched_keys, f"final_{space.metric}", metric,
                   "best_R1", "best_mINP", "best_epoch"]
        if "skipped_images" in table and (pd.to_numeric(table["skipped_images"], errors="coerce") > 0).any():
            columns.append("skipped_images")
        if "error" in table and table["error"].notna().any():
            columns.append("error")
        shown = table[[c for c in columns if c in table.columns]].rename(columns=short)
        shown = shown.sort_values(metric, ascending=space.mode == "min", na_position="last")
        metrics = {c for c in shown.columns if c.startswith(("final_", "best_")) and c != "best_epoch"}
        formatters = {c: (lambda v: "" if pd.isna(v) else f"{v:.2f}") if c in metrics else
                      (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)) for c in shown.columns}
        print(shown.to_string(index=False, formatters=formatters))
        print("\n" + "\n".join(closing_summary(table, space.searched_keys, space.metric, space.mode,
                                                   study=storage.location())))
    print(f"\nresults table : {storage.location(RESULTS_FILE)}")
    print(f"TensorBoard   : {storage.location(TENSORBOARD_DIR)}   (tensorboard --logdir {storage.location(TENSORBOARD_DIR)})")
    print(f"Tune folder   : {storage.uri}   (trials, checkpoints; resume with --resume)")
    if record is not None:
        print(f"Optuna record : optuna-dashboard {record.url}")
    if storage.remote:
        print(f"local copy    : {storage.local}")


def write_report(storage: StudyStorage, partial: str = "", record: Any = None) -> None:
    """``study.results.write_report`` (results.md and plots) when that module is present. ``partial``:
    a line that heads results.md when not every trial finished. ``record``: the study's Optuna record,
    whose parameter importances are appended."""
    try:
        from study.results import write_report as report
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("study.results"):
            print("results.md not written: the study.results module is not installed", flush=True)
            return
        raise
    try:
        path = report(storage.local)
        if record is not None:
            from study.importance import append_importances

            append_importances(record, path)
    except Exception:  # the study itself succeeded: report the failure loudly and keep the exit status
        traceback.print_exc()
        print(f"results.md NOT written: study.results.write_report({storage.local}) failed (traceback above)",
              file=sys.stderr, flush=True)
        return
    if partial and Path(path).is_file():
        Path(path).write_text(f"**{partial}**\n\n{Path(path).read_text()}")
    for name in ("results.md", "plots"):
        if storage.path(name).exists():
            storage.upload(name)
    print(f"report        : {storage.location(Path(path).name)}", flush=True)


# ---- entry point ----------------------------------------------------------------------------------------

# --set keys a resumed study may change: where the data are and how they are read, never what a trial
# trains (its finished trials would not be comparable with the rest).
RESUME_KEYS = ("data.root", "data.workers", "eval.batch_size", "eval.memory_budget_mb")
STORAGE_WAIT_S = 10.0  # a storage URI that does not answer in this time is reported unreachable
ADDRESS_WAIT_S = 5.0
GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # an RPC every Ray head's GCS serves (empty request)


def check_name(name: str | None) -> None:
    """A study name is one folder under --storage (a word, like a space's name)."""
    if name is not None and not _NAME_RE.match(name):
        raise SpaceError(f"--name {name!r}: must be a word of letters, digits, '-' or '_' (it names the study "
                         f"folder under --storage)")


def check_storage(storage: StudyStorage) -> None:
    """The storage root must be a folder (or creatable as one) or a URI that answers."""
    if storage.remote:
        storage.check_reachable(STORAGE_WAIT_S)
        return
    path = Path(storage.root)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise SpaceError(f"--storage {storage.root}: {folder} is a file, not a folder: give a folder "
                                 f"(created if missing) or a URI such as s3://bucket/studies")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise SpaceError(f"--storage {storage.root}: {folder} is not writable")
            return


def check_address(address: str) -> None:
    """An explicit ``host:port`` must be a Ray head's GCS that answers: one gRPC call with a deadline
    (``ray.init`` itself retries an unreachable or wrong address for minutes)."""
    if address == "auto" or address.startswith("local"):
        return
    target = address.split("://")[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SpaceError(f"--address {address!r}: expected auto or host:port (e.g. 10.0.0.1:6379)")
    import grpc  # a dependency of Ray, much lighter than importing Ray

    channel = grpc.insecure_channel(target)
    try:
        channel.unary_unary(GCS_PROBE)(b"", timeout=ADDRESS_WAIT_S)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:  # a Ray head with token authentication: it answered
            return
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise SpaceError(f"--address {address}: no answer within {ADDRESS_WAIT_S:g} s (unreachable host or a "
                             f"firewall): check the head node's address") from None
        if code == grpc.StatusCode.UNAVAILABLE:
            raise SpaceError(f"--address {address}: cannot connect (nothing listens there): is a Ray head running "
                             f"there? (ray start --head --port {port})") from None
        raise SpaceError(f"--address {address}: something answers there, but not a Ray head ({code.name}): "
                         f"give the head's GCS address (ray start --head prints it)") from None
    finally:
        channel.close()


def run_preflight(space: SearchSpace, *, generate: bool, unseen: str, done: Preflight | None = None,
                  trials: list | None = None) -> Preflight:
    """Every trial config of ``space`` (Optuna: the draws that stand for it) checked against its data."""
    trials = plan(space) if trials is None else trials
    configs = (space.config_for(params) for params in checked_params(space, trials))
    return preflight(configs, space.resources.workers_per_trial, generate=generate, unseen=unseen, done=done)


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
        storage = StudyStorage(args.storage, name)
        check_storage(storage)
        text = storage.read_text(STUDY_FILE)
        if text is None:
            raise SpaceError(f"nothing to resume: {storage.location(STUDY_FILE)} does not exist "
                             f"(start the study without --resume)")
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


def check_optuna_storage(args: argparse.Namespace, space: SearchSpace, storage: StudyStorage,
                         study_file: dict[str, Any], replaced: bool = False) -> str | None:
    """The Optuna storage URL of the study (None: the default SQLite file in the study folder), reachable,
    and holding this study's Optuna studies exactly when resuming. ``replaced``: the study folder was just
    replaced (``--restart``, or a study with no finished trial), so its Optuna studies go too. The URL is
    recorded in ``study_file`` (study.json), where ``--resume`` finds it."""
    from study.optuna_record import OPTUNA_DB

    url = args.optuna_storage
    if args.resume:
        saved = study_file.get("optuna_storage")
        if url and saved and url != saved:
            raise SpaceError(f"this study records its Optuna trials in {saved}; resume it without "
                             f"--optuna-storage or with that URL")
        url = url or saved
    study_file["optuna_storage"] = url
    if not url and not storage.path(OPTUNA_DB).is_file():
        return url  # the default SQLite file, not made yet: nothing to open (nor to leave behind)
    record = optuna_record(space, storage, url)
    try:
        existing = record.existing()
    except Exception as exc:  # SQLAlchemy: bad URL, no driver, server unreachable, no such database
        reason = getattr(exc, "orig", None) or exc  # the database driver's own message, when there is one
        detail = " ".join(line.strip() for line in str(reason).splitlines() if line.strip())
        raise SpaceError(f"cannot open the Optuna storage {record.url}: {type(reason).__name__}: {detail}") from exc
    if existing and not args.resume:
        if not replaced:
            raise SpaceError(f"the Optuna storage {record.url} already holds the study {existing[0]!r}: pass "
                             f"--resume to carry it on, or --name for a new one")
        record.delete(existing)
    return url


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


def replace_unfinished(storage: StudyStorage, restart: bool) -> bool:
    """A study folder already there is replaced when none of its trials finished (a failed start, or
    every trial failed) or with --restart; else it is an error pointing at --resume. Returns whether
    one was replaced."""
    from study.callbacks import RESULTS_FILE

    if not storage.exists():
        return False
    finished = 0
    text = storage.read_text(RESULTS_FILE)
    if text:
        rows = list(csv.DictReader(io.StringIO(text)))
        finished = sum(1 for row in rows if row.get("status") in ("TERMINATED", "STOPPED"))
    if finished and not restart:
        raise SpaceError(f"a study already exists in {storage.uri} with {finished} finished trial(s): pass "
                         f"--resume to carry it on, --restart to replace it, or --name / --storage for a new one")
    print(f"replacing the study in {storage.uri} ({finished} finished trial(s))", flush=True)
    storage.remove()
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.resume and args.restart:
            raise SpaceError("--resume and --restart exclude each other")
        check_name(args.name)
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
    try:
        if args.address:
            check_address(args.address)
        if args.resume:
            from ray import tune

            if not tune.Tuner.can_restore(storage.uri):
                raise SpaceError(f"{storage.uri} holds no Tune experiment to resume (no trial ever started): "
                                 f"start it again without --resume")
        else:
            replaced = replace_unfinished(storage, args.restart)
        optuna_url = check_optuna_storage(args, space, storage, study_file, replaced=not args.resume and replaced)
        return run_study(space, storage, resume=args.resume, address=args.address, checked=checked,
                         study_file=study_file, resume_command=resume_command(args, storage), optuna_url=optuna_url)
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
