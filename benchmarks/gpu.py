"""GPU throughput, each figure beside its floor: ``python -m benchmarks.gpu [--device cuda|cpu] [--quick]``.

Imports torch, torchvision and reid_core only (and, through reid_core, NumPy, PyYAML, tqdm, Pillow and
TensorBoard): no Ray, Optuna or pandas, so it runs on a machine that has PyTorch and nothing of the
study platform. Sections, printed as they run, then one JSON line:

1. Device peaks: a large matrix product in fp32 (TF32 tensor cores allowed, as cuDNN's convolutions
   use by default), fp16 and bf16, and a large device-to-device copy (bandwidth).
2. Training step, through the engine's own :class:`reid_core.engine.trainer.TrainStep` (forward,
   backward, optimizer, momentum update, enqueue, schedule), random images and P x K labels:
   the VeRi-776 recipe (R50-IBN-a + non-local, 256 x 256, 64 = 4 ids x 16) and the Market-1501
   recipe (R101-IBN-a + non-local, 384 x 128, 64 = 4 x 16), HE loss, S = 8,192. The subset of the
   cross product measured (all of it would not fit 8 minutes with torch.compile's start-up):
   precision (fp32, fp16, bf16) x framework (baseline, MoReID) at the default layout (channels_last
   on, eager); then, on the MoReID step at bf16 (fp16 where the build has no ``train.amp_dtype``),
   channels_last off, and compiled (``train.compile``, channels_last on). Compiled rows run last,
   after evaluation, and are skipped (said so) when the time budget is spent.
   Per row: step ms, images/s, peak memory (CUDA: ``max_memory_allocated``, model + optimizer +
   dictionary + activations; CPU: the process's peak resident set), the model FLOPs of one step
   (``torch.utils.flop_counter.FlopCounterMode``, forward and backward, f_k included), the floor
   (those FLOPs at the measured matrix-product peak of the row's precision) and achieved = floor / step.
3. The MoReID step's parts at the VeRi-776 recipe, S = 8,192 and 65,536, bf16 autocast: f_k forward,
   distances + HE forward and backward (fp32, as the engine runs them), enqueue, momentum update;
   floors are FLOPs at the peak or bytes at the copy bandwidth, whichever is larger.
4. Evaluation (``evaluate_features``) at VeRi-Wild-large size, 10,000 x 138,517 256-d features, and
   k-reciprocal re-ranking (``evaluate_features(rerank=True)``, k1 20, k2 6, lambda 0.3) at
   Market-1501 size, 3,368 x 15,913 2,048-d features, on the device.

A row whose config key is missing from this build (``train.amp_dtype``, ``train.compile``) is printed as
"not supported by this build" and left out of the JSON. ``--quick`` runs the same code at toy sizes
(ResNet-18 IBN + non-local at 32 x 32 and 48 x 32, the least that instance norm in layer3 takes; batch
4 = 2 x 2; one timed step per row; small S, evaluation and re-ranking sizes; the precision grid and the
toggles on the VeRi-776 shape only, fp32 on the Market-1501 shape; torch.compile with the ``aot_eager``
backend) for the test suite: its numbers are a smoke test, not measurements.

Time on one H100, estimated (no GPU has been lent yet to measure it): about 2 minutes of eager rows and
one of parts, evaluation and re-ranking; then the compiled rows, each started only while 180 s of a 420 s
budget are left (their first step compiles), so that the run stays under 8 minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.evaluation import _clusters
from benchmarks.rerank import MARKET
from benchmarks.step import NUM_CLASSES, _batch, _config, _sync
from reid_core.config import Config
from reid_core.engine.trainer import TrainStep
from reid_core.evaluation import evaluate_features
from reid_core.models import build_model, compile_backbones
from reid_core.moreid import build_framework, momentum_update

GIB = 2**30
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AMP_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16"}  # values of train.amp_dtype

RECIPES = {
    "veri776": dict(arch="resnet50", height=256, width=256, batch=64, k=16),
    "market1501": dict(arch="resnet101", height=384, width=128, batch=64, k=16),
}
QUICK_RECIPES = {
    "veri776": dict(arch="resnet18", height=32, width=32, batch=4, k=2),
    "market1501": dict(arch="resnet18", height=48, width=32, batch=4, k=2),
}
VERIWILD_LARGE = dict(num_q=10_000, num_g=138_517, dim=256, ids=10_000, cams=174, spread=1.6)
QUICK_EVAL = dict(num_q=200, num_g=2_000, dim=32, ids=200, cams=20, spread=1.6)
QUICK_RERANK = dict(num_q=60, num_g=300, dim=64, ids=40, cams=6, spread=3.3)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between a full (GPU) run and ``--quick`` (toy sizes)."""

    recipes: dict
    grid: tuple[str, ...]  # recipes measured over the whole precision grid and the toggles (others: fp32)
    dict_size: int  # S of the step rows
    part_dict_sizes: tuple[int, ...]
    warmup: int  # steps before timing (the first one also runs cuDNN's autotuner / the compiler)
    repeats: int  # timed steps per row
    matmul_n: int  # side of the peak-measuring matrix product
    copy_bytes: int
    eval_size: dict
    rerank_size: dict
    budget_s: float  # compiled rows are skipped once less than compile_reserve_s of this is left
    compile_reserve_s: float
    compile_backend: str  # quick: aot_eager (tracing and autograd capture, no code generation: seconds, not minutes)


