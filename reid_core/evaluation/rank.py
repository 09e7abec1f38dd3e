"""Re-ID ranking metrics (mAP, CMC, mINP), vectorised in torch over chunks of queries (docs/design.md, Evaluation protocol).

Protocol: per query, gallery entries with the query's identity AND camera are removed ("junk"), queries
left without a true match are skipped, the gallery is ranked by distance with ties broken by gallery
order (a stable sort). The numbers agree with the per-query NumPy implementation of
:mod:`reid_core.evaluation.reference` (to 1e-6; in practice to rounding of the final means).

How it avoids sorting the gallery: the metrics only need the rank of each true match among the kept
entries. In (distance, gallery index) order the i-th match (0-based) has rank i + the number of "others"
(kept entries that are not true matches) before it. One pass of cheap arithmetic gives every distance a
bucket ``trunc(clamp((d - s_1) * c, -1, B) + 1)``, a monotone map (s_1 <= ... <= s_n: the query's match
distances); an other whose bucket holds no match is before match i exactly when its bucket is below
match i's, so a histogram of buckets counts those. The few others sharing a bucket with a match
("candidates") are compared exactly, ties included (``searchsorted`` on (distance, index)). Junk and
matches, known from the labels, are left out of both. Cost: a few element-wise passes over the chunk
(about 5 ns per query-gallery pair on one CPU core) instead of a sort; memory: bounded by the chunk.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reid_core.config import DISTANCES
from reid_core.evaluation.tensors import all_finite, as_tensor

# Working memory per query-gallery pair of a chunk besides the distances and their scaled copy (twice the
# item size): bucket ids (int32), flags, the bucket histogram and, in the worst case (every entry tied
# with a match), the candidates' indices, values and columns.
BYTES_PER_PAIR = 48
# On CPU, chunks of about this many pairs were fastest (the working set stays in cache and the allocator
# reuses the buffers instead of faulting in fresh pages); measured in benchmarks/evaluation.py.
CPU_CHUNK_PAIRS = 1 << 21
# evaluate_features computes distances for up to this many queries at once (budget permitting).
GEMM_BLOCK_ROWS = 256
# Bucket ids of one chunk (queries x (gallery / 8 + 2)) stay below this, so that they are exact in float32.
MAX_BUCKET_IDS = 1 << 23
_DEFAULT_BUDGET_MB = 1024
_INF = float("inf")


# ---- public API -------------------------------------------------------------------------------------

def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> dict:
    """mAP, CMC and mINP of a query-gallery distance matrix.

    ``distmat`` float[Q, G] (NumPy array or tensor, any device; smaller = more similar); ``q_pids``,
    ``q_camids`` int[Q]; ``g_pids``, ``g_camids`` int[G]. Returns ``{"mAP": float, "cmc":
    float64 ndarray[max_rank] (cmc[k - 1] = CMC@k), "mINP": float, "num_valid": int}`` (fractions in
    [0, 1]; ``num_valid`` = queries with at least one true match). Raises ValueError on shape mismatches
    (naming the argument), non-finite distances, or when no query has a true match.
    """
    dist = as_tensor(distmat, "distmat")
    if dist.dim() != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {tuple(dist.shape)}")
    _check_max_rank(max_rank)
    labels = _Labels.build(q_pids, g_pids, q_camids, g_camids, dist.shape[0], dist.shape[1], dist.device)
    dtype = _work_dtype(dist.dtype)
    return _evaluate_chunks(labels, dist.shape[1], dtype, dist.device, max_rank, 0, _DEFAULT_BUDGET_MB,
                            lambda idx, ws: _select_rows(dist, idx, ws))


def query_gallery_distances(q: Tensor, g: Tensor, metric: str = "euclidean") -> Tensor:
    """float[Q, D], float[G, D] -> float[Q, G]: the distances what :func:`~reid_core.evaluation.evaluate.evaluate_features` ranks by (no gradient; the
    losses' differentiable distances are :func:`reid_core.losses.pairwise_distance`).

    ``euclidean``: sqrt(max(|q|^2 + |g|^2 - 2 q^T g, 0)); ``cosine``: -q^T g after L2 normalisation
    (range [-1, 1]).
    """
    if metric not in DISTANCES:
        raise ValueError(f"metric must be one of {', '.join(DISTANCES)}; got {metric!r}")
    with torch.no_grad():
        return _distances(_prepare(q, metric), _prepare(g, metric), metric)


def chunk_plan(num_gallery: int, itemsize: int, device: torch.device, chunk_size: int = 0,
               memory_budget_mb: float = _DEFAULT_BUDGET_MB, block_rows: int = 1) -> tuple[int, int]:
    """``(block, rows)``: distances are made ``block`` queries at a time and ranked ``rows`` at a time.

    ``chunk_size`` > 0 sets both. Otherwise ``rows`` is as many queries as ``memory_budget_mb`` allows at
    ``num_gallery * (2 * itemsize + BYTES_PER_PAIR)`` bytes each (on CPU at most about ``CPU_CHUNK_PAIRS``
    pairs, which is faster), and ``block`` grows towards ``block_rows`` (a multiple of ``rows``) with
    what the budget has left at ``num_gallery * itemsize`` bytes per query: a matmul of a few queries
    against the whole gallery is bound by reading the gallery. Both at most ``MAX_BUCKET_IDS /
    (num_gallery / 8)`` (about 64 M pairs).
    """
    cap = max(1, MAX_BUCKET_IDS // (_num_buckets(num_gallery) + 2))
    if chunk_size:
        return min(chunk_size, cap), min(chunk_size, cap)
    budget = int(memory_budget_mb * 2**20)
    work = num_gallery * (itemsize + BYTES_PER_PAIR)  # ranking: scaled copy, bucket ids, flags, transients
    dist = num_gallery * itemsize
    rows = min(max(1, budget // (work + dist)), cap)
    if torch.device(device).type == "cpu":
        rows = min(rows, max(1, CPU_CHUNK_PAIRS // num_gallery))
    block = max(rows, min(block_rows, (budget - rows * work) // dist, cap) // rows * rows)
    return block, rows


def _evaluate_chunks(labels: "_Labels", width: int, dtype: torch.dtype, device: torch.device, max_rank: int,
                     chunk_size: int, memory_budget_mb: float,
                     distances: Callable[[Tensor, "Workspace"], Tensor], check_finite: bool = True,
                     block_rows: int = 1) -> dict:
    """Rank every block of valid queries (``distances(idx, workspace) -> float[C, G]``) and average.

    On CPU the blocks are spread over ``torch.get_num_threads()`` Python threads with torch's own
    intra-op threading set to 1 meanwhile (restored after): a few large independent tasks instead of
    many small parallel regions, which on a busy machine wait on each other at every operation. The
    memory budget is shared between the threads.
    """
    device = torch.device(device)
    valid = labels.valid.numel()
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    block, rows = chunk_plan(width, dtype.itemsize, device, chunk_size, memory_budget_mb / workers, block_rows)
    block = min(block, valid)
    rows = min(rows, block)
    workers = min(workers, -(-valid // block))
    acc = _Accumulator(max_rank, device)
    local = threading.local()

    def work(idx: Tensor) -> list[tuple[Tensor, Tensor]]:
        ws = getattr(local, "workspace", None)
        if ws is None:
            ws = local.workspace = Workspace(rows, width, dtype, device, block_rows=block)
        with torch.no_grad():  # grad mode is per thread
            dist = distances(idx, ws)
            return [match_ranks(dist[first:first + rows], *labels.groups(idx[first:first + rows]), workspace=ws,
                                check_finite=check_finite) for first in range(0, idx.numel(), rows)]

    if workers <= 1:
        for idx in labels.chunks(block):
            for ranks, n in work(idx):
                acc.add(ranks, n)
    else:
        with _intra_op_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="reid-eval") as pool:
            for parts in pool.map(work, labels.chunks(block)):
                for ranks, n in parts:
                    acc.add(ranks, n)
    return acc.result()


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- ranks of the true matches ----------------------------------------------------------------------

class Workspace:
    """Buffers for :func:`match_ranks`, reused chunk after chunk: fresh multi-megabyte tensors would
    fault in new pages on every chunk, which costs more than the arithmetic."""

    def __init__(self, rows: int, width: int, dtype: torch.dtype, device, block_rows: int = 0) -> None:
        self.rows, self.width = rows, width
        self.block_rows = max(rows, block_rows)
        self.dist = torch.empty(self.block_rows * width, dtype=dtype, device=device)  # a block's distances
        self.real = torch.empty(rows * width, dtype=dtype, device=device)
        self.index = torch.empty(rows * width, dtype=torch.int32, device=device)
        self.flag = torch.empty((rows * width + 7) // 8 * 8, dtype=torch.bool, device=device)

    def take(self, name: str, rows: int) -> Tensor:
        """The first ``rows`` rows of buffer ``name`` as a [rows, width] view."""
        if rows > (self.block_rows if name == "dist" else self.rows):
            raise ValueError(f"workspace buffer {name!r} is too small for {rows} rows")
        return getattr(self, name)[:rows * self.width].view(rows, self.width)


def _num_buckets(width: int) -> int:
    return max(64, width // 8)


def match_ranks(dist: Tensor, gidx: Tensor, match: Tensor, junk: Tensor,
                workspace: Workspace | None = None, check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """0-based ranks of each query's true matches among its kept gallery entries (ties: gallery order).

    ``dist`` float[C, G] (finite); ``gidx`` long[C, S]: gallery indices of the query's identity, in
    gallery order; ``match`` / ``junk`` bool[C, S]: which of them are true matches (another camera) /
    junk (same camera). Every row needs at least one match. ``workspace``: buffers to reuse (one is
    made when absent); ``check_finite=False`` skips the NaN/inf check (the caller guarantees finite
    distances). Returns ``(ranks long[C, M], n long[C])``: ``ranks[q, :n[q]]`` ascending,
    ``M = max(n)``.

    The i-th match (0-based, in (distance, gallery index) order) has rank i + the number of "others"
    (kept entries that are not matches) placed before it. Others whose bucket holds no match are
    counted from a histogram of buckets; the rest ("candidates") are compared exactly.
    """
    dist = dist.contiguous()
    if check_finite and not all_finite(dist):
        raise ValueError("distmat contains NaN or infinite values")
    c_rows, width = dist.shape
    device = dist.device
    ws = workspace if workspace is not None else Workspace(c_rows, width, dist.dtype, device)
    n = match.sum(1)
    m = int(n.max())
    s, order = torch.where(match, dist.gather(1, gidx), _INF).sort(dim=1, stable=True)
    s, j = s[:, :m].contiguous(), gidx.gather(1, order[:, :m])  # match distances ascending [C, M], their columns
    in_m = torch.arange(m, device=device) < n[:, None]

    # Buckets b(x) = trunc(clamp((x - s_1) * scale, -1, B) + 1): a monotone map, s_n lands near B - 1.
    # An entry whose bucket holds no match is before match i exactly when its bucket is below match i's.
    buckets = _num_buckets(width)
    span = buckets + 2
    lo = s[:, :1]
    scale = ((buckets - 2) / (s.gather(1, (n - 1)[:, None]) - lo)).clamp_(1e-30, 1e30)  # finite, > 0
    # Flat bucket ids over the chunk: row r owns [r * span, r * span + B + 1]. The row offset is added in
    # floating point, exact at the range ends (integers below 2**24) and monotone in between.
    if c_rows * span > MAX_BUCKET_IDS:
        raise ValueError(f"chunk of {c_rows} queries x {width} gallery entries is too large: at most "
                         f"{MAX_BUCKET_IDS // span} queries per chunk (see chunk_plan)")
    real = torch.sub(dist, lo, out=ws.take("real", c_rows)).mul_(scale).clamp_(-1.0, buckets)
    real += torch.arange(c_rows, device=device, dtype=dist.dtype)[:, None] * span + 1.0
    flat_b = ws.take("index", c_rows).copy_(real).view(-1)

    # Matches and junk are no "others": leave them out of both the candidates and the histogram.
    # A match's bucket is read back from b itself, so it is computed exactly like every other entry's.
    b = flat_b.view(c_rows, width)
    match_b = torch.where(in_m, b.gather(1, j), b.gather(1, j[:, :1])).long()  # padding -> a marked bucket
    own = gidx + torch.arange(c_rows, device=device)[:, None] * width  # flat positions of the identity
    own = own[match | junk]
    marked = torch.zeros(c_rows * span, dtype=torch.bool, device=device)
    marked[match_b.view(-1)] = True
    flag = torch.index_select(marked, 0, flat_b, out=ws.take("flag", c_rows).view(-1))
    flag[own] = False
    cand = _nonzero(ws.flag, flag.numel())  # others sharing a bucket with a match
    hist = torch.bincount(flat_b, minlength=c_rows * span)
    drop = torch.cat([flat_b[cand], flat_b[own]]).long()
    hist.index_put_((drop,), torch.full_like(drop, -1), accumulate=True)
    hist = hist.view(c_rows, span)
    below = (hist.cumsum(1) - hist).view(-1)[match_b]  # others in buckets below each match's

    # Candidates, packed per row [C, K], are compared exactly: (distance, column) lexicographically.
    row = torch.div(cand, width, rounding_mode="floor")
    per_row = torch.bincount(row, minlength=c_rows)
    k = int(per_row.max()) if cand.numel() else 0
    at = row * k + torch.arange(cand.numel(), device=device) - (per_row.cumsum(0) - per_row)[row]
    values = torch.full((c_rows * k,), _INF, dtype=dist.dtype, device=device)
    values[at] = dist.view(-1)[cand]
    columns = torch.zeros(c_rows * k, dtype=torch.int64, device=device)
    columns[at] = cand - row * width
    filled = torch.arange(k, device=device) < per_row[:, None]
    before = _lex_count(values.view(c_rows, k), columns.view(c_rows, k), filled, s, j, in_m, width)
    return below + before + torch.arange(m, device=device), n


def _nonzero(buffer: Tensor, count: int) -> Tensor:
    """Indices long[K] of the True entries among the first ``count`` of ``buffer`` bool[>= count rounded
    up to 8]. They are sparse, so 8-byte words are scanned first and only the nonzero ones expanded:
    about twice as cheap as ``nonzero()`` on the bytes."""
    end = (count + 7) // 8 * 8
    buffer[count:end] = False
    hit = buffer[:end].view(torch.int64).nonzero().squeeze(1)
    sub, byte = buffer.view(-1, 8)[hit].nonzero(as_tuple=True)
    return hit[sub] * 8 + byte


def _lex_count(values: Tensor, columns: Tensor, valid: Tensor, s: Tensor, j: Tensor, in_m: Tensor,
               width: int) -> Tensor:
    """long[C, M]: for each match i, the entries e (``valid``) with (values_e, columns_e) < (s_i, j_i).

    ``values`` float[C, K], ``columns`` long[C, K], ``valid`` bool[C, K]; ``s`` float[C, M] ascending
    (inf padding), ``j`` long[C, M] their columns, ascending where ``s`` ties; ``in_m`` bool[C, M].
    """
    m = s.shape[1]
    first = torch.searchsorted(s, s)  # start of s_i's group of equal distances
    # Strictly smaller distance: with r_e = #{s <= v_e} and s_i in s, v_e < s_i <=> r_e <= #{s < s_i}.
    r = torch.searchsorted(s, values, right=True)
    count = _row_bincount(torch.where(valid, r, m), m + 1).cumsum_(1).gather(1, first)
    # Equal distance (rare with real features): e precedes the matches of its group of equal distances
    # (which ends at r_e) from the first one with a larger column on, p_e.
    last = (r - 1).clamp_(min=0)
    tied = valid & (r > 0) & (s.gather(1, last) == values)
    if bool(tied.any()):
        keys = torch.where(in_m, first * (width + 1) + j, torch.iinfo(torch.int64).max)  # ascending in i
        p = torch.searchsorted(keys, first.gather(1, last) * (width + 1) + columns, right=True)
        p = torch.where(tied & (p < r), p, m)
        seen = F.pad(_row_bincount(p, m + 1).cumsum_(1), (1, 0))  # seen[x] = #{p_e < x}
        upto = torch.arange(1, m + 1, device=s.device).expand_as(s)
        count += seen.gather(1, upto) - seen.gather(1, first)
    return count


def _row_bincount(values: Tensor, length: int) -> Tensor:
    """Per-row histogram long[R, length] of ``values`` long[R, K] in [0, length)."""
    num_rows = values.shape[0]
    keys = (values + torch.arange(num_rows, device=values.device)[:, None] * length).reshape(-1)
    return torch.bincount(keys, minlength=num_rows * length).view(num_rows, length)


# ---- labels, chunks, metrics ------------------------------------------------------------------------

@dataclass
class _Labels:
    """Identity and camera bookkeeping: for each query, the gallery entries with its identity."""

    q_cams: Tensor  # long[Q]
    g_cams: Tensor  # long[G]
    order: Tensor  # long[G], gallery indices sorted by identity (stable: gallery order within one)
    start: Tensor  # long[Q], where the query's identity starts in ``order``
    size: Tensor  # long[Q], gallery entries with the query's identity
    valid: Tensor  # long[V], queries with at least one true match

    @classmethod
    def build(cls, q_pids, g_pids, q_camids, g_camids, num_q: int, num_g: int, device) -> "_Labels":
        q_pids = _labels(q_pids, "q_pids", num_q, "distmat rows / q_feats", device)
        q_cams = _labels(q_camids, "q_camids", num_q, "distmat rows / q_feats", device)
        g_pids = _labels(g_pids, "g_pids", num_g, "distmat columns / g_feats", device)
        g_cams = _labels(g_camids, "g_camids", num_g, "distmat columns / g_feats", device)
        if num_q == 0 or num_g == 0:
            raise ValueError(f"need at least one query and one gallery entry, got {num_q} and {num_g}")
        order = torch.sort(g_pids, stable=True).indices
        ids, counts = torch.unique_consecutive(g_pids[order], return_counts=True)
        starts = counts.cumsum(0) - counts
        at = torch.searchsorted(ids, q_pids).clamp_(max=ids.numel() - 1)
        found = ids[at] == q_pids
        size = torch.where(found, counts[at], 0)
        start = torch.where(found, starts[at], 0)
        # Junk per query = gallery entries with its (identity, camera); keys on dense indices.
        cams = torch.unique(torch.cat([q_cams, g_cams]))
        g_key = (torch.repeat_interleave(torch.arange(ids.numel(), device=device), counts) * cams.numel()
                 + torch.searchsorted(cams, g_cams[order]))
        keys, key_counts = torch.unique(g_key, return_counts=True)
        q_key = at * cams.numel() + torch.searchsorted(cams, q_cams)
        kat = torch.searchsorted(keys, q_key).clamp_(max=keys.numel() - 1)
        same_cam = torch.where(found & (keys[kat] == q_key), key_counts[kat], 0)
        valid = (size - same_cam > 0).nonzero().squeeze(1)
        if valid.numel() == 0:
            raise ValueError("no query has a true match in the gallery (after removing same-identity, "
                             "same-camera entries): check q_pids/g_pids and q_camids/g_camids")
        return cls(q_cams, g_cams, order, start, size, valid)

    def chunks(self, rows: int) -> Iterator[Tensor]:
        """Indices long[<= rows] of the valid queries, chunk by chunk."""
        for first in range(0, self.valid.numel(), rows):
            yield self.valid[first:first + rows]

    def groups(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For queries ``idx`` long[C]: (gidx long[C, S], match bool[C, S], junk bool[C, S])."""
        size = self.size[idx]
        span = torch.arange(int(size.max()), device=idx.device)
        inside = span < size[:, None]
        gidx = self.order[(self.start[idx][:, None] + span).clamp_(max=self.order.numel() - 1)]
        same_cam = self.g_cams[gidx] == self.q_cams[idx][:, None]
        return gidx, inside & ~same_cam, inside & same_cam


class _Accumulator:
    """Sums of AP and INP and the histogram of first-match ranks over chunks of queries."""

    def __init__(self, max_rank: int, device) -> None:
        self.max_rank = max_rank
        self.ap = torch.zeros((), dtype=torch.float64, device=device)
        self.inp = torch.zeros((), dtype=torch.float64, device=device)
        self.first = torch.zeros(max_rank + 1, dtype=torch.int64, device=device)
        self.count = 0

    def add(self, ranks: Tensor, n: Tensor) -> None:
        """``ranks`` long[C, M] (0-based, ascending in ``[:n]``), ``n`` long[C] (>= 1)."""
        span = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=torch.float64)
        precision = torch.where(span <= n[:, None], span / (ranks + 1).double(), 0.0)
        self.ap += (precision.sum(1) / n).sum()
        last = ranks.gather(1, (n - 1)[:, None]).squeeze(1)
        self.inp += (n.double() / (last + 1).double()).sum()
        self.first += torch.bincount(ranks[:, 0].clamp(max=self.max_rank), minlength=self.max_rank + 1)
        self.count += n.numel()

    def result(self) -> dict:
        cmc = self.first[:self.max_rank].cumsum(0).double() / self.count
        return {"mAP": float(self.ap) / self.count, "cmc": cmc.cpu().numpy(),
                "mINP": float(self.inp) / self.count, "num_valid": self.count}


