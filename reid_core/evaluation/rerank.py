"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) from top-k neighbour lists, never the full square.

The algorithm, as the re-ID toolboxes run it, over all N = Q + G images (queries first):

1. ``original[i, j] = O[j, i] / max_r O[r, i]``: the squared distances O, each column scaled by its
   largest value, transposed (for a symmetric O: row i scaled by its own maximum).
2. Neighbour lists: ``near[i]`` = the columns of row i of ``original`` in ascending order (ties: by index).
3. ``R(i, k)`` = the k-reciprocal neighbours: ``j`` in ``near[i, :k + 1]`` with ``i`` in ``near[j, :k + 1]``.
   The expanded set of i is ``R(i, k1)`` plus every ``R(c, round(k1 / 2))``, c in ``R(i, k1)``, that
   shares more than 2/3 of its members with ``R(i, k1)``.
4. ``V[i, j] = exp(-original[i, j])``, normalised to sum 1 over i's expanded set (zero elsewhere).
5. Local query expansion (``k2 > 1``): row i of V becomes the mean of the rows of ``near[i, :k2]``.
6. Jaccard distance ``1 - s / (2 - s)``, ``s = sum_k min(V[q, k], V[j, k])``; the result for query q and
   gallery entry g is ``(1 - lambda) * jaccard + lambda * original[q, Q + g]``.

Only steps 1-2 look at whole rows, and only for their maximum and their ``max(k1 + 1, k2)`` nearest
entries: rows are made and reduced a chunk at a time. V is sparse (tens of entries per row), the
Jaccard sums run over V's nonzeros (a column-indexed copy of V's gallery rows), and the ``original``
values that V needs are looked up (dense input) or recomputed from the features, pair by pair.
So the result is the dense algorithm's to floating-point rounding, in O(N k) memory besides the chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reid_core.evaluation.tensors import ROWS_PAIRS, all_finite, as_tensor, smallest_k

# Jaccard sums are expanded into (query, gallery, min) contributions at most this many at a time.
CONTRIBUTIONS_PER_STEP = 1 << 21


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               memory_budget_mb: float = 1024):
    """k-reciprocal re-ranking of a query x gallery distance matrix (the toolboxes' signature).

    ``q_g_dist`` float[Q, G], ``q_q_dist`` float[Q, Q], ``g_g_dist`` float[G, G]: distances (they are
    squared here, as the toolboxes do), NumPy arrays or tensors (computed on ``q_g_dist``'s device).
    Returns float32[Q, G] re-ranked distances, an ndarray for ndarray input, else a tensor on that
    device. ``memory_budget_mb`` bounds the working chunks (besides the inputs, their float32 squares
    and O((Q + G) k1 k2) for the sparse V). Raises ValueError naming a bad argument.
    """
    check_rerank_args(k1, k2, lambda_value)
    numpy_in = not isinstance(q_g_dist, Tensor)
    q_g = as_tensor(q_g_dist, "q_g_dist")
    q_q = as_tensor(q_q_dist, "q_q_dist").to(q_g.device)
    g_g = as_tensor(g_g_dist, "g_g_dist").to(q_g.device)
    if q_g.dim() != 2 or 0 in q_g.shape:
        raise ValueError(f"q_g_dist must be a non-empty 2-D [Q, G] matrix, got shape {tuple(q_g.shape)}")
    num_q, num_g = q_g.shape
    for name, x, size in (("q_q_dist", q_q, num_q), ("g_g_dist", g_g, num_g)):
        if tuple(x.shape) != (size, size):
            raise ValueError(f"{name} must be [{size}, {size}] to match q_g_dist {tuple(q_g.shape)}, "
                             f"got {tuple(x.shape)}")
    for name, x in (("q_g_dist", q_g), ("q_q_dist", q_q), ("g_g_dist", g_g)):
        if x.is_complex() or not all_finite(x.double() if not x.is_floating_point() else x):
            raise ValueError(f"{name} must hold finite real distances")
    with torch.no_grad():
        ranker = KReciprocal(DenseSource(q_g, q_q, g_g), k1, k2, lambda_value, memory_budget_mb)
        out = torch.empty(num_q, num_g, dtype=torch.float32, device=q_g.device)
        step = max(1, int(memory_budget_mb * 2**20) // (num_g * 16))
        for first in range(0, num_q, step):
            idx = torch.arange(first, min(first + step, num_q), device=q_g.device)
            ranker.distances(idx, out=out[first:first + step])
    return out.cpu().numpy() if numpy_in else out


def check_rerank_args(k1: int, k2: int, lambda_value: float) -> None:
    """Raise ValueError naming ``k1``, ``k2`` or ``lambda_value`` when it cannot be used."""
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, (int, float)) or not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")