FULL = Sizes(RECIPES, ("veri776", "market1501"), 8192, (8192, 65536), warmup=5, repeats=20, matmul_n=8192,
             copy_bytes=GIB, eval_size=VERIWILD_LARGE, rerank_size=MARKET, budget_s=420.0, compile_reserve_s=180.0,
             compile_backend="inductor")
QUICK = Sizes(QUICK_RECIPES, ("veri776",), 256, (256, 2048), warmup=0, repeats=1, matmul_n=256,
              copy_bytes=16 * 2**20, eval_size=QUICK_EVAL, rerank_size=QUICK_RERANK, budget_s=240.0,
              compile_reserve_s=60.0, compile_backend="aot_eager")


@dataclass(frozen=True)
class Row:
    """One training-step measurement: which recipe, framework, precision, layout and compilation."""

    recipe: str
    framework: str
    precision: str  # fp32 | fp16 | bf16
    channels_last: bool
    compiled: bool

    @property
    def label(self) -> str:
        return (f"{self.recipe:<11}{self.framework:<9}{self.precision:<5}"
                f"{'cl' if self.channels_last else 'nchw':<5}{'compiled' if self.compiled else 'eager':<9}")


# ---- what this build supports ---------------------------------------------------------------------

def config_has(key: str) -> bool:
    """Whether ``section.name`` is a field of this build's :class:`Config` (keys added on other branches
    are absent until they are merged)."""
    section, name = key.split(".")
    return name in {f.name for f in dataclasses.fields(getattr(Config(), section))}


def missing_keys(row: Row) -> list[str]:
    """Config keys ``row`` needs that this build lacks (empty: the row can run)."""
    need = ["train.channels_last"]
    if row.precision == "bf16":
        need.append("train.amp_dtype")
    if row.compiled:
        need.append("train.compile")
    return [key for key in need if not config_has(key)]


def planned_rows(recipes: dict, grid: tuple[str, ...]) -> tuple[list[Row], list[Row]]:
    """(eager rows, compiled rows). For the recipes in ``grid``: precision x framework at the default
    layout (channels_last on, eager), then channels_last off, and compiled, on the MoReID step at bf16
    (fp16 where this build has no ``train.amp_dtype``). Other recipes: fp32 baseline and MoReID only."""
    toggle = "bf16" if config_has("train.amp_dtype") else "fp16"
    eager, compiled = [], []
    for recipe in recipes:
        precisions = DTYPES if recipe in grid else ("fp32",)
        eager += [Row(recipe, fw, p, True, False) for p in precisions for fw in ("baseline", "moreid")]
        if recipe in grid:
            eager.append(Row(recipe, "moreid", toggle, False, False))
            compiled.append(Row(recipe, "moreid", toggle, True, True))
    # bf16 rows are planned whatever the build: those it cannot run are reported as such.
    return eager, compiled


