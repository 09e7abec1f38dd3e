"""The in-batch metric loss sees the global batch: 1 and 2 gloo workers give the same loss, the same
averaged gradients and (MoReID) the same dictionary for the same global batch.

One worker runs in this process on the whole batch; two real processes (torch.multiprocessing spawn, gloo,
file:// rendezvous) each take half of it, whole identities per worker as the P x K sampler deals them, f_q
wrapped in DDP. BatchNorm is in eval mode so that a sample's features do not depend on its batch-mates.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from reid_core.config import Config
from reid_core.models import build_model
from reid_core.moreid import build_framework

WORLD = 2
K = 4  # images per identity; the global batch is 4 identities x 4
CASES = {
    "baseline_he": {"framework.name": "baseline", "loss.name": "he"},
    "baseline_weighted_triplet": {"framework.name": "baseline", "loss.name": "triplet",
                                  "loss.triplet_mining": "weighted", "loss.margin": 0.0},
    "moreid_he": {"framework.name": "moreid", "loss.name": "he"},
}


def _framework(overrides: dict):
    cfg = Config().replace({"model.arch": "resnet18", "framework.dict_size": 24, "data.batch_size": 16,
                            "data.num_instance": K, "framework.momentum": 0.9, **overrides})
    torch.manual_seed(0)
    fw = build_framework(cfg, build_model(cfg.model, num_classes=8))
    fw.train()
    for module in fw.modules():  # BatchNorm made equal: running statistics, whatever the batch split
        if isinstance(module, _BatchNorm):
            module.eval()
    return fw


def _global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(16, 3, 32, 16, generator=g)
    labels = (torch.arange(4) + 4 * (step % 2)).repeat_interleave(K)
    return images, labels


def _run(fw, steps: int = 2) -> list[dict]:
    """``steps`` steps; per step the loss terms (averaged over workers), the averaged gradients and the
    dictionary after ``after_optimizer_step`` (which enqueues the keys). The learning rate is 0 so that
    both runs take their second step's gradients at the same parameters (a step's rounding differences
    would otherwise cross the hinge kinks of the losses)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    optimizer = torch.optim.SGD([p for p in fw.parameters() if p.requires_grad], lr=0.0)
    records = []
    for step in range(steps):
        images, labels = _global_batch(step)
        share = len(labels) // world
        mine = slice(rank * share, (rank + 1) * share)
        out = fw(images[mine], labels[mine], instances=K)
        out.loss.backward()
        terms = torch.stack([out.loss, out.terms["ce"], out.terms["metric"]]).detach()
        if world > 1:
            dist.all_reduce(terms)
            terms /= world
        grads = {n: p.grad.clone() for n, p in fw.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        fw.after_optimizer_step()
        record = {"terms": terms, "grads": grads}
        if hasattr(fw, "dictionary"):
            record["dictionary"] = {k: v.clone() for k, v in fw.dictionary.state_dict().items()}
        records.append(record)
    return records


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, overrides in CASES.items():
            fw = _framework(overrides)
            fw.encoder = DistributedDataParallel(fw.encoder)
            records = _run(fw)
            for record in records:  # DDP's wrapper prefixes f_q's parameter names
                record["grads"] = {n.replace("encoder.module.", "encoder."): g for n, g in record["grads"].items()}
            results[name] = records
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_one_and_two_workers_give_the_same_loss_gradients_and_dictionary(tmp_path):
    single = {name: _run(_framework(overrides)) for name, overrides in CASES.items()}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, str(tmp_path))) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    hung = [proc.pid for proc in procs if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert not hung, f"gloo workers hung: {hung}"
    assert [proc.exitcode for proc in procs] == [0] * WORLD
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in CASES:
        for step, (one, *two) in enumerate(zip(single[name], ranks[0][name], ranks[1][name])):
            where = f"{name}, step {step}"
            for rank, record in enumerate(two):
                # loss, CE (local on each worker, averaged = the global mean) and metric loss
                torch.testing.assert_close(record["terms"], one["terms"], rtol=1e-5, atol=1e-6, msg=where)
                assert record["grads"].keys() == one["grads"].keys(), where
                for param, grad in one["grads"].items():
                    torch.testing.assert_close(record["grads"][param], grad, rtol=1e-4, atol=1e-5,
                                               msg=f"{where}, rank {rank}: {param}")
                if "dictionary" in one:  # keys enqueued in rank order = the one worker's batch order
                    assert torch.equal(record["dictionary"]["labels"], one["dictionary"]["labels"]), where
                    assert torch.equal(record["dictionary"]["ptr"], one["dictionary"]["ptr"]), where
                    torch.testing.assert_close(record["dictionary"]["keys"], one["dictionary"]["keys"],
                                               rtol=1e-5, atol=1e-6, msg=where)
        assert single[name][0]["terms"][2] > 0, f"{name}: a metric loss of 0 would test nothing"
    assert single["moreid_he"][1]["dictionary"]["ptr"] == 2 * 16 % 24  # two global batches enqueued
