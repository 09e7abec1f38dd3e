"""A backbone pretrained here: identity classification on synthetic identities the studies never see.

The paper fine-tunes from ImageNet weights; a machine that downloads nothing can still start from ordered
features by pretraining on identities of its own. :class:`SyntheticPretrain` is the recipe: a synthetic
dataset of another generator seed than the studies' (seed 0) and more identities, every image of every
identity a training image, a ResNet backbone + global average pooling + BatchNorm + a linear classifier
trained with cross-entropy. The result is deterministic (a seeded initialisation, a seeded data order, one
thread count) and cached under a key of every setting of the recipe (:meth:`SyntheticPretrain.key`):
:func:`ensure_pretrained` makes it once (under a file lock, so that concurrent trials wait for one maker)
and returns the file, a ``backbone.``-prefixed state dict that ``model.pretrained: <file>`` loads strictly
(:func:`reid_core.models.pretrained.load_pretrained`). ``python -m reid_core.pretrain [--cache DIR]
[--ids N ...]`` makes it from the command line and prints the path.

Shapes: images ``uint8[B, 3, H, W]`` normalised by :class:`reid_core.data.normalize.PixelNormalize`;
backbone features ``float32[B, C, h, w]`` pooled to ``float32[B, C]``; logits ``float32[B, ids]``.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from reid_core.config import ModelConfig, SyntheticConfig
from reid_core.data import synthetic
from reid_core.data.datasets import read_synthetic
from reid_core.data.loader import read_image
from reid_core.data.normalize import PixelNormalize
from reid_core.files import write_atomic
from reid_core.models.backbone import build_backbone
from reid_core.models.pretrained import default_cache_dir, resolve_pretrained

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the training procedure changes: old files are then not reused


@dataclass(frozen=True)
class SyntheticPretrain:
    """The pretraining recipe. Defaults: the fidelity study's backbone and input size (ResNet-18, last
    stride 1, 64 x 32), 1,000 identities of generator seed 1 (the studies use seed 0 and 200), 4 cameras x 4
    images each (16,000 images), 3 epochs of batches of 64 with Adam at 1e-3 (cosine to 0)."""

    arch: str = "resnet18"
    ibn: bool = False
    last_stride: int = 1
    layout: str = "market1501"
    ids: int = 1000
    cams: int = 4
    images_per_id_cam: int = 4
    height: int = 64
    width: int = 32
    data_seed: int = 1  # the synthetic generator's seed: not the studies' 0, so the identities are others
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1.0e-3
    seed: int = 0  # initialisation and data order
    threads: int = 1  # CPU threads while training: the same count gives the same bits

    def __post_init__(self) -> None:
        for name in ("ids", "cams", "images_per_id_cam", "height", "width", "epochs", "batch_size", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"pretraining: {name} must be a positive integer, got {value!r}")
        if self.ids < 2:
            raise ValueError(f"pretraining: ids must be at least 2 (a classifier needs classes), got {self.ids}")
        if self.data_seed == SyntheticConfig().seed:
            raise ValueError(f"pretraining: data_seed {self.data_seed} is the studies' generator seed; pick "
                             "another so that the pretraining identities are not the study's")
        if not self.lr > 0:
            raise ValueError(f"pretraining: lr must be positive, got {self.lr}")

    def synthetic_config(self) -> SyntheticConfig:
        return SyntheticConfig(layout=self.layout, ids=self.ids, cams=self.cams,
                               images_per_id_cam=self.images_per_id_cam, height=self.height, width=self.width,
                               seed=self.data_seed)

    def key(self) -> str:
        """16 hex digits of SHA-256 over every setting, the recipe version and the generator version."""
        text = json.dumps({**asdict(self), "recipe": RECIPE_VERSION, "generator": synthetic.GENERATOR_VERSION},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def file_name(self) -> str:
        return f"synthetic-{self.arch}{'-ibn' if self.ibn else ''}-{self.key()}.pt"


class _Classifier(nn.Module):
    """Backbone -> global average pooling -> BatchNorm -> linear: ``uint8[B, 3, H, W]`` -> logits."""

    def __init__(self, recipe: SyntheticPretrain) -> None:
        super().__init__()
        self.normalize = PixelNormalize()
        self.backbone = build_backbone(recipe.arch, last_stride=recipe.last_stride, ibn=recipe.ibn)
        self.bn = nn.BatchNorm1d(self.backbone.out_channels)
        self.fc = nn.Linear(self.backbone.out_channels, recipe.ids, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(self.normalize(images)).mean(dim=(2, 3))
        return self.fc(self.bn(feat))


def _images(recipe: SyntheticPretrain, data_cache: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the recipe's dataset, ``uint8[N, 3, H, W]``, and its class ``int64[N]`` (0-based)."""
    root = synthetic.ensure(recipe.synthetic_config(), data_cache)
    dataset = read_synthetic(root)
    samples = sorted(dataset.train + dataset.query + dataset.gallery, key=lambda s: s.path)
    pids = sorted({s.pid for s in samples})
    index = {pid: i for i, pid in enumerate(pids)}
    images = torch.stack([read_image(s.path) for s in samples])
    labels = torch.tensor([index[s.pid] for s in samples], dtype=torch.int64)
    return images, labels


