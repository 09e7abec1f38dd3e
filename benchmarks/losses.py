"""Metric-loss cost against the distance matrix it consumes (docs/design.md, "Performance yardsticks").

For B = 64 anchors (P = 4 identities x K = 16) against M references (1,024 / 8,192 / 65,536 + 64, the
MoReID dictionary plus the batch's keys), each loss's forward + backward is timed on a realistic distance
matrix and compared with:

- the floor: ``pairwise_distance(queries [B, D], references [M, D])`` (euclidean, matmul expansion)
  forward + backward to the queries, as in MoReID where the references (f_k's keys) carry no gradient.
  The floor includes the norms, the [B, D] x [D, M] matmul, clamp and square root, and in the backward
  the [B, M] gradient scaling and the [B, M] x [M, D] matmul. D = 512 (the issue's size, the stricter
  floor) and D = 2,048 (ResNet-50 features, docs/design.md, "Performance yardsticks").
- a straightforward reference: ``reid_core.losses.reference`` (a Python loop over anchors with boolean
  indexing; for HE the full-sort closed form, the brute-force minimum over t being quadratic per anchor).

Each figure is the median of several repeats after warm-up, taken interleaved so that load on the machine
affects all of them alike. Features are L2-normalized identity clusters (identities grouped in families
of similar looking ones) so the hard sets have realistic sizes; the loss parameters are the defaults of
``LossConfig``.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from reid_core.config import LossConfig
from reid_core.losses import LOSSES, build_loss, pairwise_distance
from reid_core.losses import reference

B, P, K = 64, 4, 16
DIMS = (512, 2048)
IDS, FAMILY = 1200, 12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(fn: Callable[[], None], device: torch.device) -> Callable[[], tuple[float, float]]:
    """``fn`` timed: (wall seconds, process CPU seconds); the CPU time is steadier on a loaded machine."""
    def timed() -> tuple[float, float]:
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    return timed


def _problem(m: int, dim: int, device: torch.device, seed: int = 0):
    """Queries [B, dim], references [m, dim] (batch keys first) and the MoReID masks."""
    g = torch.Generator().manual_seed(seed)
    families = F.normalize(torch.randn(IDS // FAMILY, dim, generator=g), dim=1)
    centers = F.normalize(families.repeat_interleave(FAMILY, 0)
                          + 0.6 * F.normalize(torch.randn(IDS, dim, generator=g), dim=1), dim=1)

    def sample(labels: torch.Tensor) -> torch.Tensor:
        noise = F.normalize(torch.randn(len(labels), dim, generator=g), dim=1)
        return F.normalize(centers[labels] + 0.7 * noise, dim=1)

    batch_ids = torch.randperm(IDS, generator=g)[:P].repeat_interleave(K)
    past_ids = torch.randint(0, IDS, (m - B,), generator=g)
    queries = sample(batch_ids)
    refs = torch.cat([sample(batch_ids), sample(past_ids)])
    same_now = batch_ids[:, None] == batch_ids[None, :]
    same_past = batch_ids[:, None] == past_ids[None, :]
    pos = torch.cat([same_now, torch.zeros_like(same_past)], 1)
    neg = torch.cat([~same_now, ~same_past], 1)  # past keys of the anchor's identity: neither
    return queries.to(device), refs.to(device), pos.to(device), neg.to(device)


def _loss_step(loss_fn, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Callable[[], None]:
    leaf = dist.detach().clone().requires_grad_(True)

    def step() -> None:
        leaf.grad = None
        loss_fn(leaf, pos, neg).sum().backward()

    return step


def _floor_step(queries: torch.Tensor, refs: torch.Tensor) -> Callable[[], None]:
    leaf = queries.detach().clone().requires_grad_(True)
    upstream = torch.randn(queries.shape[0], refs.shape[0], device=queries.device)

    def step() -> None:
        leaf.grad = None
        pairwise_distance(leaf, refs).backward(upstream)

    return step


def _medians(steps: dict[str, Callable[[], tuple[float, float]]], repeats: int,
             warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and median CPU seconds of each step."""
    for _ in range(warmup):
        for timed in steps.values():
            timed()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved: machine load hits every entry alike
        for name, timed in steps.items():
            samples[name].append(timed())
    wall = {name: statistics.median(w for w, _ in values) for name, values in samples.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in samples.items()}
    return wall, cpu


