"""P x K identity sampler: batches of P identities with K images each, distributed-aware.

An epoch works on chunks: each identity's images are shuffled and cut into chunks of K (the last chunk
completed with other images of the same identity; an identity with fewer than K images gives one chunk
drawn with replacement). Chunks are packed into batches of P distinct identities, first one chunk of
every identity (so that every epoch covers all identities), then the other chunks, each identity's
spread over the epoch. An epoch is therefore about one pass over the training images.

The batch is global (``batch_size`` images per optimizer step over all ranks, as FastReID's
``IMS_PER_BATCH``): every rank builds the same global batches from the seed and takes its slice of
``batch_size / world_size`` images, whole identities only (``batch_size`` must divide by
``world_size x K``). So the ranks' slices at a step, concatenated in rank order, are the one-process batch
of that step, and the number of batches per epoch does not depend on ``world_size``.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler[list[int]]):
    """Yields lists of ``P * K`` dataset indices (use it as a DataLoader ``batch_sampler``).

    Args:
        labels: identity of each dataset index (any ints).
        batch_size: ``P * K``, images per global batch (all ranks together).
        num_instance: ``K``, images per identity in a batch.
        seed: epoch ``e`` is shuffled from ``(seed, e)``.
        rank, world_size: this rank yields images ``[rank * b, (rank + 1) * b)`` of each global batch,
            ``b = batch_size / world_size`` (a multiple of K).
    """

    def __init__(self, labels: Sequence[int], batch_size: int, num_instance: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_instance < 1 or batch_size % num_instance:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_instance "
                             f"({num_instance})")
        if seed < 0:
            raise ValueError(f"seed must not be negative, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size % (world_size * num_instance):
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of world_size x num_instance "
                             f"({world_size} x {num_instance}): each rank takes whole identities")
        self.k = num_instance
        self.p = batch_size // num_instance
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.per_rank = batch_size // world_size  # images of each global batch this rank yields
        labels = np.asarray(labels, dtype=np.int64)
        self.pids, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(self.pids)))[:-1]
        self.index_of = np.split(order, bounds)  # dataset indices of each identity
        n_ids = len(self.pids)
        if n_ids < self.p:
            raise ValueError(f"{n_ids} identities cannot give {self.p} distinct identities per batch "
                             f"(P = batch_size / num_instance)")
        chunks = sum(max(1, math.ceil(len(ix) / self.k)) for ix in self.index_of)
        self.num_batches = max(math.ceil(n_ids / self.p), round(chunks / self.p))
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """The next iteration yields epoch ``epoch`` (each iteration then advances by one)."""
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        """Positions (into ``self.pids``) of every identity, in the order ``epoch`` first visits them."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pids))

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        self.epoch += 1
        yield from self.batches(epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's slice of each global batch of ``epoch`` (deterministic)."""
        lo = self.rank * self.per_rank
        return [batch[lo:lo + self.per_rank] for batch in self.global_batches(epoch)]

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The ``len(self)`` global batches of ``epoch``, the same on every rank (deterministic)."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        share = self.order(epoch)
        chunks = {int(i): self._chunks(self.index_of[i], rng) for i in share}
        # First one chunk of every identity (in random order), so that the first batches cover the
        # share; then the other chunks, each identity's spread evenly over the rest of the epoch (sorted
        # by jittered positions) so that identities with many chunks do not bunch up at the end.
        stream = [(int(i), chunks[int(i)][0]) for i in rng.permutation(share)]
        rest = [(int(i), c, (j + rng.random()) / (len(chunks[int(i)]) - 1))
                for i in share for j, c in enumerate(chunks[int(i)][1:])]
        stream += [(i, c) for i, c, _ in sorted(rest, key=lambda item: item[2])]
        batches = self._pack(stream)
        if batches and len(batches[-1][0]) < self.p:
            self._complete(batches[-1], share, rng)
        batches = [b for b in batches if len(b[0]) == self.p][: self.num_batches]
        while len(batches) < self.num_batches:
            ids = rng.choice(share, size=self.p, replace=False)
            batches.append(([int(i) for i in ids], [self._random_chunk(self.index_of[i], rng) for i in ids]))
        out = [np.concatenate(parts).tolist() for _, parts in batches]
        return [out[i] for i in rng.permutation(len(out))]

    # ---- pieces ----------------------------------------------------------------------

    def _chunks(self, index: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """The shuffled images of one identity cut into chunks of K."""
        n, k = len(index), self.k
        if n < k:
            return [rng.choice(index, size=k, replace=True)]
        shuffled = rng.permutation(index)
        rest = n % k
        if rest:
            pad = rng.choice(shuffled[: n - rest], size=k - rest, replace=False)
            shuffled = np.concatenate([shuffled, pad])
        return list(shuffled.reshape(-1, k))

    def _random_chunk(self, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(index, size=self.k, replace=len(index) < self.k)

    def _pack(self, stream: list[tuple[int, np.ndarray]]) -> list[tuple[list[int], list[np.ndarray]]]:
        """Greedy packing into batches of P distinct identities; a chunk whose identity is already in the
        open batch waits for the next one. Waiting chunks left at the end are dropped."""
        batches: list[tuple[list[int], list[np.ndarray]]] = []
        ids: list[int] = []
        parts: list[np.ndarray] = []
        waiting: deque[tuple[int, np.ndarray]] = deque()
        for item in stream:
            waiting.append(item)
            for _ in range(len(waiting)):
                pid, chunk = waiting.popleft()
                if pid in ids:
                    waiting.append((pid, chunk))
                    continue
                ids.append(pid)
                parts.append(chunk)
                if len(ids) == self.p:
                    batches.append((ids, parts))
                    ids, parts = [], []
        if ids:
            batches.append((ids, parts))
        return batches

    def _complete(self, batch: tuple[list[int], list[np.ndarray]], share: np.ndarray,
                  rng: np.random.Generator) -> None:
        """Fill an incomplete batch with random chunks of other identities."""
        ids, parts = batch
        others = np.array([i for i in share if int(i) not in ids])
        for i in rng.choice(others, size=self.p - len(ids), replace=False):
            ids.append(int(i))
            parts.append(self._random_chunk(self.index_of[i], rng))