# ---- building a step (the one place that maps a row onto the engine) ------------------------------

def row_config(row: Row, shape: dict, dict_size: int) -> Config:
    """The engine config of ``row``: the recipe's shape, IBN + non-local, HE, and the row's switches
    under the keys the engine reads (only those this build has)."""
    cfg = _config(shape["arch"], shape["height"], shape["width"], shape["batch"], shape["k"], row.framework,
                  ibn=True, non_local=True, dict_size=dict_size)
    extra: dict[str, object] = {"train.amp": row.precision != "fp32", "train.channels_last": row.channels_last}
    if row.precision != "fp32" and config_has("train.amp_dtype"):
        extra["train.amp_dtype"] = AMP_DTYPE_NAMES[row.precision]
    if config_has("train.compile"):
        extra["train.compile"] = row.compiled
    if config_has("train.cudnn_benchmark"):
        extra["train.cudnn_benchmark"] = True
    return cfg.replace(extra)


def make_train_step(cfg: Config, framework: torch.nn.Module, model: torch.nn.Module, device: torch.device,
                    row: Row) -> TrainStep:
    """The engine's TrainStep for ``row``. The AMP dtype goes in as a constructor argument when
    TrainStep takes one; otherwise TrainStep reads ``train.amp_dtype`` from ``cfg`` (or, in a build
    without it, autocasts to float16)."""
    kwargs: dict[str, object] = {}
    if "amp_dtype" in inspect.signature(TrainStep).parameters:
        kwargs["amp_dtype"] = DTYPES[row.precision] if row.precision != "fp32" else torch.float16
    return TrainStep(cfg, framework, model, device, iters_per_epoch=1000, amp=row.precision != "fp32",
                     channels_last=row.channels_last, **kwargs)


def build_row(row: Row, shape: dict, dict_size: int, device: torch.device, compile_backend: str = "inductor"):
    """(TrainStep, framework, cfg) of ``row`` on ``device``; the MoReID dictionary is filled with random keys."""
    cfg = row_config(row, shape, dict_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES)
    framework = build_framework(cfg, model).to(device)
    if row.channels_last:
        framework.to(memory_format=torch.channels_last)
    if row.compiled:
        # f_k is already a copy of f_q here, so compiling both in place is safe (see compile_backbones).
        compile_backbones(model, getattr(framework, "key_encoder", None), backend=compile_backend)
    step = make_train_step(cfg, framework, model, device, row)
    if row.framework == "moreid":
        s = cfg.framework.dict_size
        framework.dictionary.enqueue(torch.randn(s, model.feat_dim, device=device),
                                     torch.randint(0, NUM_CLASSES, (s,), device=device))
    return step, framework, cfg


# ---- device measurements ---------------------------------------------------------------------------

def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator, or the process's peak resident set on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # "5" resets VmHWM to the current resident set (Linux 4.0+)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_gib(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak`, GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("no VmHWM in /proc/self/status")


