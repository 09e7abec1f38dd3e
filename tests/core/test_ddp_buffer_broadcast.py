"""One buffer broadcast per training step under DDP, and every rank still ends with the same f_q
(BatchNorm statistics included), f_k and dictionary.

Two real gloo processes run TrainSteps with f_q wrapped as the Trainer wraps it; ``dist.broadcast`` (the
framework's) and ``dist._broadcast_coalesced`` (DDP's own buffer and parameter sync) are wrapped with
counting functions that call through.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reid_core.config import Config
from reid_core.engine.trainer import TrainStep, wrap_ddp
from reid_core.models import build_model
from reid_core.moreid import build_framework

WORLD = 2
STEPS = 3


def _worker(rank: int, folder: str, name: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        cfg = Config().replace({"model.arch": "resnet18", "framework.name": name, "framework.dict_size": 32,
                                "data.batch_size": 16, "data.num_instance": 4, "loss.name": "he"})
        torch.manual_seed(0)
        model = build_model(cfg.model, num_classes=8)
        framework = build_framework(cfg, model).train()
        step = TrainStep(cfg, framework, model, torch.device("cpu"), iters_per_epoch=10)
        framework.encoder = wrap_ddp(model, torch.device("cpu"))  # after its own init sync
        counts = {"broadcast": 0, "_broadcast_coalesced": 0}
        originals = {n: getattr(dist, n) for n in counts}

        def counting(n):
            def call(*args, **kwargs):
                counts[n] += 1
                return originals[n](*args, **kwargs)
            return call

        g = torch.Generator().manual_seed(rank)
        for n in counts:
            setattr(dist, n, counting(n))
        try:
            for _ in range(STEPS):  # each rank its own identities, so BatchNorm statistics differ per rank
                step(torch.randn(8, 3, 32, 16, generator=g), torch.arange(2).repeat_interleave(4) + 2 * rank)
        finally:
            for n, original in originals.items():
                setattr(dist, n, original)
        torch.save({"counts": counts, "state": framework.state_dict()}, f"{folder}/{name}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_one_buffer_broadcast_per_step_and_identical_ranks(tmp_path):
    for name in ("moreid", "baseline"):
        mp.spawn(_worker, args=(str(tmp_path), name), nprocs=WORLD, join=True)
        r0, r1 = (torch.load(tmp_path / f"{name}{rank}.pt") for rank in range(WORLD))
        assert r0["counts"] == r1["counts"] == {"broadcast": STEPS, "_broadcast_coalesced": 0}, name
        differ = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
        assert differ == [], (name, differ)
        running = [k for k in r0["state"] if k.endswith("running_mean")]
        assert running and not torch.equal(r0["state"][running[0]], torch.zeros_like(r0["state"][running[0]]))
