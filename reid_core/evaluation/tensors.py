"""Tensor helpers shared by ranking, re-ranking and query expansion (a leaf: imports nothing of the package)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Neighbour lists are built this many rows x N entries at a time at most (besides the memory budget).
ROWS_PAIRS = 1 << 24


def as_tensor(x, name: str) -> Tensor:
    """``x`` (a tensor, detached, or a numeric NumPy-like array) as a tensor; ``name`` for the error."""
    if isinstance(x, Tensor):
        return x.detach()
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if not arr.flags.writeable or not arr.dtype.isnative:
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr))


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN or infinity; amin/amax propagate NaN and are far cheaper than isfinite."""
    return bool(torch.isfinite(x.amin())) and bool(torch.isfinite(x.amax()))


def smallest_k(rows: Tensor, k: int) -> Tensor:
    """long[R, k]: each row's k smallest entries' columns, ascending by (value, column), of float[R, N].

    ``topk`` picks an arbitrary subset of the entries equal to the k-th smallest value: a row where the
    (k + 1)-th smallest equals the k-th (rare) is sorted in full with a stable sort instead.
    """
    k = min(k, rows.shape[1])
    values, columns = torch.topk(rows, min(k + 1, rows.shape[1]), dim=1, largest=False, sorted=True)
    crowded = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1) if values.shape[1] > k else None
    values, columns = values[:, :k], columns[:, :k]
    columns, order = columns.sort(dim=1)  # equal values: ascending columns
    columns = columns.gather(1, values.gather(1, order).sort(dim=1, stable=True).indices)
    if crowded is not None and crowded.numel():
        columns[crowded] = rows[crowded].sort(dim=1, stable=True).indices[:, :k]
    return columns