def mean_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Mean wall seconds of ``fn`` over ``repeats`` back-to-back calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def best_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Least wall seconds of one call of ``fn`` over ``repeats`` after ``warmup``: the least disturbed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def count_flops(fn: Callable[[], object]) -> int:
    """Matrix FLOPs (convolutions, matrix products, attention; forward and backward) of one call."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure_peaks(device: torch.device, sizes: Sizes) -> dict[str, float]:
    """FLOP/s of an n x n x n matrix product per precision, and copy bandwidth in bytes/s (best of ten)."""
    n = sizes.matmul_n
    peaks = {}
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 where the device has it: the fp32 floor is a floor
        for name, dtype in DTYPES.items():
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            seconds = best_seconds(lambda: torch.mm(a, b), device, warmup=2, repeats=10)
            peaks[name] = 2 * n**3 / seconds
            del a, b
    finally:
        torch.set_float32_matmul_precision(before)
    src = torch.empty(sizes.copy_bytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    peaks["copy_bytes_per_s"] = 2 * sizes.copy_bytes / seconds  # bytes read and written
    del src, dst
    return peaks


# ---- sections ----------------------------------------------------------------------------------------

def step_row(row: Row, sizes: Sizes, device: torch.device, peaks: dict, flops_cache: dict) -> dict:
    """Build ``row``, run warm-up steps, time ``repeats`` steps; the row's JSON figures."""
    shape = sizes.recipes[row.recipe]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    start = time.perf_counter()
    step, _, _ = build_row(row, shape, sizes.dict_size, device, sizes.compile_backend)
    images, labels = _batch(row_config(row, shape, sizes.dict_size), device)
    step(images, labels)  # first step: cuDNN autotuning, compilation
    first_s = time.perf_counter() - start
    key = (row.recipe, row.framework)
    if key not in flops_cache and not row.compiled:
        flops_cache[key] = count_flops(lambda: step(images, labels))
    seconds = mean_seconds(lambda: step(images, labels), device, sizes.warmup, sizes.repeats)
    flops = flops_cache[key]
    floor_s = flops / peaks[row.precision]
    out = {"recipe": row.recipe, "framework": row.framework, "precision": row.precision,
           "channels_last": row.channels_last, "compiled": row.compiled, "arch": shape["arch"],
           "height": shape["height"], "width": shape["width"], "batch": shape["batch"],
           "step_ms": seconds * 1e3, "images_per_s": shape["batch"] / seconds, "peak_memory_gib": peak_gib(device),
           "gflops_per_step": flops / 1e9, "floor_ms": floor_s * 1e3, "achieved_fraction": floor_s / seconds,
           "first_step_s": first_s}  # build + the first step (autotuning, compiling)
    del step
    return out


STEP_HEADER = (f"  {'recipe':<11}{'fw':<9}{'prec':<5}{'mem':<5}{'mode':<9}{'ms':>8}{'img/s':>9}{'GiB':>7}"
               f"{'GFLOP':>8}{'floor ms':>9}{'achieved':>9}{'1st s':>7}")


def print_step(row: Row, r: dict) -> None:
    print(f"  {row.label}{r['step_ms']:>8.1f}{r['images_per_s']:>9.0f}{r['peak_memory_gib']:>7.2f}"
          f"{r['gflops_per_step']:>8.0f}{r['floor_ms']:>9.2f}{r['achieved_fraction']:>9.2f}{r['first_step_s']:>7.1f}",
          flush=True)


def print_unsupported(row: Row, reason: str) -> None:
    print(f"  {row.label}  {reason}", flush=True)


