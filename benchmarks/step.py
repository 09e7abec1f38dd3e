"""Training step cost: MoReID (f_q + f_k + dictionary) against the baseline (f_q only), same model and batch.

docs/design.md, "Performance yardsticks": the only extra cost of MoReID should be one forward pass of f_k plus the dictionary.
On the CPU: ResNet-18 at 128x64, batch 32 = 8 ids x 4, HE loss, S = 8192 (dictionary filled first).
Both steps are the engine's own :class:`reid_core.engine.trainer.TrainStep` (forward, backward,
optimizer, momentum update, enqueue, schedule), run alternately so that machine load affects both
alike; figures are medians over repeats after warmup. The headline is the wall-clock ratio; the
process CPU-time ratio is printed beside it, since on a shared machine other processes' load
disturbs wall-clock time far more. A breakdown times the parts of the MoReID step
separately. On CUDA it also measures ResNet-50 IBN + non-local at 256x256, batch 64 = 4 x 16, AMP and
channels_last, in images/s.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from reid_core.config import Config
from reid_core.engine.trainer import TrainStep
from reid_core.losses import cross_entropy_ls
from reid_core.models import build_model
from reid_core.moreid import build_framework, momentum_update

NUM_CLASSES = 200


def _config(arch: str, height: int, width: int, batch: int, k: int, framework: str, *, ibn: bool = False,
            non_local: bool = False, dict_size: int = 8192) -> Config:
    return Config().replace({
        "model.arch": arch, "model.ibn": ibn, "model.non_local": non_local,
        "data.height": height, "data.width": width, "data.batch_size": batch, "data.num_instance": k,
        "framework.name": framework, "framework.dict_size": dict_size, "loss.name": "he",
    })


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    return _timed_both(fn, device)[0]


def _timed_both(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def _build(cfg: Config, device: torch.device, amp: bool, channels_last: bool):
    """(TrainStep, framework, model) for ``cfg``, the MoReID dictionary filled with random keys."""
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES)
    framework = build_framework(cfg, model).to(device)
    if channels_last:
        framework.to(memory_format=torch.channels_last)
    step = TrainStep(cfg, framework, model, device, iters_per_epoch=1000, amp=amp, channels_last=channels_last)
    if cfg.framework.name == "moreid":
        s = cfg.framework.dict_size
        framework.dictionary.enqueue(torch.randn(s, model.feat_dim, device=device),
                                     torch.randint(0, NUM_CLASSES, (s,), device=device))
    return step, framework, model


def _batch(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    d = cfg.data
    images = torch.randn(d.batch_size, 3, d.height, d.width, device=device)
    labels = torch.arange(d.batch_size // d.num_instance, device=device).repeat_interleave(d.num_instance)
    return images, labels


def compare_steps(arch: str, height: int, width: int, batch: int, k: int, device: torch.device, *,
                  warmup: int, repeats: int, amp: bool = False, channels_last: bool = False, ibn: bool = False,
                  non_local: bool = False) -> dict[str, float]:
    """Median seconds of the baseline and MoReID steps, timed alternately: ``{name: wall}`` and
    ``{name + "_cpu": process CPU time}`` (the CPU time is what a shared machine's load disturbs least)."""
    runs = {}
    for name in ("baseline", "moreid"):
        cfg = _config(arch, height, width, batch, k, name, ibn=ibn, non_local=non_local)
        step, _, _ = _build(cfg, device, amp, channels_last)
        runs[name] = (step, _batch(cfg, device))
    times: dict[str, list[float]] = {key: [] for name in runs for key in (name, f"{name}_cpu")}
    for i in range(warmup + repeats):
        for name, (step, (images, labels)) in runs.items():
            wall, cpu = _timed_both(lambda: step(images, labels), device)
            if i >= warmup:
                times[name].append(wall)
                times[f"{name}_cpu"].append(cpu)
    return {key: statistics.median(values) for key, values in times.items()}


def breakdown(arch: str, height: int, width: int, batch: int, k: int, device: torch.device, *,
              warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each part of a MoReID step (fp32), timed one part at a time."""
    cfg = _config(arch, height, width, batch, k, "moreid")
    step, fw, model = _build(cfg, device, amp=False, channels_last=False)
    images, labels = _batch(cfg, device)

    def fq_forward_backward() -> None:
        out = model(images)
        (cross_entropy_ls(out.logits, labels, 0.1) + out.feat.square().mean()).backward()

    def fk_forward() -> None:
        with torch.no_grad():
            fw.key_encoder(images)

    with torch.no_grad():
        queries0 = fw.features(model(images).feat)
        keys = fw.features(fw.key_encoder(images).feat)

    def loss() -> None:
        queries = queries0.clone().requires_grad_(True)
        fw.metric_loss(*fw.references(queries, keys, labels)).mean().backward()

    def enqueue() -> None:
        fw.dictionary.enqueue(keys, labels)

    def optimizer() -> None:
        step.optimizer.step()

    def momentum() -> None:
        momentum_update(fw.key_encoder, fw.encoder, cfg.framework.momentum)

    parts = {"fq_fwd_bwd": fq_forward_backward, "fk_forward": fk_forward, "loss_fwd_bwd": loss,
             "enqueue": enqueue, "optimizer": optimizer, "momentum_update": momentum}
    step.optimizer.zero_grad(set_to_none=True)
    fq_forward_backward()  # gradients for the optimizer part
    times: dict[str, list[float]] = {name: [] for name in parts}
    for i in range(warmup + repeats):
        for name, fn in parts.items():
            if name == "fq_fwd_bwd":
                grads = [p.grad for p in model.parameters()]
            seconds = _timed(fn, device)
            if name == "fq_fwd_bwd":
                for p, g in zip(model.parameters(), grads):
                    p.grad = g  # keep the optimizer's input the same size each repeat
            if i >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def run(quick: bool) -> dict[str, float]:
    warmup, repeats = (2, 8) if quick else (4, 25)
    cpu = torch.device("cpu")
    shape = dict(arch="resnet18", height=128, width=64, batch=32, k=4)
    steps = compare_steps(**shape, device=cpu, warmup=warmup, repeats=repeats)
    parts = breakdown(**shape, device=cpu, warmup=max(1, warmup // 2), repeats=max(5, repeats // 2))
    ratio = steps["moreid"] / steps["baseline"]
    cpu_ratio = steps["moreid_cpu"] / steps["baseline_cpu"]
    print(f"CPU, ResNet-18 128x64, batch 32 (8 x 4), HE, S = 8192, {torch.get_num_threads()} threads; "
          f"median of {repeats} after {warmup} warmup")
    print(f"  {'step':<22}{'wall ms':>10}{'CPU ms':>10}")
    print(f"  {'baseline':<22}{steps['baseline'] * 1e3:>10.1f}{steps['baseline_cpu'] * 1e3:>10.1f}")
    print(f"  {'moreid':<22}{steps['moreid'] * 1e3:>10.1f}{steps['moreid_cpu'] * 1e3:>10.1f}")
    print(f"  {'ratio':<22}{ratio:>10.3f}{cpu_ratio:>10.3f}")
    print("  MoReID step parts (timed apart):")
    for name, seconds in parts.items():
        print(f"    {name:<20}{seconds * 1e3:>10.2f}")
    figures = {"moreid_step_over_baseline": ratio, "step_ms_baseline_cpu": steps["baseline"] * 1e3,
               "step_ms_moreid_cpu": steps["moreid"] * 1e3, "moreid_step_over_baseline_cputime": cpu_ratio}
    figures.update({f"step_part_ms_{name}": seconds * 1e3 for name, seconds in parts.items()})
    figures["fk_forward_over_fq_fwd_bwd"] = parts["fk_forward"] / parts["fq_fwd_bwd"]

    if torch.cuda.is_available():
        gpu = torch.device("cuda", torch.cuda.current_device())
        big = dict(arch="resnet50", height=256, width=256, batch=64, k=16, ibn=True, non_local=True)
        gsteps = compare_steps(**big, device=gpu, warmup=5, repeats=10 if quick else 30, amp=True,
                               channels_last=True)
        name = torch.cuda.get_device_name(gpu)
        print(f"{name}: ResNet-50 IBN + non-local 256x256, batch 64 (4 x 16), AMP, channels_last")
        for fw_name in ("baseline", "moreid"):
            seconds = gsteps[fw_name]
            print(f"  {fw_name:<22}{seconds * 1e3:>10.1f} ms  {64 / seconds:>8.0f} images/s")
        figures.update({"gpu_images_per_s_baseline_r50": 64 / gsteps["baseline"],
                        "gpu_images_per_s_moreid_r50": 64 / gsteps["moreid"],
                        "moreid_step_over_baseline_gpu_r50": gsteps["moreid"] / gsteps["baseline"]})
    return figures
