"""The MoReID dictionary: a FIFO ring of past keys from f_k with their identity labels (docs/design.md, "The method")."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .collective import gather


class KeyDictionary(nn.Module):
    """``size`` keys of ``dim`` features and their labels; empty slots have label -1.

    Buffers (saved in checkpoints, moved with ``.to()``): ``keys float[S, D]``, ``labels long[S]``,
    ``ptr`` (long scalar: the slot the next key goes to). Slots are filled in order and, once all are
    full, overwritten oldest first.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"dictionary {name} must be a positive integer, got {value!r}")
        self.size, self.dim = size, dim
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def valid_mask(self) -> Tensor:
        """``bool [S]``: slots holding a key."""
        return self.labels >= 0

    @property
    def fill(self) -> float:
        """Fraction of slots holding a key, in [0, 1]."""
        return float(self.fill_tensor())

    def fill_tensor(self) -> Tensor:
        """:attr:`fill` as a device scalar (no host synchronization)."""
        return self.valid_mask().sum() / self.size

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor, *, gathered: bool = False, keep: Tensor | None = None) -> None:
        """Append ``keys [n, D]`` with ``labels long[n]`` (>= 0), overwriting the oldest slots.

        Under an initialised ``torch.distributed`` process group the keys and labels of every rank are
        all-gathered first (in rank order), so every worker holds the same dictionary; ``gathered=True``
        says the caller passes the gathered keys already. When more keys arrive than the dictionary
        holds, the newest ``S`` are kept. ``keep`` (bool scalar on the device): when False nothing
        changes; it is applied on the device, without host synchronization.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [n, {self.dim}]; got shape {tuple(keys.shape)}")
        if labels.shape != keys.shape[:1]:
            raise ValueError(f"labels must be [{keys.shape[0]}] to match the keys; got shape {tuple(labels.shape)}")
        keys, labels = keys.detach().to(self.keys.dtype), labels.to(self.labels.dtype)
        if not gathered:
            keys, labels = gather(keys), gather(labels)
        if keys.shape[0] > self.size:
            keys, labels = keys[-self.size:], labels[-self.size:]
        n = keys.shape[0]
        # Slot indices computed on the device: no host synchronization on the pointer.
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        step = torch.full_like(self.ptr, n)
        if keep is not None:
            keep = keep.to(device=self.keys.device, dtype=torch.bool)
            keys = torch.where(keep, keys, self.keys.index_select(0, slots))
            labels = torch.where(keep, labels, self.labels.index_select(0, slots))
            step = step * keep
        self.keys.index_copy_(0, slots, keys)
        self.labels.index_copy_(0, slots, labels)
        self.ptr.copy_((self.ptr + step) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
