"""Re-ID data: dataset readers, the synthetic generator, the P x K sampler, transforms and loaders.

See docs/architecture.md (Data contract).
"""
from reid_core.data.datasets import (
    DATASET_NAMES,
    DatasetError,
    ReIDDataset,
    Sample,
    build_dataset,
    load_dataset,
)
from reid_core.data.loader import (
    CorruptImageWarning,
    ReIDLoader,
    build_test_loader,
    build_train_loader,
    dataset_num_classes,
    read_image,
)
from reid_core.data.sampler import PKSampler
from reid_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_test_transform, build_train_transform

__all__ = [
    "DATASET_NAMES", "DatasetError", "ReIDDataset", "Sample", "build_dataset", "load_dataset",
    "CorruptImageWarning", "ReIDLoader", "build_test_loader", "build_train_loader", "dataset_num_classes",
    "read_image", "PKSampler", "IMAGENET_MEAN", "IMAGENET_STD", "build_test_transform", "build_train_transform",
]
