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

__all__ = ["DATASET_NAMES", "DatasetError", "ReIDDataset", "Sample", "build_dataset", "load_dataset"]
