"""k-reciprocal re-ranking (k1 = 20, k2 = 6, lambda = 0.3): time and peak memory against the dense reference.

1. Market-1501 size (full mode; quick: 1,000 x 5,000): 3,368 queries x 15,913 gallery, 2,048-d
   identity-cluster features (751 identities, 6 cameras). The three distance matrices are written once
   to a temporary folder; ``re_ranking`` (ours) and ``benchmarks.rerank_reference.re_ranking_dense``
   (the toolboxes' dense algorithm) each run in a fresh subprocess that loads them and re-ranks.
   Reported per side: seconds, peak memory (the process's ``VmHWM``: inputs, Python and torch
   included) and ``growth`` (above the resident set just before re-ranking); then the largest
   absolute difference of the re-ranked distances and the mAP / R1 of both, and the mAP of
   ``evaluate_features(rerank=True)`` (the memory-bounded path, from the features) next to the
   dense reference's: the measured departure.
2. VeRi-Wild-large size (full mode only; quick: 2,000 x 20,000): 10,000 x 138,517, 256-d features,
   ``evaluate_features(..., rerank=True)`` with the default 1,024 MB budget, in a fresh subprocess.

The machine may be shared: the load average at the start of each part is printed with its table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.evaluation import _clusters, _status_bytes
from reid_core.evaluation import evaluate_features, evaluate_rank, query_gallery_distances

GIB = 2**30
# spread: noise norm around unit identity centres; 3.3 at 2,048-d gives a plain mAP of about 0.6.
MARKET = {"num_q": 3368, "num_g": 15913, "dim": 2048, "ids": 751, "cams": 6, "spread": 3.3}
MARKET_QUICK = {"num_q": 1000, "num_g": 5000, "dim": 2048, "ids": 300, "cams": 6, "spread": 3.3}
VERIWILD = {"num_q": 10_000, "num_g": 138_517, "dim": 256, "ids": 10_000, "cams": 174, "spread": 1.6}
VERIWILD_QUICK = {"num_q": 2000, "num_g": 20_000, "dim": 256, "ids": 2000, "cams": 174, "spread": 1.6}
FILES = ("q_g", "q_q", "g_g")


def _features(size: dict, seed: int):
    return _clusters(size["num_q"], size["num_g"], size["dim"], ids=size["ids"], cams=size["cams"],
                     spread=size["spread"], seed=seed)


def _prepare(size: dict, folder: Path) -> None:
    """Child: the features, labels and three distance matrices of the Market-sized problem, as .npy files."""
    q, g, *labels = _features(size, seed=0)
    np.save(folder / "q.npy", q.numpy())
    np.save(folder / "g.npy", g.numpy())
    q_pids, g_pids, q_cams, g_cams = (x.numpy() for x in labels)
    np.save(folder / "labels.npy", np.stack([q_pids, q_cams]))
    np.save(folder / "g_labels.npy", np.stack([g_pids, g_cams]))
    for name, (a, b) in zip(FILES, ((q, g), (q, q), (g, g))):
        np.save(folder / f"{name}.npy", query_gallery_distances(a, b).numpy())


def _labels(folder: Path):
    q_pids, q_cams = np.load(folder / "labels.npy")
    g_pids, g_cams = np.load(folder / "g_labels.npy")
    return q_pids, g_pids, q_cams, g_cams


def _dense_child(side: str, folder: Path) -> dict:
    """Child: one re-ranking of the stored matrices by ``side`` (``ours`` / ``reference``)."""
    dists = [np.load(folder / f"{name}.npy") for name in FILES]
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    if side == "ours":
        from reid_core.evaluation import re_ranking
        out = re_ranking(*dists, k1=20, k2=6, lambda_value=0.3)
    else:
        from benchmarks.rerank_reference import re_ranking_dense
        out = re_ranking_dense(*dists, k1=20, k2=6, lambda_value=0.3)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    np.save(folder / f"out_{side}.npy", out)
    return {"side": side, "seconds": seconds, "peak_gib": peak / GIB, "growth_gib": (peak - rss_before) / GIB}


def _features_child(size: dict) -> dict:
    """Child: evaluate_features(rerank=True) on a VeRi-Wild-shaped problem."""
    q, g, *labels = _features(size, seed=1)
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    result = evaluate_features(q, g, *labels, metric="euclidean", rerank=True, k1=20, k2=6, lambda_value=0.3)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"queries": size["num_q"], "gallery": size["num_g"], "seconds": seconds, "peak_gib": peak / GIB,
            "growth_gib": (peak - rss_before) / GIB, "mAP": result["mAP"], "R1": float(result["cmc"][0])}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.rerank", "--child", *args], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"re-ranking benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def _market(quick: bool) -> dict:
    size = MARKET_QUICK if quick else MARKET
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as tmp:
        folder = Path(tmp)
        _child("prepare", json.dumps(size), tmp)
        print(f"{size['num_q']:,d} x {size['num_g']:,d}, {size['dim']}-d: {_load()}", flush=True)
        sides = {side: _child("dense", side, tmp) for side in ("ours", "reference")}
        ours, ref = (np.load(folder / f"out_{side}.npy") for side in ("ours", "reference"))
        labels = _labels(folder)
        m_ours, m_ref = evaluate_rank(ours, *labels), evaluate_rank(ref, *labels)
        q, g = torch.from_numpy(np.load(folder / "q.npy")), torch.from_numpy(np.load(folder / "g.npy"))
        plain = evaluate_features(q, g, *labels)
        bounded = evaluate_features(q, g, *labels, rerank=True)
    print(f"{'':12s} {'seconds':>8s} {'peak GiB':>9s} {'growth GiB':>11s}")
    for name, r in sides.items():
        print(f"{name:12s} {r['seconds']:8.1f} {r['peak_gib']:9.2f} {r['growth_gib']:11.2f}")
    diff = float(np.abs(ours - ref).max())
    print(f"speed-up {sides['reference']['seconds'] / sides['ours']['seconds']:.1f}x, max |ours - reference| "
          f"{diff:.2e}; mAP plain {plain['mAP']:.4f}, re-ranked: reference {m_ref['mAP']:.6f}, ours (dense) "
          f"{m_ours['mAP']:.6f}, ours (memory-bounded, from features) {bounded['mAP']:.6f}")
    tag = ""  # the same keys in quick mode (smaller problem), as the evaluation benchmark does
    return {
        f"rerank_market_{tag}ours_s": sides["ours"]["seconds"],
        f"rerank_market_{tag}reference_s": sides["reference"]["seconds"],
        f"rerank_market_{tag}speedup": sides["reference"]["seconds"] / sides["ours"]["seconds"],
        f"rerank_market_{tag}ours_peak_gib": sides["ours"]["peak_gib"],
        f"rerank_market_{tag}reference_peak_gib": sides["reference"]["peak_gib"],
        f"rerank_market_{tag}max_abs_diff": diff,
        f"rerank_market_{tag}mAP_reference": m_ref["mAP"],
        f"rerank_market_{tag}mAP_diff_dense": abs(m_ours["mAP"] - m_ref["mAP"]),
        f"rerank_market_{tag}mAP_diff_bounded": abs(bounded["mAP"] - m_ref["mAP"]),
        f"rerank_market_{tag}R1_diff_bounded": abs(float(bounded["cmc"][0]) - float(m_ref["cmc"][0])),
    }


def run(quick: bool, parts: tuple[str, ...] = ("market", "veriwild")) -> dict[str, float]:
    print(f"torch threads {torch.get_num_threads()}")
    figures = _market(quick) if "market" in parts else {}
    if "veriwild" not in parts:
        return figures
    size = VERIWILD_QUICK if quick else VERIWILD
    print(f"\nevaluate_features(rerank=True), {size['num_q']:,d} x {size['num_g']:,d}, {size['dim']}-d: {_load()}",
          flush=True)
    r = _child("features", json.dumps(size))
    print(f"{r['seconds']:.1f} s, peak {r['peak_gib']:.2f} GiB ({r['growth_gib']:.2f} GiB above the features), "
          f"mAP {r['mAP']:.4f}, R1 {r['R1']:.4f}")
    name = "rerank_veriwild_2000x20000" if quick else "rerank_veriwild_large"
    figures.update({f"{name}_s": r["seconds"], f"{name}_peak_gib": r["peak_gib"]})
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="re-ranking benchmark (use python -m benchmarks --only rerank)")
    parser.add_argument("--child", nargs="+", help="internal: prepare SIZE DIR | dense SIDE DIR | features SIZE")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("market", "veriwild"), help="run one part only")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "prepare":
            _prepare(json.loads(rest[0]), Path(rest[1]))
        elif kind == "dense":
            print(json.dumps(_dense_child(rest[0], Path(rest[1]))))
        else:
            print(json.dumps(_features_child(json.loads(rest[0]))))
    else:
        print(json.dumps(run(args.quick, (args.part,) if args.part else ("market", "veriwild"))))
