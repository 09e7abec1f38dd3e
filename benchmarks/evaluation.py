"""Evaluation speed and memory (docs/design.md, "Performance yardsticks"): identical numbers to the per-query NumPy reference,
many times faster, bounded memory at VeRi-Wild-large scale.

1. Speed-up over ``reid_core.evaluation.reference`` on one 1,500 x 15,000 distance matrix (about
   VeRi-776's test size: 500 identities, 20 cameras), the same float32 matrix given to both: euclidean
   distances of 256-d identity-cluster features (``clustered``, mAP about 0.6) and, as a harder case for
   the fast path (matches spread over the whole ranking), uniform random distances (``random``). Runs
   are interleaved and the best time of each side is used (the machine may be shared). Reported: wall
   times, speed-up (also as a ratio of CPU times, process-wide), and the largest absolute difference
   over mAP, every CMC value and mINP.
2. VeRi-Wild-large scale: 2,000 (quick and full) and 10,000 (full only) queries against 138,517 gallery
   features of 256 dims (10,000 identities, 174 cameras), ``evaluate_features`` with the default
   1,024 MB budget. Each size runs in a fresh subprocess that builds the features, then evaluates; peak
   memory is that process's peak resident set (``VmHWM``: Python, torch, the features and the
   evaluation together), and ``growth`` the part above the resident set just before evaluating. The
   2,000-query run is done twice and the faster one kept.

3. Sharded feature extraction (the evaluation of a data-parallel run): the synthetic test set (query +
   gallery, real JPEGs) through a ResNet-18 at 256x128, by 1 process and by 2 gloo processes, each taking
   its contiguous shard (``build_test_loader(rank=, world_size=)``) and all-gathering the features
   (``gather_shards``). Reported per worker: its images, its extraction seconds (wall, and CPU seconds of
   its process: the work it did, whatever else shares the cores), and the gather (which includes waiting
   for the slower rank); each setting runs twice and the faster run is kept. The
   threads per process are given (2 cores: 1 process x 2 threads, 1 x 1, 2 x 1); ``--sharded`` runs
   only this part.

Times are wall-clock on this machine with torch's default threads; the machine may be shared, so the
load average at the start is printed with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reid_core.evaluation import evaluate_features, evaluate_rank, evaluate_rank_reference, query_gallery_distances

GIB = 2**30


def _clusters(num_q: int, num_g: int, dim: int, ids: int, cams: int, spread: float, seed: int):
    """Identity-cluster features, built in place (no [N, D] temporaries), with pids and camids.

    Queries take identities 0, 1, ... in turn; the gallery's identities are drawn at random.
    """
    gen = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(ids, dim, generator=gen), dim=1)
    q_pids = torch.arange(num_q) % ids
    g_pids = torch.randint(0, ids, (num_g,), generator=gen)
    q_cams = torch.randint(0, cams, (num_q,), generator=gen)
    g_cams = torch.randint(0, cams, (num_g,), generator=gen)

    def fill(pids: torch.Tensor) -> torch.Tensor:
        out = torch.empty(pids.numel(), dim)
        for first in range(0, pids.numel(), 8192):
            part = out[first:first + 8192]
            torch.randn(part.shape, generator=gen, out=part)
            part.mul_(spread / dim**0.5).add_(centers[pids[first:first + 8192]])
        return out

    return fill(q_pids), fill(g_pids), q_pids, g_pids, q_cams, g_cams


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(abs(a["mAP"] - b["mAP"]), abs(a["mINP"] - b["mINP"]), float(np.abs(a["cmc"] - b["cmc"]).max()))


def _speedup(kind: str, quick: bool) -> dict:
    """Fast and reference runs interleaved; the best (least disturbed) time of each is compared."""
    num_q, num_g = 1500, 15000
    q, g, q_pids, g_pids, q_cams, g_cams = _clusters(num_q, num_g, 256, ids=500, cams=20, spread=1.8, seed=0)
    if kind == "clustered":
        dist = query_gallery_distances(q, g).numpy()
    else:
        dist = np.random.default_rng(0).random((num_q, num_g), dtype=np.float32)
    labels = [x.numpy() for x in (q_pids, g_pids, q_cams, g_cams)]
    evaluate_rank(dist[:50], labels[0][:50], labels[1], labels[2][:50], labels[3])  # warm-up
    fast_wall, fast_cpu, ref_wall, ref_cpu = [], [], [], []
    for _ in range(3 if quick else 5):  # as many runs of each side
        wall, cpu = time.perf_counter(), time.process_time()
        fast = evaluate_rank(dist, *labels)
        fast_wall.append(time.perf_counter() - wall)
        fast_cpu.append(time.process_time() - cpu)
        wall, cpu = time.perf_counter(), time.process_time()
        ref = evaluate_rank_reference(dist, *labels)
        ref_wall.append(time.perf_counter() - wall)
        ref_cpu.append(time.process_time() - cpu)
    return {"kind": kind, "fast_s": min(fast_wall), "reference_s": min(ref_wall),
            "speedup": min(ref_wall) / min(fast_wall), "speedup_cpu": min(ref_cpu) / min(fast_cpu),
            "max_abs_diff": _max_abs_diff(fast, ref), "mAP": fast["mAP"]}


def _child(num_q: int) -> dict:
    """Runs in a fresh process: VeRi-Wild-large sized features, one evaluate_features call."""
    q, g, q_pids, g_pids, q_cams, g_cams = _clusters(num_q, 138_517, 256, ids=10_000, cams=174, spread=1.6,
                                                     seed=1)
    rss_before = _current_rss()
    start = time.perf_counter()
    result = evaluate_features(q, g, q_pids, g_pids, q_cams, g_cams, metric="euclidean")
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss across fork + exec, so a child of a
    # process that already peaked high (the losses benchmark) would report the parent's peak.
    peak = _status_bytes("VmHWM")
    return {"queries": num_q, "seconds": seconds, "peak_gib": peak / GIB, "growth_gib": (peak - rss_before) / GIB,
            "mAP": result["mAP"], "mINP": result["mINP"], "R1": float(result["cmc"][0]),
            "num_valid": result["num_valid"]}


def _current_rss() -> int:
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (kB there) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _in_subprocess(num_q: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.evaluation", "--child", str(num_q)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"evaluation benchmark child ({num_q} queries) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _shard_worker(rank: int, world: int, threads: int, root: str, folder: str, repeats: int) -> None:
    """One rank of the sharded extraction: its shard of query + gallery, extracted then gathered, ``repeats``
    times; writes ``{folder}/rank{rank}.json``."""
    import torch.distributed as dist

    from reid_core.config import Config
    from reid_core.data import load_dataset
    from reid_core.data.loader import build_test_loader
    from reid_core.evaluation.features import extract_features, gather_shards
    from reid_core.models import build_model

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        cfg = Config().replace({"data.dataset": "synthetic", "data.root": root, "data.height": 256,
                                "data.width": 128, "data.workers": 0, "model.arch": "resnet18"})
        dataset = load_dataset(cfg.data)
        loader = build_test_loader(dataset.query + dataset.gallery, cfg.data, cfg.eval.batch_size, rank=rank,
                                   world_size=world)
        torch.manual_seed(0)
        model = build_model(cfg.model, dataset.num_train_pids).eval()
        with torch.inference_mode():
            model.test_features(torch.zeros(2, 3, 256, 128))  # warm-up
        runs = []
        for _ in range(repeats):
            if world > 1:
                dist.barrier()
            began, cpu = time.perf_counter(), time.process_time()
            local = extract_features(model, loader, "cpu", progress=False)
            extracted, cpu = time.perf_counter(), time.process_time() - cpu
            if world > 1:
                gather_shards(*local)
            done = time.perf_counter()
            runs.append({"extract_s": extracted - began, "extract_cpu_s": cpu, "gather_s": done - extracted,
                         "total_s": done - began})
        result = {"rank": rank, "images": len(loader.loader.dataset), "runs": runs}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _sharded_setting(root: str, world: int, threads: int, repeats: int) -> dict:
    """Run the sharded extraction with ``world`` processes; the repeat whose slowest rank was fastest."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="evalshard-") as folder:
        mp.start_processes(_shard_worker, args=(world, threads, root, folder, repeats), nprocs=world,
                           start_method="spawn")
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    best = min(range(repeats), key=lambda i: max(r["runs"][i]["total_s"] for r in ranks))
    return {"processes": world, "threads": threads, "images": [r["images"] for r in ranks],
            "extract_s": [r["runs"][best]["extract_s"] for r in ranks],
            "extract_cpu_s": [r["runs"][best]["extract_cpu_s"] for r in ranks],
            "gather_s": [r["runs"][best]["gather_s"] for r in ranks],
            "total_s": max(r["runs"][best]["total_s"] for r in ranks)}


