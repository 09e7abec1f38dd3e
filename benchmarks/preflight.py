"""The study driver's dataset scan and what handing its index to the trials saves.

Generates a VeRi-Wild-sized tree (416,314 images, empty files: a listing benchmark) with its list files,
then measures:

- ``scan_s``: the driver's preflight read (``study.driver.preflight.scan``: list files, vehicle_info.txt, and a
  listing of each of the 40,671 identity folders to check that every listed image exists) plus the counts
  the checks use (``facts_of``);
- ``trial_read_s``: what each trial spent before this change to read the same dataset itself
  (``build_dataset``, list files only);
- ``handoff_s``: what a trial spends now to take the driver's index: unpickling it, as ``ray.get`` does
  for a Python object in the object store (its copy out of shared memory is not counted);
- ``saved_per_trial_s`` = ``trial_read_s - handoff_s``.

``python -m benchmarks --only preflight [--quick]`` (quick: a tenth of the tree).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from reid_core.data.datasets import build_dataset
from study.driver.preflight import facts_of, scan

# VeRi-Wild (supplementary A): 30,671 training identities with 277,797 images; the large test set of
# 10,000 identities has 138,517 gallery images and 10,000 queries (taken from the gallery images here).
TRAIN_IDS, TRAIN_IMAGES = 30_671, 277_797
TEST_IDS, GALLERY_IMAGES = 10_000, 138_517
CAMERAS = 174


def _split(rng: np.random.Generator, images: int, ids: int) -> np.ndarray:
    """Images per identity: at least 1 each, the rest spread at random."""
    return 1 + np.bincount(rng.integers(0, ids, images - ids), minlength=ids)


def generate_tree(root: Path, scale: float = 1.0, seed: int = 0) -> int:
    """Write the tree; returns the number of image files."""
    rng = np.random.default_rng(seed)
    train_ids, test_ids = int(TRAIN_IDS * scale), int(TEST_IDS * scale)
    train = _split(rng, int(TRAIN_IMAGES * scale), train_ids)
    test = _split(rng, int(GALLERY_IMAGES * scale), test_ids)
    split = root / "train_test_split"
    split.mkdir(parents=True)
    n = 10000  # the large test subset
    info = ["id/image;Camera ID;Time;Model;Type;Color"]
    lists: dict[str, list[str]] = {"train": [], "gallery": [], "query": []}
    image_id = 0
    for vid, count in enumerate([*train, *test], start=1):
        folder = root / "images" / f"{vid:05d}"
        folder.mkdir(parents=True)
        kind = "train" if vid <= train_ids else "gallery"
        for k in range(int(count)):
            image_id += 1
            key = f"{vid:05d}/{image_id:06d}"
            os.close(os.open(folder / f"{image_id:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
            info.append(f"{key};{int(rng.integers(1, CAMERAS + 1))};2018-03-11 08:33:18;x;y;z")
            lists[kind].append(key)
            if kind == "gallery" and k == 0:
                lists["query"].append(key)
    (root / "train_test_split" / "vehicle_info.txt").write_text("\n".join(info) + "\n")
    (split / "train_list.txt").write_text("\n".join(lists["train"]) + "\n")
    (split / f"test_{n}.txt").write_text("\n".join(lists["gallery"]) + "\n")
    (split / f"test_{n}_query.txt").write_text("\n".join(lists["query"]) + "\n")
    return image_id


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(quick: bool) -> dict[str, float]:
    scale = 0.1 if quick else 1.0
    with tempfile.TemporaryDirectory(prefix="moreid-bench-veriwild-") as tmp:
        root = Path(tmp) / "VeRi-Wild"
        start = time.perf_counter()
        files = generate_tree(root, scale)
        generate_s = time.perf_counter() - start
        scan_s, _ = _best(lambda: facts_of(scan("veriwild-large", str(root))), 2)
        dataset = scan("veriwild-large", str(root))
        read_s, _ = _best(lambda: build_dataset("veriwild-large", root), 2)
        blob = pickle.dumps(dataset, protocol=5)
        handoff_s, _ = _best(lambda: pickle.loads(blob), 3)
    out = {"preflight_files": float(files), "preflight_generate_s": generate_s, "preflight_scan_s": scan_s,
           "preflight_trial_read_s": read_s, "preflight_handoff_s": handoff_s,
           "preflight_index_mb": len(blob) / 2**20, "preflight_saved_per_trial_s": read_s - handoff_s}
    print(f"VeRi-Wild-sized tree: {files:,} image files (empty), generated in {generate_s:.1f} s")
    print(f"  driver scan (lists + every identity folder listed + counts): {scan_s:8.2f} s")
    print(f"  a trial reading the dataset itself (before):                 {read_s:8.2f} s")
    print(f"  a trial taking the driver's index (unpickle, {len(blob) / 2**20:.0f} MB):       {handoff_s:8.2f} s")
    print(f"  saved per trial:                                             {read_s - handoff_s:8.2f} s")
    return out
