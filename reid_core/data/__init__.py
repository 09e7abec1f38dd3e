"""Re-ID data: dataset readers, the synthetic generator, the P x K sampler, transforms, loaders (uint8
images) and the on-device normalisation layer; the global-batch check.

See docs/architecture.md (Data contract). Names are imported on first use (PEP 562), so that reading a
dataset's layout (``reid_core.data.datasets``) or checking the global batch (``reid_core.data.batch``)
does not import torch: the study driver checks datasets in a second, before anything heavy is loaded.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "reid_core.data.batch": ("check_global_batch", "per_worker_batch"),
    "reid_core.data.datasets": ("DATASET_NAMES", "DatasetError", "ReIDDataset", "Sample", "build_dataset",
                                "load_dataset"),
    "reid_core.data.loader": ("CorruptImageWarning", "ReIDLoader", "build_test_loader", "build_train_loader",
                              "dataset_num_classes", "read_image"),
    "reid_core.data.normalize": ("PixelNormalize",),
    "reid_core.data.sampler": ("PKSampler",),
    "reid_core.data.transforms": ("IMAGENET_MEAN", "IMAGENET_STD", "RandomErasingMask", "build_test_transform",
                                  "build_train_transform"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'reid_core.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
