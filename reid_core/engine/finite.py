"""The non-finite guard of training: a NaN or inf loss or key stops the run, and no such key is enqueued.

Checking every step on the host would synchronize with the device every step, so the guard works on the
device: each step's finiteness flags (:data:`reid_core.moreid.FINITE_TERMS`) update a sticky record of
the first bad iteration and its terms, and the MoReID enqueue is made conditional on that record (a step
at or after the first bad one enqueues nothing, whatever its keys). The trainer reads the record with
the step statistics every ``train.log_every`` steps, at the end of an epoch and before a checkpoint, and
raises :class:`NonFiniteError` there. Under data parallelism the flags are all-reduced first, so every
worker holds the same record (the same dictionary, the same error at the same step).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from reid_core.moreid import FINITE_TERMS


class NonFiniteError(RuntimeError):
    """A loss or key became NaN or infinite. Deterministic: the same config and data fail the same way
    again (a study does not retry it); the message names the iteration and the terms."""


class FiniteGuard:
    """Sticky device record ``[2]``: the first iteration with a non-finite term (-1: none yet) and the
    bit mask of its terms (bit i = ``FINITE_TERMS[i]``)."""

    def __init__(self, device: torch.device) -> None:
        self.record = torch.tensor([-1, 0], dtype=torch.long, device=device)
        self._bits = (2 ** torch.arange(len(FINITE_TERMS))).to(device)

    def update(self, finite: Tensor, iteration: int) -> Tensor:
        """Fold in one step's flags (bool ``[len(FINITE_TERMS)]``) at ``iteration`` (optimizer steps taken
        before it); returns the device bool scalar "no non-finite term so far" (enqueue its keys)."""
        bad = (~finite.to(self.record.device, torch.bool)).long()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bits = (bad * self._bits).sum()
        first = (self.record[0] < 0) & (bits > 0)
        self.record.copy_(torch.where(first, torch.stack([torch.full_like(bits, iteration), bits]), self.record))
        return self.record[0] < 0

    def check(self, record: Sequence[float] | None = None) -> None:
        """Raise :class:`NonFiniteError` if a term was non-finite. ``record``: the two values already read
        from the device with other statistics (else they are read here, one host synchronization)."""
        first, bits = (int(v) for v in (self.record.tolist() if record is None else record))
        if first < 0:
            return
        terms = [name for i, name in enumerate(FINITE_TERMS) if bits >> i & 1]
        raise NonFiniteError(f"non-finite {', '.join(terms)} in training step {first + 1} (iteration {first}: "
                             f"after {first} optimizer steps); stopped before enqueueing that step's keys. "
                             "Lower optim.lr, set optim.grad_clip, or try train.amp_dtype=bfloat16 or "
                             "train.amp=false; check the training images")