class NeighbourSource:
    """Where the ``original`` distances of step 1 come from. Subclasses fill ``num_query``, ``num_all``,
    ``device`` and implement the three accessors; values are float32, already scaled."""

    num_query: int
    num_all: int
    device: torch.device

    def rows(self, first: int, last: int) -> Tensor:
        """float[last - first, N]: rows ``first..last-1`` of ``original``, or any rows in the same order."""
        raise NotImplementedError

    def pairs(self, i: Tensor, j: Tensor) -> Tensor:
        """float32[E]: ``original[i, j]`` for long[E] ``i``, ``j``."""
        raise NotImplementedError

    def query_gallery(self, idx: Tensor, out: Tensor | None = None) -> Tensor:
        """float32[C, G]: ``original[q, Q + g]`` for queries ``idx`` long[C]."""
        raise NotImplementedError


@dataclass
class _Sparse:
    """Rows of a sparse matrix: ``ptr`` long[R + 1], ``index`` long[nnz] (sorted within a row), ``value``
    float32[nnz]."""

    ptr: Tensor
    index: Tensor
    value: Tensor

    @classmethod
    def from_sorted(cls, rows: Tensor, index: Tensor, value: Tensor, num_rows: int) -> "_Sparse":
        ptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=index.device)
        ptr[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
        return cls(ptr, index, value)

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """For long[E] ``rows``: (owner long[T]: which of ``rows`` each entry belongs to, position long[T]
        of the entry in ``index``/``value``), rows' entries in order."""
        start = self.ptr[rows]
        length = self.ptr[rows + 1] - start
        return _expand(start, length)


def _expand(start: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
    """(owner, position): ``owner`` repeats e ``length[e]`` times, ``position`` runs start[e] .. start[e] + length[e] - 1."""
    total = int(length.sum())
    owner = torch.repeat_interleave(torch.arange(length.numel(), device=length.device), length, output_size=total)
    offset = torch.arange(total, device=length.device) - (length.cumsum(0) - length)[owner]
    return owner, start[owner] + offset


class KReciprocal:
    """Steps 2-6 for one :class:`NeighbourSource`; :meth:`distances` gives the re-ranked query rows."""

    def __init__(self, source: NeighbourSource, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                 memory_budget_mb: float = 1024) -> None:
        check_rerank_args(k1, k2, lambda_value)
        self.source, self.k1, self.k2, self.lambda_value = source, k1, k2, float(lambda_value)
        n = source.num_all
        rows = max(1, min(int(memory_budget_mb * 2**20) // (n * 16), max(1, ROWS_PAIRS // n)))
        width = max(k1 + 1, k2)
        self.near = torch.cat([smallest_k(source.rows(first, min(first + rows, n)), width)
                               for first in range(0, n, rows)])
        weights = self._weights()
        if k2 != 1:
            weights = self._local_expansion(weights)
        self.weights = weights
        self.gallery_columns = self._gallery_columns(weights)

    # ---- V -------------------------------------------------------------------------------------------
    def _reciprocal(self, k: int) -> Tensor:
        """bool[N, k + 1]: whether ``near[i, a]`` is a k-reciprocal neighbour of i."""
        forward = self.near[:, :k + 1]
        out = torch.empty(forward.shape, dtype=torch.bool, device=forward.device)
        step = max(1, (1 << 22) // (forward.shape[1] ** 2))
        for first in range(0, forward.shape[0], step):
            back = forward[forward[first:first + step]]  # [C, k + 1, k + 1]
            me = torch.arange(first, first + back.shape[0], device=back.device)[:, None, None]
            out[first:first + step] = (back == me).any(-1)
        return out

    def _weights(self) -> _Sparse:
        """V (step 4) over the expanded sets of step 3, as sorted rows."""
        n, k1 = self.source.num_all, self.k1
        half = round(k1 / 2)  # half to even, as numpy's around
        core, core_in = self.near[:, :k1 + 1], self._reciprocal(k1)
        small, small_in = self.near[:, :half + 1], self._reciprocal(half)
        sentinel = n
        a, b = core.shape[1], small.shape[1]
        step = max(1, (1 << 22) // (a * a * b))
        rows_out, cols_out = [], []
        for first in range(0, n, step):
            f, f_in = core[first:first + step], core_in[first:first + step]
            cand, cand_in = small[f], small_in[f] & f_in[:, :, None]  # [C, a, b]: R(c, half) of each c in R(i, k1)
            shared = ((cand[..., None] == f[:, None, None, :]) & f_in[:, None, None, :]).any(-1) & cand_in
            size = cand_in.sum(-1)
            accept = f_in & (shared.sum(-1).double() > 2.0 / 3.0 * size.double())
            cols = torch.cat([torch.where(f_in, f, sentinel),
                              torch.where(cand_in & accept[..., None], cand, sentinel).flatten(1)], 1)
            cols = cols.sort(dim=1).values
            keep = cols != sentinel
            keep[:, 1:] &= cols[:, 1:] != cols[:, :-1]
            rows_out.append(torch.arange(first, first + f.shape[0], device=f.device)[:, None].expand_as(cols)[keep])
            cols_out.append(cols[keep])
        rows, cols = torch.cat(rows_out), torch.cat(cols_out)
        weight = torch.exp(-self.source.pairs(rows, cols))
        total = torch.zeros(n, dtype=weight.dtype, device=weight.device).index_add_(0, rows, weight)
        return _Sparse.from_sorted(rows, cols, weight / total[rows], n)

    def _local_expansion(self, v: _Sparse) -> _Sparse:
        """Step 5: row i := mean of the rows of ``near[i, :k2]``."""
        n, k2 = self.source.num_all, self.k2
        nearest = self.near[:, :k2]
        rows_out, cols_out, vals_out = [], [], []
        per_row = max(1, int((v.ptr[1:] - v.ptr[:-1]).max()) * nearest.shape[1])
        step = max(1, CONTRIBUTIONS_PER_STEP // per_row)
        for first in range(0, n, step):
            part = nearest[first:first + step]
            owner, pos = v.gather(part.reshape(-1))
            row = owner // part.shape[1]
            keys, inverse = torch.unique(row * n + v.index[pos], return_inverse=True)
            sums = torch.zeros(keys.numel(), dtype=v.value.dtype, device=keys.device).index_add_(0, inverse, v.value[pos])
            rows_out.append(keys // n + first)
            cols_out.append(keys % n)
            vals_out.append(sums / part.shape[1])
        return _Sparse.from_sorted(torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out), n)

    def _gallery_columns(self, v: _Sparse) -> _Sparse:
        """V's gallery rows indexed by column: ``index`` holds gallery positions (0..G-1), ascending
        within a column."""
        num_q, n = self.source.num_query, self.source.num_all
        rows = torch.repeat_interleave(torch.arange(n, device=v.index.device), v.ptr[1:] - v.ptr[:-1])
        keep = rows >= num_q
        rows, cols, vals = rows[keep] - num_q, v.index[keep], v.value[keep]
        order = torch.sort(cols, stable=True).indices
        return _Sparse.from_sorted(cols[order], rows[order], vals[order], n)

    # ---- distances -----------------------------------------------------------------------------------
    def distances(self, idx: Tensor, out: Tensor | None = None) -> Tensor:
        """float32[C, G]: the re-ranked distances of queries ``idx`` long[C] to the gallery."""
        src = self.source
        num_g = src.num_all - src.num_query
        shared = out.zero_() if out is not None else torch.zeros(idx.numel(), num_g, device=src.device)
        cols = self.gallery_columns
        owner, pos = self.weights.gather(idx)
        column = self.weights.index[pos]
        value = self.weights.value[pos]
        length = cols.ptr[column + 1] - cols.ptr[column]
        ends = length.cumsum(0)
        flat = shared.view(-1)
        first = 0
        while first < owner.numel():
            # entries first..last-1 expand to at most CONTRIBUTIONS_PER_STEP contributions (at least one entry)
            base = int(ends[first - 1]) if first else 0
            last = max(first + 1, int(torch.searchsorted(ends, base + CONTRIBUTIONS_PER_STEP, right=True)))
            which, at = _expand(cols.ptr[column[first:last]], length[first:last])
            contribution = torch.minimum(value[first:last][which], cols.value[at])
            flat.index_add_(0, owner[first:last][which] * num_g + cols.index[at], contribution)
            first = last
        jaccard = shared.div_(torch.rsub(shared, 2.0)).neg_().add_(1.0)  # 1 - s / (2 - s)
        original = src.query_gallery(idx)
        return jaccard.mul_(1.0 - self.lambda_value).add_(original.mul_(self.lambda_value))


# ---- where the original distances come from ----------------------------------------------------------

def _squared_float32(x: Tensor) -> Tensor:
    """Squared distances in float32, squared in the input's precision first (as ``np.power`` then ``astype``)."""
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float64 if not x.is_floating_point() else torch.float32)
    return x.square().to(torch.float32)


class DenseSource(NeighbourSource):
    """The three distance matrices of :func:`re_ranking`, squared; ``scale`` = the column maxima of the
    square (Q + G) x (Q + G) matrix they form."""

    def __init__(self, q_g: Tensor, q_q: Tensor, g_g: Tensor) -> None:
        self.qq, self.qg, self.gg = (_squared_float32(x) for x in (q_q, q_g, g_g))
        self.num_query, self.num_all = q_g.shape[0], q_g.shape[0] + q_g.shape[1]
        self.device = q_g.device
        self.scale = torch.cat([torch.maximum(self.qq.amax(0), self.qg.amax(1)),
                                torch.maximum(self.qg.amax(0), self.gg.amax(0))])
        _check_scale(self.scale, "a column of the (Q + G) x (Q + G) distance matrix is all zero")

    def rows(self, first: int, last: int) -> Tensor:
        q = self.num_query
        out = torch.empty(last - first, self.num_all, dtype=torch.float32, device=self.device)
        if first < q:  # query rows: [q_q[:, i], q_g[i, :]]
            end = min(last, q)
            out[:end - first, :q] = self.qq[:, first:end].t()
            out[:end - first, q:] = self.qg[first:end]
        if last > q:  # gallery rows: [q_g[:, g], g_g[:, g]]
            start = max(first, q)
            part = out[start - first:]
            part[:, :q] = self.qg[:, start - q:last - q].t()
            part[:, q:] = self.gg[:, start - q:last - q].t()
        return out.div_(self.scale[first:last, None])

    def pairs(self, i: Tensor, j: Tensor) -> Tensor:
        q = self.num_query
        out = torch.empty(i.numel(), dtype=torch.float32, device=self.device)
        i_q, j_q = i < q, j < q  # original[i, j] = O[j, i] / scale[i]
        for mask, block, row, col in ((j_q & i_q, self.qq, j, i), (j_q & ~i_q, self.qg, j, i - q),
                                      (~j_q & i_q, self.qg, i, j - q), (~j_q & ~i_q, self.gg, j - q, i - q)):
            out[mask] = block[row[mask], col[mask]]
        return out.div_(self.scale[i])

    def query_gallery(self, idx: Tensor, out: Tensor | None = None) -> Tensor:
        rows = torch.index_select(self.qg, 0, idx, out=out) if out is not None else self.qg[idx]
        return rows.div_(self.scale[idx, None])


class FeatureSource(NeighbourSource):
    """Squared euclidean distances of features ``x`` float[N, D] (queries first), made on demand; the
    scale of row i is the largest squared distance of row i (the column maximum of a symmetric matrix),
    known once :meth:`rows` has been called for every row (KReciprocal does that first).

    Departure from the dense algorithm fed with distance matrices: rounding only. The squared
    distances are computed from the features (not squared from rounded distances), ranked before
    scaling, and the pairs of V recomputed with dot products; so near-ties (within float32 rounding)
    may order differently."""

    def __init__(self, q: Tensor, g: Tensor, memory_budget_mb: float = 1024) -> None:
        self.x = torch.cat([q, g])
        self.sq = torch.linalg.vector_norm(self.x, dim=1).square_()
        self.num_query, self.num_all = q.shape[0], self.x.shape[0]
        self.device = self.x.device
        self.scale = torch.full((self.num_all,), float("nan"), dtype=torch.float32, device=self.device)
        self.pairs_per_step = max(1, int(memory_budget_mb * 2**20) // (32 * self.x.shape[1]))

    def rows(self, first: int, last: int) -> Tensor:
        """Not the scaled squared distances themselves but ``|x_j|^2 - 2 x_i . x_j``: the same order (up
        to rounding) for a third of the element-wise passes over the chunk; each row's scale is its
        maximum plus ``|x_i|^2``."""
        key = torch.addmm(self.sq[None], self.x[first:last], self.x.t(), beta=1.0, alpha=-2.0)
        self.scale[first:last] = key.amax(1).add_(self.sq[first:last]).clamp_min_(0.0)
        _check_scale(self.scale[first:last], "all features are identical (every squared distance of a row is 0)")
        return key

    def pairs(self, i: Tensor, j: Tensor) -> Tensor:
        out = torch.empty(i.numel(), dtype=torch.float32, device=self.device)
        for first in range(0, i.numel(), self.pairs_per_step):
            a, b = i[first:first + self.pairs_per_step], j[first:first + self.pairs_per_step]
            dot = (self.x[a] * self.x[b]).sum(1)
            out[first:first + a.numel()] = (self.sq[b] - 2.0 * dot + self.sq[a]).clamp_min_(0.0)
        return out.div_(self.scale[i])

    def query_gallery(self, idx: Tensor, out: Tensor | None = None) -> Tensor:
        q = self.num_query
        rows = self.x[idx]
        d2 = torch.addmm(self.sq[None, q:], rows, self.x[q:].t(), beta=1.0, alpha=-2.0)
        d2 = d2.add_(self.sq[idx, None]).clamp_min_(0.0)
        d2 = out.copy_(d2) if out is not None else d2.to(torch.float32)
        return d2.div_(self.scale[idx, None])


def _check_scale(scale: Tensor, message: str) -> None:
    if not bool((scale > 0).all()):
        raise ValueError(f"cannot re-rank: {message}")
