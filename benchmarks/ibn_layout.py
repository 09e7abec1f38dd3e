"""channels_last through IBN-a blocks: does keeping the layout pay? ``python -m benchmarks.ibn_layout [--quick]``.

A ResNet-50 IBN-a backbone (last stride 1), forward + backward on a batch, in three layouts:

* ``nchw``: the default layout (``train.channels_last: false``);
* ``cl_flip``: channels_last weights and input, with the IBN blocks as before (``nn.InstanceNorm2d`` on a
  ``.contiguous()`` half, so every IBN output is back in the default layout and the next convolution
  converts again);
* ``cl_keep``: channels_last kept through the IBN blocks (:class:`reid_core.models.IBN` with
  ``keep_layout=True``; off by default until a GPU measurement shows it faster).

The variants run interleaved so that machine load affects them alike; the figures are medians of wall
time and of process CPU time per step. ``train.channels_last`` is applied on CUDA only, where cuDNN's
NHWC kernels decide the outcome: this CPU measurement does not settle it, the GPU measurement is still
due (``--device cuda``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from reid_core.models import IBN, ResNetBackbone

VARIANTS = ("nchw", "cl_flip", "cl_keep")


def _backbone(variant: str, device: torch.device) -> ResNetBackbone:
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet50", last_stride=1, ibn=True).to(device).train()
    for module in backbone.modules():
        if isinstance(module, IBN):
            module.keep_layout = variant == "cl_keep"
    if variant != "nchw":
        backbone.to(memory_format=torch.channels_last)
    return backbone


def _step(backbone: ResNetBackbone, x: torch.Tensor, device: torch.device) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    backbone(x).square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    backbone.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def run(quick: bool = False, device: str = "cpu") -> dict[str, float]:
    dev = torch.device(device)
    batch, height, width = (4, 128, 64) if quick else (8, 256, 128)
    if dev.type == "cuda":
        batch, height, width = 64, 256, 256
    repeats = 3 if quick else 5
    backbones = {v: _backbone(v, dev) for v in VARIANTS}
    x = torch.randn(batch, 3, height, width, device=dev)
    inputs = {"nchw": x, "cl_flip": x.contiguous(memory_format=torch.channels_last)}
    inputs["cl_keep"] = inputs["cl_flip"]
    with torch.no_grad():  # the variants compute the same function
        ref = backbones["nchw"].eval()(x)
        for v in VARIANTS[1:]:
            out = backbones[v].eval()(inputs[v])
            assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3), f"{v} differs from nchw"
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for backbone in backbones.values():
        backbone.train()
    for r in range(repeats + 1):
        for v in VARIANTS:
            t = _step(backbones[v], inputs[v], dev)
            if r:  # the first round is warmup
                times[v].append(t)
    result: dict[str, float] = {}
    print(f"ResNet-50 IBN-a forward + backward, batch {batch} x 3 x {height} x {width} on {dev}, "
          f"median of {repeats} (wall s / CPU s per step)")
    for v in VARIANTS:
        wall = statistics.median(t[0] for t in times[v])
        cpu = statistics.median(t[1] for t in times[v])
        result[f"ibn_{v}_wall_s"], result[f"ibn_{v}_cpu_s"] = wall, cpu
        print(f"  {v:8s} {wall:7.3f} {cpu:7.3f}")
    result["ibn_cl_keep_over_flip_wall"] = result["ibn_cl_keep_wall_s"] / result["ibn_cl_flip_wall_s"]
    result["ibn_cl_keep_over_nchw_wall"] = result["ibn_cl_keep_wall_s"] / result["ibn_nchw_wall_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ibn_layout", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch and fewer repeats")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