def pretrain(recipe: SyntheticPretrain, out: str | os.PathLike, data_cache: str | os.PathLike | None = None) -> dict:
    """Train the recipe and write its backbone to ``out`` (atomically; ``backbone.``-prefixed tensors);
    return the run's summary (also written beside it as ``<out>.json``). ``data_cache``: where the
    synthetic dataset is generated (default: the synthetic cache, :func:`reid_core.data.synthetic.cache_root`)."""
    start = time.time()
    images, labels = _images(recipe, data_cache)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        torch.manual_seed(recipe.seed)
        model = _Classifier(recipe)
        model.train()
        steps_per_epoch = max(1, len(labels) // recipe.batch_size)
        total = steps_per_epoch * recipe.epochs
        optim = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=total)
        order = torch.Generator().manual_seed(recipe.seed)
        loss_fn = nn.CrossEntropyLoss()
        correct = seen = 0
        last_loss = float("nan")
        for epoch in range(recipe.epochs):
            perm = torch.randperm(len(labels), generator=order)
            flips = torch.rand(len(labels), generator=order) < 0.5
            correct = seen = 0
            for step in range(steps_per_epoch):
                idx = perm[step * recipe.batch_size:(step + 1) * recipe.batch_size]
                batch = images[idx]
                batch = torch.where(flips[idx].view(-1, 1, 1, 1), batch.flip(3), batch)
                logits = model(batch)
                loss = loss_fn(logits, labels[idx])
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                schedule.step()
                last_loss = float(loss.detach())
                correct += int((logits.argmax(1) == labels[idx]).sum())
                seen += len(idx)
            log.info("pretraining epoch %d/%d: loss %.3f, train accuracy %.1f %%", epoch + 1, recipe.epochs,
                     last_loss, 100 * correct / seen)
    finally:
        torch.set_num_threads(threads)
    state = {f"backbone.{k}": v.detach().clone() for k, v in model.backbone.state_dict().items()}
    write_atomic(out, lambda fh: torch.save(state, fh))
    summary = {"recipe": asdict(recipe), "key": recipe.key(), "images": len(labels), "steps": total,
               "final_loss": last_loss, "last_epoch_train_accuracy": 100 * correct / max(seen, 1),
               "seconds": round(time.time() - start, 1)}
    write_atomic(f"{out}.json", lambda fh: fh.write(json.dumps(summary, indent=1).encode()))
    return summary


def ensure_pretrained(recipe: SyntheticPretrain, cache_dir: str | os.PathLike | None = None,
                      data_cache: str | os.PathLike | None = None) -> Path:
    """The recipe's weights file under ``cache_dir`` (default: the pretrained-weights cache), made on first
    use (its dataset under ``data_cache``). Concurrent callers serialise on ``<file>.lock``: one trains,
    the others find its file."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / recipe.file_name()
    if target.is_file():
        return target
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            log.info("pretraining %s (key %s) into %s", recipe.arch, recipe.key(), target)
            pretrain(recipe, target, data_cache)
    return target


def resolve_weights(spec: str, arch: str, *, ibn: bool, cache_dir: str | os.PathLike | None = None,
                    **sources) -> Path | None:
    """The local file ``model.pretrained = spec`` means: ``synthetic`` is this module's recipe for ``arch``
    (made once into ``cache_dir``, minutes on a CPU); anything else as
    :func:`reid_core.models.pretrained.resolve_pretrained` (``sources``: its keyword)."""
    if spec == "synthetic":
        return ensure_pretrained(SyntheticPretrain(arch=arch, ibn=bool(ibn)), cache_dir or None)
    return resolve_pretrained(spec, arch, ibn=ibn, cache_dir=cache_dir, **sources)


def with_resolved_weights(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``pretrained: synthetic`` replaced by its file (made when missing); other values as they
    are (build_model resolves them)."""
    if cfg.pretrained != "synthetic":
        return cfg
    path = resolve_weights(cfg.pretrained, cfg.arch, ibn=cfg.ibn, cache_dir=cfg.pretrained_cache or None)
    return replace(cfg, pretrained=str(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_core.pretrain",
                                     description="Make (once) the backbone pretrained on synthetic identities.")
    parser.add_argument("--cache", default="", help="folder of the weights (default: the pretrained cache)")
    for f in fields(SyntheticPretrain):
        kind = {"bool": lambda s: s.lower() in ("1", "true", "yes"), "int": int, "float": float}.get(f.type, str)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    args = vars(parser.parse_args(argv))
    cache = args.pop("cache")
    try:
        recipe = SyntheticPretrain(**args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_pretrained(recipe, cache or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
