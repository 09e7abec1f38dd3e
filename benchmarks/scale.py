"""Study driver at scale, by simulation: what one result costs the driver as a study grows.

One machine plays a cluster (``ray.cluster_utils.Cluster``): a head and two worker nodes, each worker node
declaring 4 GPUs it does not have. Every trial asks for one GPU and a quarter CPU, so up to 8 run at once,
and trains a ResNet-18 on CPU for 2 epochs of 2 steps on 32x16 images (evaluated each epoch; no
checkpoints: a checkpoint period beyond the budget turns them off). Studies of 50, 100 and 300 trials run
one after the other on the same cluster, each through ``study.driver.study.run_study`` like a real one, and report:

- **driver CPU per result**: the driver process's CPU time (Tune's loop, the study's callbacks, Ray's
  client threads) over the results it received, in ms;
- **driver memory**: the driver's resident memory before and at its peak during the study (sampled
  every 0.2 s), in MiB;
- **callbacks**: ms per result of ``results.csv``, TensorBoard and the console at the same trial count
  (``benchmarks.study.callback_costs``), and one whole ``results.csv`` rewrite.

Target: per-result costs flat in the trial count. ``python -m benchmarks --only scale [--quick]``; quick:
20 and 50 trials.
"""
from __future__ import annotations

import os
import resource
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks.study import callback_costs, load_average, timed_study
from study.space import parse_space

TRIAL_COUNTS = (50, 100, 300)
QUICK_TRIAL_COUNTS = (20, 50)
WORKER_NODES = 2
FAKE_GPUS_PER_NODE = 4
CPUS_PER_NODE = 1  # what each simulated node declares (the machine has 2 cores in all)


def space_dict(name: str, trials: int) -> dict[str, Any]:
    """``trials`` tiny trials: a grid over loss x framework, repeated over as many seeds as needed."""
    cells = 4
    return {
        "name": name,
        "description": "benchmark: simulated cluster",
        "base": {
            "data": {"dataset": "synthetic", "height": 32, "width": 16, "batch_size": 8, "num_instance": 4,
                     "workers": 0, "random_erasing": 0.0,
                     "synthetic": {"ids": 8, "cams": 2, "images_per_id_cam": 2, "height": 32, "width": 16}},
            "model": {"arch": "resnet18"},
            "framework": {"dict_size": 64},
            "train": {"epochs": 2, "iters_per_epoch": 2, "eval_period": 1, "checkpoint_period": 1000,
                      "device": "cpu", "log_every": 1},
            "eval": {"batch_size": 16},
        },
        "parameters": {"loss.name": {"type": "grid", "values": ["triplet", "he"]},
                       "framework.name": {"type": "grid", "values": ["baseline", "moreid"]}},
        "searcher": "grid",
        "scheduler": {"type": "none"},
        "seeds": list(range(-(-trials // cells))),
        "resources": {"max_concurrent": WORKER_NODES * FAKE_GPUS_PER_NODE, "workers_per_trial": 1,
                      "cpus_per_worker": 0.25, "gpus_per_worker": 1},
        "retries": {"workers": 0, "trials": 0},
    }


class RssSampler:
    """The peak resident memory of this process while running (sampled from /proc every 0.2 s), in MiB."""

    def __init__(self) -> None:
        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cluster() -> Any:
    """A head (no CPUs for trials) and worker nodes that declare fake GPUs."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port()})
    for _ in range(WORKER_NODES):
        cluster.add_node(num_cpus=CPUS_PER_NODE, num_gpus=FAKE_GPUS_PER_NODE)
    cluster.wait_for_nodes()
    return cluster


def run_one(root: Path, address: str, trials: int) -> dict[str, float]:
    name = f"scale-{trials}"
    space = parse_space(space_dict(name, trials), source=f"benchmark:{name}")
    cpu, before = _cpu_s(), rss_mib()
    with RssSampler() as rss:
        wall, timer = timed_study(space, root, address)
    cpu = _cpu_s() - cpu
    results = sum(len(r) for r in timer.results.values())
    lines = timer.timelines()
    overhead = sorted(line.overhead_s for line in lines)
    return {"trials": float(len(lines)), "results": float(results), "wall_s": wall,
            "driver_cpu_ms_per_result": 1000 * cpu / max(1, results), "rss_before_mib": before,
            "rss_peak_mib": rss.peak, "trial_overhead_s": overhead[len(overhead) // 2] if overhead else float("nan")}


def run(quick: bool) -> dict[str, float]:
    import ray

    counts = QUICK_TRIAL_COUNTS if quick else TRIAL_COUNTS
    load = load_average()
    rows: dict[int, dict[str, float]] = {}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = start_cluster()
    try:
        with tempfile.TemporaryDirectory(prefix="moreid-bench-scale-") as tmp:
            root = Path(tmp)
            for count in counts:
                rows[count] = run_one(root, cluster.address, count)
                rows[count].update(callback_costs(count, root))
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\nsimulated cluster: {WORKER_NODES} nodes x {FAKE_GPUS_PER_NODE} fake GPUs, {CPUS_PER_NODE} CPU each; "
          f"load average {load:.1f} before, {load_average():.1f} after")
    print(f"{'trials':>6s} {'results':>7s} {'wall s':>7s} {'overhead s':>10s} {'driver ms/result':>16s} "
          f"{'driver MiB':>14s} {'csv ms':>7s} {'tb ms':>6s} {'console ms':>10s} {'csv rewrite ms':>14s}")
    for count, r in rows.items():
        print(f"{count:6d} {r['results']:7.0f} {r['wall_s']:7.0f} {r['trial_overhead_s']:10.2f} "
              f"{r['driver_cpu_ms_per_result']:16.1f} {r['rss_before_mib']:6.0f} > {r['rss_peak_mib']:5.0f} "
              f"{r['results.csv_mean_ms']:7.2f} {r['tensorboard_mean_ms']:6.2f} {r['console_mean_ms']:10.2f} "
              f"{r['csv_rewrite_ms']:14.1f}")
    first, last = rows[counts[0]], rows[counts[-1]]
    return {
        f"scale_driver_ms_per_result_{counts[0]}": first["driver_cpu_ms_per_result"],
        f"scale_driver_ms_per_result_{counts[-1]}": last["driver_cpu_ms_per_result"],
        f"scale_driver_peak_mib_{counts[-1]}": last["rss_peak_mib"],
        f"scale_csv_rewrite_ms_{counts[-1]}": last["csv_rewrite_ms"],
        "scale_per_result_growth": last["driver_cpu_ms_per_result"] / first["driver_cpu_ms_per_result"],
    }


if __name__ == "__main__":
    print(run(quick=True))