def sharded(quick: bool) -> dict[str, float]:
    """Part 3: extraction time per worker with 1 and 2 processes (see the module docstring)."""
    from reid_core.data import synthetic

    cores = os.cpu_count() or 1
    ids = 24 if quick else 40
    with tempfile.TemporaryDirectory(prefix="evalshard-data-") as tmp:
        root = str(synthetic.generate(Path(tmp) / "data", "market1501", ids=ids, cams=4, images_per_id_cam=4,
                                      height=128, width=64, seed=0))
        load = os.getloadavg()
        print(f"\nsharded extraction, ResNet-18 at 256x128, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
              f"on {cores} cores")
        settings = [(1, cores), (1, 1), (2, max(1, cores // 2))]
        rows = [_sharded_setting(root, world, threads, repeats=2) for world, threads in settings]
    print(f"{'processes':>9s} {'threads':>8s} {'images/worker':>14s} {'extract s/worker':>17s} "
          f"{'CPU s/worker':>13s} {'gather s':>12s} {'total s':>8s} {'images/s':>9s}")
    for r in rows:
        print(f"{r['processes']:9d} {r['threads']:8d} {'/'.join(map(str, r['images'])):>14s} "
              f"{'/'.join(f'{x:.2f}' for x in r['extract_s']):>17s} {'/'.join(f'{x:.1f}' for x in r['extract_cpu_s']):>13s} "
              f"{'/'.join(f'{x:.3f}' for x in r['gather_s']):>12s} "
              f"{r['total_s']:8.2f} {sum(r['images']) / r['total_s']:9.1f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    one, _, two = rows
    return {"eval_extract_1proc_s": one["total_s"], "eval_extract_2proc_s": two["total_s"],
            "eval_extract_2proc_worker_s": max(two["extract_s"]), "eval_extract_2proc_speedup": one["total_s"] / two["total_s"]}


def run(quick: bool) -> dict[str, float]:
    load = os.getloadavg()[0]
    print(f"torch threads {torch.get_num_threads()}, load average {load:.1f} on {os.cpu_count()} cores")
    rows = [_speedup("clustered", quick), _speedup("random", quick)]
    print(f"\n{'1,500 x 15,000':16s} {'fast s':>8s} {'ref s':>8s} {'speed-up':>9s} {'(CPU time)':>10s} "
          f"{'max |diff|':>11s} {'mAP':>7s}")
    for r in rows:
        print(f"{r['kind']:16s} {r['fast_s']:8.3f} {r['reference_s']:8.3f} {r['speedup']:8.1f}x "
              f"{r['speedup_cpu']:9.1f}x {r['max_abs_diff']:11.2e} {r['mAP']:7.4f}")

    # The 2,000-query run is repeated (fresh processes) and the faster kept: the machine may be shared.
    large = [min((_in_subprocess(2000) for _ in range(2)), key=lambda r: r["seconds"])]
    if not quick:
        large.append(_in_subprocess(10_000))
    print(f"\n{'x 138,517 (256-d)':18s} {'seconds':>8s} {'peak GiB':>9s} {'growth GiB':>11s} {'mAP':>7s} {'R1':>7s}")
    for r in large:
        print(f"{r['queries']:>7,d} queries   {r['seconds']:8.2f} {r['peak_gib']:9.2f} {r['growth_gib']:11.2f} "
              f"{r['mAP']:7.4f} {r['R1']:7.4f}   ({r['seconds'] / r['queries'] / 138_517 * 1e9:.1f} ns per pair)")

    figures = {
        "eval_speedup_vs_reference": rows[0]["speedup"],
        "eval_speedup_vs_reference_random": rows[1]["speedup"],
        "eval_speedup_cpu_time": rows[0]["speedup_cpu"],
        "eval_max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "eval_veriwild_2000_s": large[0]["seconds"],
        "eval_veriwild_2000_peak_gib": large[0]["peak_gib"],
    }
    if not quick:
        figures["eval_veriwild_10000_s"] = large[1]["seconds"]
        figures["eval_veriwild_10000_peak_gib"] = large[1]["peak_gib"]
    figures.update(sharded(quick))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="evaluation benchmark (use python -m benchmarks --only evaluation)")
    parser.add_argument("--child", type=int, metavar="QUERIES", help="internal: one VeRi-Wild-sized evaluation")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sharded", action="store_true", help="only the sharded extraction (1 and 2 processes)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child)))
    elif args.sharded:
        print(json.dumps(sharded(args.quick)))
    else:
        print(json.dumps(run(args.quick)))