def step_parts(sizes: Sizes, device: torch.device, peaks: dict) -> list[dict]:
    """The MoReID step's parts at the VeRi-776 recipe, bf16 autocast, for each dictionary size."""
    shape = sizes.recipes["veri776"]
    row = Row("veri776", "moreid", "bf16", True, False)
    rows = []
    for s in sizes.part_dict_sizes:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        step, fw, cfg = build_row(row, shape, s, device)
        images, labels = _batch(cfg, device)
        images = images.contiguous(memory_format=torch.channels_last)
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
        with torch.no_grad(), autocast():
            queries0 = fw.features(fw.encoder(images).feat)
            keys = fw.features(fw.key_encoder(images).feat)

        def fk_forward() -> None:
            with torch.no_grad(), autocast():
                fw.key_encoder(images)

        def distances_he() -> None:
            queries = queries0.detach().clone().requires_grad_(True)
            fw.metric_loss(*fw.references(queries, keys, labels)).mean().backward()

        def enqueue() -> None:
            fw.dictionary.enqueue(keys, labels)

        def momentum() -> None:
            momentum_update(fw.key_encoder, fw.encoder, cfg.framework.momentum)

        k_state = [t for t in (*fw.key_encoder.parameters(), *fw.key_encoder.buffers()) if t.is_floating_point()]
        moved = {  # bytes each memory-bound part must move at the least
            "enqueue": 2 * (keys.numel() * keys.element_size() + labels.numel() * 8),
            "momentum_update": 3 * sum(t.numel() * t.element_size() for t in k_state),
        }
        parts = {"fk_forward": (fk_forward, "bf16"), "distances_he": (distances_he, "fp32"),
                 "enqueue": (enqueue, "fp32"), "momentum_update": (momentum, "fp32")}
        for name, (fn, precision) in parts.items():
            flops = count_flops(fn)
            seconds = mean_seconds(fn, device, sizes.warmup, sizes.repeats)  # count_flops warmed it up
            floor_s = max(flops / peaks[precision], moved.get(name, 0) / peaks["copy_bytes_per_s"])
            work = {"gflops": flops / 1e9} if flops else {}
            if name in moved:
                work["bytes_moved"] = moved[name]
            rows.append({"part": name, "dict_size": s, "ms": seconds * 1e3, **work, "floor_ms": floor_s * 1e3,
                         "achieved_fraction": floor_s / seconds})
            print(f"  S={s:<7d}{name:<17}{seconds * 1e3:>9.3f}{flops / 1e9:>9.2f}{floor_s * 1e3:>10.3f}"
                  f"{floor_s / seconds:>9.2f}", flush=True)
        del step, fw
    return rows


def _features(size: dict, seed: int, device: torch.device):
    q, g, *labels = _clusters(size["num_q"], size["num_g"], size["dim"], ids=size["ids"], cams=size["cams"],
                              spread=size["spread"], seed=seed)
    return q.to(device), g.to(device), labels


