"""Under data parallelism every worker ends with the same dictionary and the same f_k (docs/design.md, "The method").

Two real processes with a gloo process group (torch.multiprocessing spawn, file:// rendezvous).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from reid_core.config import Config
from reid_core.models import build_model
from reid_core.moreid import KeyDictionary, build_framework

WORLD = 2


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        # a bare dictionary: each worker enqueues its own keys, three times (the last wraps around)
        dictionary = KeyDictionary(size=10, dim=3)
        for step in range(3):
            keys = torch.full((2, 3), float(100 * rank + step)) + torch.arange(2.0).unsqueeze(1)
            dictionary.enqueue(keys, torch.tensor([10 * rank + step, 10 * rank + step]))

        # MoReID steps with f_q wrapped in DDP, each worker on its own images and identities
        cfg = Config().replace({"model.arch": "resnet18", "framework.dict_size": 32, "loss.name": "he",
                                "data.batch_size": 8, "data.num_instance": 2})
        torch.manual_seed(0)  # identical initial weights on both workers
        framework = build_framework(cfg, build_model(cfg.model, num_classes=8))
        framework.encoder = DistributedDataParallel(framework.encoder)
        optimizer = torch.optim.SGD([p for p in framework.parameters() if p.requires_grad], lr=0.1)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            images = torch.randn(8, 3, 32, 16, generator=g)
            labels = torch.arange(4).repeat_interleave(2) + 4 * rank
            out = framework(images, labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            framework.after_optimizer_step()
        torch.save({"dictionary": dictionary.state_dict(), "moreid_dictionary": framework.dictionary.state_dict(),
                    "key_encoder": framework.key_encoder.state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_workers_end_with_identical_dictionaries_and_key_encoders(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    first, second = (s["dictionary"] for s in states)
    for name in ("keys", "labels", "ptr"):
        assert torch.equal(first[name], second[name]), name
    # 3 steps x 2 workers x 2 keys = 12 keys into 10 slots: rank 0's keys come before rank 1's each step
    assert first["ptr"].item() == 2
    assert first["labels"].tolist() == [12, 12, 10, 10, 1, 1, 11, 11, 2, 2]
    assert first["keys"][:, 0].tolist() == [102, 103, 100, 101, 1, 2, 101, 102, 2, 3]

    moreid_a, moreid_b = (s["moreid_dictionary"] for s in states)
    for name in ("keys", "labels", "ptr"):
        assert torch.equal(moreid_a[name], moreid_b[name]), name
    labels = moreid_a["labels"].tolist()
    assert moreid_a["ptr"].item() == 2 * 2 * 8 % 32  # 2 steps x 2 workers x 8 keys
    assert set(labels[:8]) == {0, 1, 2, 3} and set(labels[8:16]) == {4, 5, 6, 7}  # rank order
    assert set(labels[16:24]) == {0, 1, 2, 3} and set(labels[24:]) == {4, 5, 6, 7}

    key_a, key_b = (s["key_encoder"] for s in states)
    for name in key_a:
        assert torch.equal(key_a[name], key_b[name]), name