# ---- input handling ---------------------------------------------------------------------------------

def _labels(x, name: str, length: int, what: str, device) -> Tensor:
    t = as_tensor(x, name)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be 1-D of length {length} (the {what}), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32/float64 distances are ranked as they are; half types widen to float32, integers to float64
    (exact up to 2**53)."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype.is_floating_point:
        return torch.float32
    if dtype.is_complex:
        raise ValueError(f"distmat must be real, got {dtype}")
    return torch.float64


def _check_max_rank(max_rank: int) -> None:
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")


def _prepare(x: Tensor, metric: str) -> tuple[Tensor, Tensor | None]:
    """Features ready for :func:`_distances`: L2-normalised (cosine) or with their squared norms."""
    if metric == "cosine":
        return F.normalize(x, dim=1), None
    return x, torch.linalg.vector_norm(x, dim=1).square_()


def _distances(q: tuple[Tensor, Tensor | None], g: tuple[Tensor, Tensor | None], metric: str,
               out: Tensor | None = None) -> Tensor:
    (qx, q_sq), (gx, g_sq) = q, g
    if metric == "cosine":
        return torch.mm(qx, gx.t(), out=out).neg_()
    out = torch.addmm(g_sq[None, :], qx, gx.t(), beta=1.0, alpha=-2.0, out=out)
    return out.add_(q_sq[:, None]).clamp_min_(0.0).sqrt_()


def _select_rows(dist: Tensor, idx: Tensor, ws: Workspace) -> Tensor:
    """Rows ``idx`` of ``dist`` in the working dtype: a view when they are consecutive, else a copy."""
    first, count = int(idx[0]), idx.numel()
    if dist.dtype == ws.dist.dtype and int(idx[-1]) - first + 1 == count:
        return dist.narrow(0, first, count)
    out = ws.take("dist", count)
    if dist.dtype == ws.dist.dtype:
        return torch.index_select(dist, 0, idx, out=out)
    return out.copy_(dist.index_select(0, idx))
