"""The Tune trainable of a study: one Tune trial trains one configuration, in one of two ways.

- **One worker** (``workers_per_trial: 1``, the common case): the trial's own process runs the training
  loop (:func:`study.trial.worker.run_in_trial`) and reserves the worker's CPUs and GPUs itself. Nothing else
  starts, and Tune reuses trial processes (``reuse_actors``), so a trial starts in about a second.
  Checkpoints go to Tune (``ray.tune.report``); a trial whose process dies is retried by Tune from its
  last checkpoint (``tune.get_checkpoint()``), so worker retries are Tune trial retries on this path.
- **Several workers** (DDP): Ray 2.60 no longer accepts a ``TorchTrainer`` in ``tune.Tuner``; the Tune
  function trainable builds one and calls ``fit()``, and ``TuneReportCallback`` forwards every
  ``ray.train.report`` of the rank-0 worker to Tune. The Train run is named ``train`` and stored in the
  Tune trial's folder (``<storage>/<study>/<trial folder>/train``); Ray Train restores it from the
  checkpoint manager snapshot it finds there, so when Tune retries a failed trial or resumes an
  interrupted study, the new ``TorchTrainer`` hands the workers their latest checkpoint. Worker deaths
  inside a run are retried by Train itself (``FailureConfig(max_failures)``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ray import tune
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.tune.integration.ray_train import TuneReportCallback

from reid_core.config import ConfigError
from study.space.plan import dataset_key, params_key, trial_params
from study.space.schema import trial_config
from study.trial.errors import PreflightError, error_result, read_trial_error
from study.trial.worker import run_in_trial, train_loop

TRAIN_RUN_NAME = "train"
# A several-worker trial's own process only waits on its Train run; it reserves a sliver of memory rather
# than a CPU share, so that N one-CPU trials fit on N CPUs (a CPU share of 0.01 would leave the Nth trial's
# worker 0.99 CPU short). The Train workers reserve the CPUs and GPUs.
TRIAL_MEMORY_BYTES = 64 * 1024 * 1024


@dataclass
class TrialSetup:
    """What every trial of a study shares (passed to the trainable with ``tune.with_parameters``)."""

    base: dict[str, Any]  # flattened base Config of the study
    storage: str  # study storage root (folder or URI); the study folder is <storage>/<study>
    study: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    worker_retries: int = 2
    eval_epochs: list[int] = field(default_factory=list)  # ASHA rungs
    metric: str = "mAP"
    mode: str = "max"
    fail_hook: dict[str, Any] | None = None  # tests: {"epoch": N, "marker": path}
    worker_env: dict[str, str] = field(default_factory=dict)
    # The plan's validated Config per study.space.params_key (grid / random trials): used as it is.
    planned: dict[str, Any] = field(default_factory=dict)
    # The driver's dataset index per study.space.plan.dataset_key (Ray object references): trials train
    # from it instead of reading the dataset again.
    datasets: dict[str, Any] = field(default_factory=dict)

    @property
    def in_process(self) -> bool:
        """Whether trials train in the Tune trial's own process (one worker) rather than a TorchTrainer."""
        return self.workers == 1


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: train the trial to the end (or until Tune stops it), in this process or in
    a TorchTrainer. A deterministic error (config or data) is reported once and raised, and not retried
    (see :mod:`study.trial.errors`)."""
    os.umask(0o077)  # the trial's files owner-only, on any node
    cfg = setup.planned.get(params_key(config))
    if cfg is None:  # an Optuna trial: its values were drawn at run time
        try:
            cfg = trial_config(setup.base, trial_params(config))
        except ConfigError as exc:
            tune.report(error_result(exc, setup.metric))
            raise
    trial_dir = PurePosixPath(tune.get_context().get_trial_dir()).name
    trial_folder = f"{setup.storage.rstrip('/')}/{setup.study}/{trial_dir}"
    loop = {"config": cfg, "eval_epochs": setup.eval_epochs, "metric": setup.metric, "mode": setup.mode,
            "fail_hook": setup.fail_hook, "dataset": setup.datasets.get(dataset_key(cfg)),
            "trial_folder": trial_folder, "gpu_share": setup.gpus_per_worker}  # what run_loop needs
    read_trial_error(trial_folder, remove=True)  # one left by an earlier attempt (a resumed study reruns errors)
    if setup.in_process:
        os.environ.update(setup.worker_env)  # what Train would have put in its workers' environment
        run_in_trial(loop)
    else:
        _fit_torch_trainer(loop, setup)
    message = read_trial_error(trial_folder)
    if message:  # the loop stopped on a deterministic error (already reported to Tune)
        raise PreflightError(message)


def _fit_torch_trainer(loop: dict[str, Any], setup: TrialSetup) -> None:
    # ray.train.torch imports torch: a one-worker trial imports it in its loop, where import_s times it
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = setup.gpus_per_worker > 0
    resources = {"CPU": setup.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = setup.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=setup.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=TRAIN_RUN_NAME,
            storage_path=loop["trial_folder"],
            failure_config=FailureConfig(max_failures=setup.worker_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": setup.worker_env} if setup.worker_env else None,
            logging_config=LoggingConfig(log_level="WARNING"),  # per-report INFO lines drown the progress
        ),
    )
    trainer.fit()


def trial_resources(setup: TrialSetup) -> dict[str, float]:
    """What a Tune trial reserves: the worker's CPUs and GPUs in process, else a sliver of memory."""
    if not setup.in_process:
        return {"memory": TRIAL_MEMORY_BYTES}
    resources = {"CPU": setup.cpus_per_worker}
    if setup.gpus_per_worker > 0:
        resources["GPU"] = setup.gpus_per_worker
    return resources


def make_trainable(setup: TrialSetup) -> Any:
    """``train_trial`` bound to ``setup``, with its Tune resources."""
    bound = tune.with_parameters(train_trial, setup=setup)
    return tune.with_resources(bound, trial_resources(setup))