def eval_run(size: dict, device: torch.device, peaks: dict, rerank: bool) -> dict:
    """One timed ``evaluate_features`` on ``device`` (after a warm-up on a slice); floor: the distance
    FLOPs (plain: Q x G; re-ranking: all (Q + G)^2 pairs for the neighbour lists) at the fp32 peak."""
    q, g, labels = _features(size, seed=1 if not rerank else 0, device=device)
    kwargs = dict(metric="euclidean", rerank=rerank, k1=20, k2=6, lambda_value=0.3)
    n, m = min(50, size["num_q"]), min(1000, size["num_g"])  # a warm-up on slices: kernels loaded, caches set up
    evaluate_features(q[:n], g[:m], labels[0][:n], labels[1][:m], labels[2][:n], labels[3][:m], **kwargs)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    result = evaluate_features(q, g, *labels, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    num_q, num_g, dim = size["num_q"], size["num_g"], size["dim"]
    pairs = (num_q + num_g) ** 2 if rerank else num_q * num_g
    floor_s = 2 * pairs * dim / peaks["fp32"]
    return {"queries": num_q, "gallery": num_g, "dim": dim, "seconds": seconds, "peak_memory_gib": peak_gib(device),
            "floor_ms": floor_s * 1e3, "achieved_fraction": floor_s / seconds, "mAP": result["mAP"],
            "R1": float(result["cmc"][0])}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(device: torch.device, quick: bool) -> dict:
    """Every section, printed as it goes; returns the JSON summary."""
    sizes = QUICK if quick else FULL
    # An fp16 step whose gradients overflow skips optimizer.step (GradScaler); the scheduler still steps.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as train.cudnn_benchmark does on CUDA
    load = os.getloadavg()[0]
    print(f"device {device_name(device)}, torch {torch.__version__}, load average {load:.1f} on "
          f"{os.cpu_count()} cores{' (quick: toy sizes, a smoke test)' if quick else ''}", flush=True)

    peaks = measure_peaks(device, sizes)
    print("peaks: " + ", ".join(f"{p} {peaks[p] / 1e12:.2f} TFLOP/s" for p in DTYPES)
          + f", copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write)", flush=True)

    eager, compiled = planned_rows(sizes.recipes, sizes.grid)
    steps: list[dict] = []
    flops_cache: dict = {}
    print(f"\ntraining step (TrainStep), S = {sizes.dict_size:,d}, mean of {sizes.repeats} after "
          f"{sizes.warmup + 1} warm-up; floor = model FLOPs at the measured peak of the precision")
    for recipe, shape in sizes.recipes.items():
        print(f"  {recipe}: {shape['arch']}-IBN-NL {shape['height']} x {shape['width']}, batch {shape['batch']} "
              f"({shape['batch'] // shape['k']} x {shape['k']})")
    print(STEP_HEADER, flush=True)
    for row in eager:
        missing = missing_keys(row)
        if missing:
            print_unsupported(row, f"not supported by this build (no {', '.join(missing)})")
            continue
        steps.append(step_row(row, sizes, device, peaks, flops_cache))
        print_step(row, steps[-1])

    print(f"\nMoReID step parts, {sizes.recipes['veri776']['arch']} veri776 shape, bf16 autocast "
          f"(distances and HE in fp32)")
    print(f"  {'S':<9}{'part':<17}{'ms':>9}{'GFLOP':>9}{'floor ms':>10}{'achieved':>9}", flush=True)
    parts = step_parts(sizes, device, peaks)

    size = sizes.eval_size
    print(f"\nevaluation, {size['num_q']:,d} x {size['num_g']:,d}, {size['dim']}-d, on {device.type}", flush=True)
    evaluation = eval_run(size, device, peaks, rerank=False)
    print(f"  {evaluation['seconds']:.2f} s, peak {evaluation['peak_memory_gib']:.2f} GiB, floor "
          f"{evaluation['floor_ms']:.2f} ms (achieved {evaluation['achieved_fraction']:.3f}), "
          f"mAP {evaluation['mAP']:.4f}", flush=True)
    size = sizes.rerank_size
    print(f"\nre-ranking (k1 20, k2 6, lambda 0.3), {size['num_q']:,d} x {size['num_g']:,d}, {size['dim']}-d, "
          f"on {device.type}", flush=True)
    rerank = eval_run(size, device, peaks, rerank=True)
    print(f"  {rerank['seconds']:.2f} s, peak {rerank['peak_memory_gib']:.2f} GiB, floor "
          f"{rerank['floor_ms']:.2f} ms (achieved {rerank['achieved_fraction']:.3f}), mAP {rerank['mAP']:.4f}",
          flush=True)

    print("\ntraining step, compiled (torch.compile on the backbones of f_q and f_k; '1st s' includes compiling)")
    print(STEP_HEADER, flush=True)
    for row in compiled:
        missing = missing_keys(row)
        left = sizes.budget_s - (time.perf_counter() - t0)
        if missing:
            print_unsupported(row, f"not supported by this build (no {', '.join(missing)})")
        elif left < sizes.compile_reserve_s:
            print_unsupported(row, f"skipped: {left:.0f} s of the {sizes.budget_s:.0f} s budget left")
        else:
            steps.append(step_row(row, sizes, device, peaks, flops_cache))
            print_step(row, steps[-1])

    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__, "quick": quick,
            "load_average": load, "peaks": {**{f"{p}_flops_per_s": peaks[p] for p in DTYPES},
                                            "copy_bytes_per_s": peaks["copy_bytes_per_s"]},
            "step": steps, "step_parts": parts, "evaluation": evaluation, "rerank": rerank,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke test; the test suite runs it)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu --quick for a smoke test)")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    summary = run(device, args.quick)
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
