"""Running a study on Ray Tune: the trials' shared setup, the Tuner (a new study's callbacks, scheduler and
searcher, or a resumed experiment), and the end (outcome, summary, report, exit status)."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from study.driver.checks import fail_hook, optuna_record, run_preflight
from study.driver.guards import SAME_ERROR_TRIALS, NoRetryOnTrialError, SameErrorStopper
from study.driver.nodes import check_storage_visible
from study.driver.outcome import print_summary, study_outcome, write_study_report
from study.driver.preflight import Preflight
from study.driver.ray_runtime import check_local_resources, forget_previous_session, init_ray, resource_line
from study.driver.storage import StudyStorage
from study.record.common import TrialInfo
from study.record.console import Progress
from study.record.optuna import OptunaRecorder
from study.record.results_csv import ResultsCsv
from study.record.tensorboard import TensorBoardHParams
from study.layout import OPTUNA_DB, STUDY_FILE
from study.search.optuna_record import OptunaRecord
from study.search.searcher import StudySearcher
from study.space import PlannedTrial, SearchSpace, planned_configs, validate_plan
from study.trial.trainable import TrialSetup, make_trainable


def trial_retries(space: SearchSpace) -> int:
    """Tune's retries of a failed trial. A one-worker trial trains in its own process, so a worker death is
    a trial failure there: it gets the worker retries too."""
    workers = space.retries.workers if space.resources.workers_per_trial == 1 else 0
    return space.retries.trials + workers


def run_study(space: SearchSpace, storage: StudyStorage, *, resume: bool, address: str | None,
              extra_callbacks: Sequence[Any] = (), checked: Preflight | None = None,
              study_file: dict[str, Any] | None = None, resume_command: str = "",
              optuna_url: str | None = None, trials: list[PlannedTrial] | None = None) -> int:
    """Run (or resume) the study; prints progress and the final table. Returns the exit status: 0 when
    every trial ran to its end, 1 when some failed, 2 when every trial failed on the same deterministic
    error, 130 when interrupted (Ctrl-C). ``extra_callbacks``: more Tune callbacks for a new study
    (benchmarks time trials with one). ``checked``: the driver's preflight (run here when None; datasets
    it left to the cluster are read now). ``study_file``: written as study.json once Ray is up.
    ``optuna_url``: the Optuna record's SQLAlchemy URL (default: ``optuna.db`` in the study folder).
    ``trials``: the plan as :func:`study.space.validate_plan` built it (built here when None)."""
    started = time.time()
    trials = validate_plan(space) if trials is None else trials
    if checked is None:
        checked = run_preflight(space, generate=True, unseen="defer" if address else "error", trials=trials)
    started_ray = init_ray(address)
    forget_previous_session()
    try:
        checked = _start(space, storage, address, started_ray, checked, trials, study_file)
        planned = planned_configs(trials)  # the plan's validated Configs: the trials and the records use them
        setup = _trial_setup(space, storage, checked, started_ray, planned)
        trainable = make_trainable(setup)
        record = optuna_record(space, storage, optuna_url)
        if resume:
            print(f"resuming the study in {storage.uri}", flush=True)
            tuner = tune.Tuner.restore(storage.uri, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = _new_tuner(space, storage, trainable, setup.in_process, record, trials, planned, extra_callbacks)
        tuner.fit()
        return _finish(space, storage, record, started, resume_command)
    finally:
        ray.shutdown()  # stops the local Ray this process started; only disconnects from an existing one


def _start(space: SearchSpace, storage: StudyStorage, address: str | None, started_ray: bool, checked: Preflight,
           trials: list[PlannedTrial], study_file: dict[str, Any] | None) -> Preflight:
    """The checks that need Ray (resources, a shared study folder, data left to the cluster), then
    study.json. Returns the preflight, completed."""
    if started_ray:
        check_local_resources(space)
    if not storage.remote:  # a folder on a multi-node cluster must be shared by every node
        check_storage_visible(storage.local)
    where = "started locally" if started_ray else f"at {address}"
    print(f"Ray {where}: {resource_line(ray.cluster_resources())}", flush=True)
    if checked.deferred:
        checked = run_preflight(space, generate=True, unseen="remote", done=checked, trials=trials)
        print("\n".join(checked.lines()), flush=True)
    if study_file is not None:
        storage.write_text(STUDY_FILE, json.dumps(study_file, indent=2))
    return checked


def _trial_setup(space: SearchSpace, storage: StudyStorage, checked: Preflight, started_ray: bool,
                 planned: dict[str, Any]) -> TrialSetup:
    """What every trial shares. The driver's dataset index goes to the trials through Ray's object store
    (read once, not per trial). A synthetic dataset lives in this machine's cache: on a cluster, workers
    make their own."""
    r = space.resources
    env = {k: os.environ[k] for k in ("MOREID_CACHE",) if os.environ.get(k)}
    index = {key: value if isinstance(value, ray.ObjectRef) else ray.put(value)
             for key, value in checked.index.items() if started_ray or not key.startswith("synthetic|")}
    # trial_base: model.pretrained as the verified local file (for trials built from the base at run time)
    return TrialSetup(base=checked.trial_base(space.base), storage=storage.root, study=storage.name,
                      workers=r.workers_per_trial,
                      cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
                      worker_retries=space.retries.workers, eval_epochs=space.scheduler.milestones(),
                      metric=space.metric, mode=space.mode, fail_hook=fail_hook(), worker_env=env,
                      datasets=index, planned=planned)


def _new_tuner(space: SearchSpace, storage: StudyStorage, trainable: Any, in_process: bool, record: OptunaRecord,
               trials: list[PlannedTrial], planned: dict[str, Any], extra_callbacks: Sequence[Any]) -> tune.Tuner:
    """A new study's Tuner: the records as callbacks, ASHA or FIFO, the study's searcher. ``in_process``:
    one-worker trials, whose processes Tune reuses."""
    info = TrialInfo(space.base, space.searched_keys, planned)
    total = space.total_trials()
    record.create(space.cells())
    callbacks = [NoRetryOnTrialError(), ResultsCsv(storage, storage.name, info),
                 TensorBoardHParams(storage, info, space), OptunaRecorder(record, space.metric, info.epochs),
                 Progress(info, space.metric, total), CSVLoggerCallback(), JsonLoggerCallback(),
                 *extra_callbacks]
    if space.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=space.epochs, grace_period=space.scheduler.grace_epochs,
                                  reduction_factor=space.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    r = space.resources
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode,
                                    search_alg=StudySearcher(space, record, trials=trials),
                                    scheduler=scheduler, num_samples=total,
                                    max_concurrent_trials=r.max_concurrent, reuse_actors=in_process),
        run_config=tune.RunConfig(name=storage.name, storage_path=storage.root, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=trial_retries(space)),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  stop=SameErrorStopper(min(total, SAME_ERROR_TRIALS)), verbose=0),
    )


def _finish(space: SearchSpace, storage: StudyStorage, record: OptunaRecord, started: float,
            resume_command: str) -> int:
    """The outcome, the closing summary and the report; the exit status (see :func:`run_study`)."""
    if storage.path(OPTUNA_DB).is_file():
        storage.upload(OPTUNA_DB)
    outcome = study_outcome(storage, space.total_trials())
    print_summary(space, storage, time.time() - started, outcome, record)
    if outcome.interrupted:
        write_study_report(storage, partial=f"partial: {outcome.finished} of {outcome.total} trials finished "
                                            f"(interrupted); resume with: {resume_command}", record=record)
        print(f"interrupted: {outcome.finished} of {outcome.total} trials finished; resume with: "
              f"{resume_command}", file=sys.stderr, flush=True)
        return 130
    write_study_report(storage, partial="" if outcome.complete else
                       f"partial: {outcome.finished} of {outcome.total} trials ran to their end", record=record)
    if outcome.same_error:
        print(f"error: every trial failed the same way, the study stopped: {outcome.same_error}",
              file=sys.stderr, flush=True)
        return 2
    return 0 if outcome.complete else 1