def _entries() -> dict[str, tuple[str, dict]]:
    """Label -> (loss name, parameters): each loss with its ``LossConfig`` defaults, plus the weighted triplet."""
    entries = {name: (name, LossConfig(name=name).params()) for name in LOSSES}
    entries["triplet_weighted"] = ("triplet", LossConfig(name="triplet", margin=0.0,
                                                         triplet_mining="weighted").params())
    return entries


def run(quick: bool) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = (1024, 8192, 65536 + B)
    repeats, warmup = (5, 1) if quick else (11, 2)
    ref_repeats = 1 if quick else 3
    entries = _entries()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"metric losses, forward + backward, B={B} anchors; {where}; median of {repeats} "
          f"(reference: {ref_repeats}); ratio = loss / floor (distance fwd+bwd to the queries), wall clock and "
          f"process CPU time; |P_h|, |N_h| = hard samples used per anchor (HE: the elastic count)")
    print(f"{'M':>6} {'loss':16} {'ms':>8} {'/floor512':>9} {'cpu/512':>8} {'/floor2048':>10} {'ref ms':>9} "
          f"{'speedup':>8} {'|P_h|':>7} {'|N_h|':>8}")
    figures: dict[str, float] = {}
    for m in sizes:
        steps: dict[str, Callable[[], tuple[float, float]]] = {}
        problems = {dim: _problem(m, dim, device) for dim in DIMS}
        for dim, (queries, refs, _, _) in problems.items():
            steps[f"floor{dim}"] = _timer(_floor_step(queries, refs), device)
        queries, refs, pos, neg = problems[DIMS[0]]
        with torch.no_grad():
            dist = pairwise_distance(queries, refs)
        losses = {label: build_loss(name, **params) for label, (name, params) in entries.items()}
        for label, loss in losses.items():
            steps[label] = _timer(_loss_step(loss, dist, pos, neg), device)
        times, cpu = _medians(steps, repeats, warmup)
        ref_steps = {label: _timer(_loss_step(lambda d, p, n, name=name, params=params:
                                              reference.BENCH_REFERENCES[name](d, p, n, **params), dist, pos, neg),
                                   device) for label, (name, params) in entries.items()}
        ref_times, _ = _medians(ref_steps, ref_repeats, 0 if quick else 1)
        del problems
        print(f"{m:>6} {'floor':16} {times['floor512'] * 1e3:8.1f} {'':>9} {'':>8} {times['floor2048'] * 1e3:>10.1f}"
              f"   (D=512 | D=2048)")
        for label in entries:
            stats = losses[label].stats
            ratio = {dim: times[label] / times[f"floor{dim}"] for dim in DIMS}
            cpu_ratio = cpu[label] / cpu["floor512"]
            speedup = ref_times[label] / times[label]
            print(f"{m:>6} {label:16} {times[label] * 1e3:8.1f} {ratio[512]:9.3f} {cpu_ratio:8.3f} {ratio[2048]:10.3f} "
                  f"{ref_times[label] * 1e3:9.1f} {speedup:7.1f}x {stats['hard_pos']:7.1f} {stats['hard_neg']:8.1f}")
            if m == sizes[-1]:
                figures[f"loss_{label}_over_distance"] = ratio[512]
                figures[f"loss_{label}_over_distance_cpu"] = cpu_ratio
                figures[f"loss_{label}_over_distance_d2048"] = ratio[2048]
                figures[f"loss_{label}_speedup_vs_reference"] = speedup
    figures["loss_cost_over_distance"] = max(figures[f"loss_{label}_over_distance"] for label in entries)
    figures["loss_cost_over_distance_d2048"] = max(figures[f"loss_{label}_over_distance_d2048"] for label in entries)
    print(f"largest M: worst loss / floor = {figures['loss_cost_over_distance']:.3f} (D=512), "
          f"{figures['loss_cost_over_distance_d2048']:.3f} (D=2048); HE / floor = "
          f"{figures['loss_he_over_distance']:.3f} wall, {figures['loss_he_over_distance_cpu']:.3f} CPU time (D=512)")
    return figures
