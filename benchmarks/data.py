"""Data pipeline throughput: synthetic generation time, JPEG decoding, and decoded + augmented training
images per second for 0, 1 and 2 loader workers (on synthetic JPEGs generated into a temp folder), with the
bytes each image takes out of the loader (uint8; the model normalises on its device) and, for scale, what
that normalisation costs on this CPU.

``python -m benchmarks --only data [--quick]``
"""
from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reid_core.config import DataConfig, SyntheticConfig
from reid_core.data import PixelNormalize, build_dataset, build_train_loader, read_image, synthetic

WORKERS = (0, 1, 2)


def _time_generation(tmp: Path, cfg: SyntheticConfig) -> float:
    start = time.perf_counter()
    synthetic.generate(tmp, **vars(cfg))
    return time.perf_counter() - start


def _decode_rates(paths: list[str], repeats: int) -> tuple[float, float]:
    """Images/s of :func:`read_image` (torchvision decode_jpeg) and of PIL decoding, one process."""
    blobs = [Path(p).read_bytes() for p in paths]
    start = time.perf_counter()
    for _ in range(repeats):
        for p in paths:
            read_image(p)
    ours = repeats * len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(repeats):
        for b in blobs:
            with Image.open(io.BytesIO(b)) as img:
                torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    pil = repeats * len(paths) / (time.perf_counter() - start)
    return ours, pil


def _loader_rate(dataset, cfg: DataConfig, batches: int) -> tuple[float, int]:
    """Training images/s through the loader, after one warm-up batch (worker start-up excluded), and the
    bytes of one image in the loader's batches."""
    loader = build_train_loader(dataset, cfg, seed=0)
    it = iter(loader)
    first, _, _ = next(it)
    image_bytes = first[0].numel() * first.element_size()
    images, done = 0, 0
    start = time.perf_counter()
    while done < batches:
        try:
            x, _, _ = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        images += len(x)
        done += 1
    rate = images / (time.perf_counter() - start)
    del it, loader
    return rate, image_bytes


def _normalize_rate(cfg: DataConfig, repeats: int) -> float:
    """Images/s of PixelNormalize on this CPU (the model's first layer; on a GPU it runs on the device)."""
    batch = torch.randint(0, 256, (cfg.batch_size, 4, cfg.height, cfg.width), dtype=torch.uint8)
    norm = PixelNormalize()
    norm(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        norm(batch)
    return repeats * cfg.batch_size / (time.perf_counter() - start)


def run(quick: bool = False) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a DataLoader worker; the main process of a trainer is busy training
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="moreid-bench-data-") as tmp_dir:
        tmp = Path(tmp_dir)
        results["synthetic_default_gen_s"] = _time_generation(tmp / "default", SyntheticConfig())
        big = SyntheticConfig(ids=40 if quick else 100, cams=4, images_per_id_cam=4 if quick else 6,
                              height=128, width=64)
        results["synthetic_128x64_gen_s"] = _time_generation(tmp / "big", big)
        dataset = build_dataset("synthetic", tmp / "big")
        sample = [s.path for s in dataset.train[:100]]
        results["decode_torchvision_images_per_s"], results["decode_pil_images_per_s"] = \
            _decode_rates(sample, 2 if quick else 5)
        batches = 8 if quick else 30
        for workers in WORKERS:
            cfg = DataConfig(height=256, width=128, batch_size=64, num_instance=4, workers=workers)
            results[f"data_images_per_s_w{workers}"], results["data_bytes_per_image"] = \
                _loader_rate(dataset, cfg, batches)
        results["normalize_cpu_images_per_s"] = _normalize_rate(cfg, 5 if quick else 20)

    n_default = SyntheticConfig().ids * SyntheticConfig().cams * SyntheticConfig().images_per_id_cam
    n_big = big.ids * big.cams * big.images_per_id_cam
    print(f"data pipeline ({'quick' if quick else 'full'}; {torch.get_num_threads()} torch thread, "
          f"JPEGs 128x64 -> input 256x128, flip + pad-crop + random erasing, batch 64)")
    print(f"  {'measure':<44}{'value':>12}")
    print(f"  {'synthetic generation, default (%d images), s' % n_default:<44}"
          f"{results['synthetic_default_gen_s']:>12.2f}")
    print(f"  {'synthetic generation, 128x64 (%d images), s' % n_big:<44}{results['synthetic_128x64_gen_s']:>12.2f}")
    print(f"  {'decode, torchvision decode_jpeg, images/s':<44}{results['decode_torchvision_images_per_s']:>12.0f}")
    print(f"  {'decode, PIL, images/s':<44}{results['decode_pil_images_per_s']:>12.0f}")
    for workers in WORKERS:
        print(f"  {'loader, %d worker(s), images/s' % workers:<44}{results[f'data_images_per_s_w{workers}']:>12.0f}")
    print(f"  {'loader output, bytes per image':<44}{results['data_bytes_per_image']:>12.0f}")
    print(f"  {'PixelNormalize on this CPU, images/s':<44}{results['normalize_cpu_images_per_s']:>12.0f}")
    return results


if __name__ == "__main__":
    run(quick=True)
