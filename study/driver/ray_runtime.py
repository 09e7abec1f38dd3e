"""The Ray runtime of a study's driver: start a local Ray (dashboard on) or connect to a cluster, and the
checks that need it. Imported only once a study is about to run (a dry run never imports Ray)."""
from __future__ import annotations

import logging
import os
import socket
import time

import ray
from ray.tune import registry

from study.space import SearchSpace, SpaceError
from study.trial.errors import error_line

# Tune writes its experiment state at most this often (seconds); small so that a killed driver loses
# little (the state of a few trials is a few kB).
TUNE_CHECKPOINT_S = "2"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
DASHBOARD_WAIT_S = 30.0


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
    total = ray.cluster_resources()
    r = space.resources
    need_cpu, need_gpu = r.workers_per_trial * r.cpus_per_worker, r.workers_per_trial * r.gpus_per_worker
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0):
        raise SpaceError(f"a trial needs {need_cpu:g} CPU and {need_gpu:g} GPU ({r.workers_per_trial} worker(s) x "
                         f"{r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU) but this machine offers "
                         f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU: lower --workers-per-trial, "
                         f"--cpus-per-worker or --gpus-per-worker")


def forget_previous_session() -> None:
    """Ray Tune caches, per process, the job id of the first Ray session as the key prefix of its trainable
    registry; a second study run from the same process (tests, benchmarks) on another session would
    register its trainable under the old job's prefix and its trials would die unscheduled. Reset it."""
    registry._global_registry._prefix = None


def resource_line(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
