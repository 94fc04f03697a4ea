"""Binned ("subproblem") gridding with dense batched products: no per-tap index tensors.

The samples are sorted into bins of ``B`` grid cells per axis (by the first grid cell their
kernel touches). Every bin owns a private padded subgrid of ``P = B + W − 1`` cells per axis, which
holds the kernel footprints of all its samples. Each bin's sample list is padded with zero-weight
samples to a length ``K`` (a multiple of ``chunk``, coarser for crowded bins so that padding stays
≤ 12.5 %), and the kernel weights of each axis are stored placed into dense ``(K, P)`` vectors
(``W`` non-zeros) in that padded, sorted order. Bins of one slab (same bin index along the first
axis) with the same ``K`` form one batched matrix product:

* spreading (adjoint): ``sub[(j,k), (i,c)] = Σ_m (Ay ⊗ Az)[m, (j,k)] · (Ax[m, i] · y[m, c])`` —
  one padded subgrid per bin, no atomics and no per-tap index —, then the slab's subgrids are
  folded into the grid with strided slice additions (halos wrap periodically);
* interpolation (forward): the slab's padded subgrids are gathered from the grid (whole-slice
  ``index_select``), and ``y[m, c] = Σ_i Ax[m, i] · ((Ay ⊗ Az) @ sub)[m, (i, c)]``.

This trades ``(P/W)^d`` more multiply-adds than the exact ``W^d`` taps (6.6× for W = 8, B = 8 in
3D) for dense GEMMs and contiguous memory access. Memory held: the placed weights, about
``1.2·M·d·P`` reals, and O(M) integers; temporaries are bounded by one slab of subgrids plus
``GROUP_BYTES`` per batched product.

Only torch operations are used, so it runs on any device; it was written for and measured on the
CPU, where ``index_add_`` of one value per tap (the ``gather`` method's adjoint) is slow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: default bin size (grid cells per axis)
BIN = 8
#: bins' padded sample counts are multiples of this
CHUNK = 32
#: target temporary bytes of one batched product
GROUP_BYTES = 32 * 2**20


class BinnedGridder:
    """Binned spreading and interpolation of one trajectory on a periodic grid.

    Parameters
    ----------
    first : list of Tensor
        Per axis, the first grid cell (int64, not yet reduced modulo the grid) touched by each
        sample's kernel, shape ``(M,)``.
    weights : list of Tensor
        Per axis, the kernel weights ``(M, W)`` (any float dtype).
    grid : tuple of int
        Grid size G per axis.
    width : int
        Kernel width W (cells).
    dtype : torch.dtype
        Real dtype in which the placed weights are stored (cast per use).
    bin_size : int, optional
        Bin edge B in grid cells (clipped to the grid); default :data:`BIN`.
    chunk : int, optional
        Padding granularity of the bins' sample counts; default :data:`CHUNK`.
    """

    def __init__(
        self,
        first: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor],
        grid: Sequence[int],
        width: int,
        dtype: torch.dtype,
        bin_size: int | None = None,
        chunk: int | None = None,
    ):
        self.grid = tuple(int(g) for g in grid)
        self.ndim = len(self.grid)
        self.width = int(width)
        self.chunk = int(CHUNK if chunk is None else chunk)
        bin_size = BIN if bin_size is None else bin_size
        dev = first[0].device
        self.device = dev
        m = int(first[0].shape[0])
        self.n_samples = m
        self.bins = tuple(max(1, min(int(bin_size), g)) for g in self.grid)
        self.nb = tuple(math.ceil(g / b) for g, b in zip(self.grid, self.bins, strict=True))
        self.pad = tuple(b + self.width - 1 for b in self.bins)
        # per-axis bin and in-bin offset
        lin = torch.zeros(m, dtype=torch.int64, device=dev)
        offs = []
        for ax in range(self.ndim):
            i0 = torch.remainder(first[ax], self.grid[ax])
            b = torch.div(i0, self.bins[ax], rounding_mode="floor")
            offs.append(i0 - b * self.bins[ax])
            lin = lin * self.nb[ax] + b
        nbins = math.prod(self.nb)
        per_slab = nbins // self.nb[0]
        self.per_slab = per_slab
        order = torch.argsort(lin, stable=True)
        counts = torch.bincount(lin, minlength=nbins)
        # padded length of each bin: a multiple of ``chunk``, coarser (≤ 12.5 % padding) for
        # crowded bins, so that bins of equal padded length form one batched product
        lg = torch.floor(torch.log2(counts.clamp(min=1).to(torch.float64))).to(torch.int64)
        step = torch.clamp(2 ** (lg - 3), min=self.chunk)
        klen = torch.div(counts + step - 1, step, rounding_mode="floor") * step
        # bins ordered by (slab, padded length, bin): each (slab, length) pair is one group
        slab = torch.div(torch.arange(nbins, device=dev), per_slab, rounding_mode="floor")
        key = slab * (int(klen.max()) + 1) + klen
        nonempty = torch.nonzero(counts > 0).squeeze(1)
        bins_sorted = nonempty[torch.argsort(key[nonempty], stable=True)]
        kl = klen[bins_sorted]
        row_start = torch.zeros(nbins, dtype=torch.int64, device=dev)
        row_start[bins_sorted] = torch.cumsum(kl, 0) - kl
        n_rows = int(kl.sum())
        self.n_rows = n_rows
        sample_start = torch.cumsum(counts, 0) - counts
        lin_sorted = lin[order]
        rank = torch.arange(m, device=dev) - sample_start[lin_sorted]
        # padded sample list: index m (a zero-weight dummy row) in the padding
        perm = torch.full((n_rows,), m, dtype=torch.int64, device=dev)
        perm[row_start[lin_sorted] + rank] = order
        self.perm = perm
        _, gcounts = torch.unique_consecutive(key[bins_sorted], return_counts=True)
        # groups: (slab, padded length, first row, bins of the slab (in-slab ids))
        self.groups: list[tuple[int, int, int, torch.Tensor]] = []
        self.empty = [
            torch.nonzero(counts[bx * per_slab : (bx + 1) * per_slab] == 0).squeeze(1)
            for bx in range(self.nb[0])
        ]
        pos = 0
        for c in gcounts.tolist():
            b0 = int(bins_sorted[pos])
            ids = bins_sorted[pos : pos + c]
            self.groups.append((b0 // per_slab, int(klen[b0]), int(row_start[b0]), ids % per_slab))
            pos += c
        # dense placed weights per axis, in padded sorted order (zero rows in the padding)
        self.dense = []
        tap = torch.arange(self.width, device=dev)
        valid = perm < m
        src = perm[valid]
        for ax in range(self.ndim):
            d = torch.zeros(n_rows, self.pad[ax], dtype=dtype, device=dev)
            pos = offs[ax].index_select(0, src)[:, None] + tap
            d[valid] = torch.zeros(src.shape[0], self.pad[ax], dtype=dtype, device=dev).scatter_(
                1, pos, weights[ax].index_select(0, src).to(dtype)
            )
            self.dense.append(d)

    def memory_bytes(self) -> int:
        """Bytes of precomputed geometry and weights held."""
        t = [self.perm, *self.dense, *(g[3] for g in self.groups), *self.empty]
        return sum(x.numel() * x.element_size() for x in t)

    # -- helpers ---------------------------------------------------------------------------------
    def _dense(self, ax: int, s: int, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Axis ``ax`` dense placed weights ``(n, P)`` of padded sample rows ``s:e``."""
        return self.dense[ax][s:e].to(dtype)

    def _tail(self, s: int, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Outer product of the dense weights of axes 1..d-1: ``(n, P1·…·P_{d-1})``."""
        n = e - s
        r = self._dense(1, s, e, dtype) if self.ndim > 1 else None
        for ax in range(2, self.ndim):
            r = (r[:, :, None] * self._dense(ax, s, e, dtype)[:, None, :]).reshape(n, -1)
        if r is None:
            r = torch.ones(n, 1, dtype=dtype, device=self.device)
        return r

    def _batches(self, k: int, nbins: int, cols: int, itemsize: int) -> int:
        """Bins per batched product for padded length ``k`` within the temporary budget."""
        tail = math.prod(self.pad[1:])
        p0c = self.pad[0] * cols
        per_bin = itemsize * (k * (tail + p0c + self.pad[0]) + tail * p0c)
        return max(1, min(nbins, GROUP_BYTES // max(per_bin, 1)))

    def _slabs(self):
        """Yield ``(slab, [groups of that slab])`` in slab order."""
        cur, acc = None, []
        for g in self.groups:
            if g[0] != cur:
                if acc:
                    yield cur, acc
                cur, acc = g[0], []
            acc.append(g)
        if acc:
            yield cur, acc

    # -- spreading -------------------------------------------------------------------------------
    def spread(self, yr: torch.Tensor) -> torch.Tensor:
        """Samples ``(M, C)`` (real) -> grid rows ``(Gtot, C)`` in ``yr``'s dtype."""
        dt = yr.dtype
        cols = yr.shape[1]
        yz = torch.cat([yr, yr.new_zeros(1, cols)])
        out = yr.new_zeros((*self.grid, cols))
        p0 = self.pad[0]
        tail = math.prod(self.pad[1:])
        acc = yr.new_empty((self.per_slab, tail, p0 * cols))
        for bx, groups in self._slabs():
            # bins with samples are overwritten below; zero the others
            acc.index_fill_(0, self.empty[bx], 0.0)
            for _, k, row0, ids in groups:
                nbat = self._batches(k, ids.shape[0], cols, dt.itemsize)
                for j0 in range(0, ids.shape[0], nbat):
                    j1 = min(ids.shape[0], j0 + nbat)
                    r0, r1 = row0 + j0 * k, row0 + j1 * k
                    ax0 = self._dense(0, r0, r1, dt)  # (n, P0)
                    yv = yz.index_select(0, self.perm[r0:r1])
                    left = (ax0[:, :, None] * yv[:, None, :]).view(j1 - j0, k, p0 * cols)
                    right = self._tail(r0, r1, dt).view(j1 - j0, k, tail)
                    # (bins, tail, P0·C): each bin's padded subgrid
                    acc.index_copy_(0, ids[j0:j1], torch.bmm(right.transpose(1, 2), left))
            self._fold_slab(out, acc, bx, cols)
        return out.view(-1, cols)

    def _fold_slab(self, out: torch.Tensor, acc: torch.Tensor, bx: int, cols: int) -> None:
        """Add one slab of bin subgrids ``acc`` into the grid ``out`` (periodic halos)."""
        k = self.ndim - 1
        # (nb1, …, nb_k, P1, …, P_k, P0, C); fold axis 1, 2, …: its bins sit at dim a, its
        # padded cells at dim k (the earlier axes' pads are gone by then)
        v = acc.view(*self.nb[1:], *self.pad[1:], self.pad[0], cols)
        for a in range(k):
            v = _fold(v.movedim(k, a + 1), a, self.bins[1 + a], self.grid[1 + a])
        _add_periodic(out, bx * self.bins[0], v.movedim(k, 0))

    # -- interpolation ---------------------------------------------------------------------------
    def interp(self, gr: torch.Tensor) -> torch.Tensor:
        """Grid rows ``(Gtot, C)`` (real) -> samples ``(M, C)``."""
        dt = gr.dtype
        cols = gr.shape[1]
        g = gr.view(*self.grid, cols)
        p0 = self.pad[0]
        k = self.ndim - 1
        nbr, pr = self.nb[1:], self.pad[1:]
        tail = math.prod(pr)
        outp = gr.new_empty((self.n_rows, cols))
        for bx, groups in self._slabs():
            # the slab's padded subgrids as a view (P0, nb1, …, nb_k, C, P1, …, P_k) of the
            # periodically extended slab, reordered (no copy) to (nb1, …, nb_k, P0, C, P1, …)
            v = _periodic_take(g, 0, bx * self.bins[0], p0)
            for a in range(k):
                length = (nbr[a] - 1) * self.bins[1 + a] + pr[a]
                v = _periodic_take(v, 1 + a, 0, length)
            for a in range(k):
                v = v.unfold(1 + a, pr[a], self.bins[1 + a])
            perm = [*range(1, k + 1), 0, k + 1, *range(k + 2, 2 * k + 2)]
            v = v.permute(perm)
            if k == 0:
                v = v.unsqueeze(0)
            for _, kl, row0, ids in groups:
                nbat = self._batches(kl, ids.shape[0], cols, dt.itemsize)
                for j0 in range(0, ids.shape[0], nbat):
                    j1 = min(ids.shape[0], j0 + nbat)
                    r0, r1 = row0 + j0 * kl, row0 + j1 * kl
                    # gather the bins' subgrids: (n, P0, C, P1, …) -> matrices (n, tail, P0·C)
                    sel = ids[j0:j1]
                    sub = v[_unravel(sel, nbr)] if k else v.expand(j1 - j0, *v.shape[1:])
                    sub = sub.reshape(j1 - j0, p0 * cols, tail).transpose(1, 2)
                    right = self._tail(r0, r1, dt).view(j1 - j0, kl, tail)
                    t = torch.bmm(right, sub).view(r1 - r0, p0, cols)
                    ax0 = self._dense(0, r0, r1, dt)
                    outp[r0:r1] = (t * ax0[:, :, None]).sum(1)
        # un-permute: padded row j holds sample perm[j] (padding rows go to the dummy row M)
        out = gr.new_zeros((self.n_samples + 1, cols))
        out.index_copy_(0, self.perm, outp)
        return out[: self.n_samples]


def _fold(v: torch.Tensor, dim: int, size: int, period: int) -> torch.Tensor:
    """Fold padded bins into a periodic axis.

    ``v`` has bins at ``dim`` and each bin's ``P`` cells at ``dim + 1``; bin ``b``'s cell ``p``
    lands at ``(b·size + p) mod period``. Returns a tensor with one axis of length ``period`` in
    place of the two (a view of a new tensor; the input is not modified).
    """
    nb, pad = v.shape[dim], v.shape[dim + 1]
    pieces = -(-pad // size)
    shape = list(v.shape)
    shape[dim], shape[dim + 1] = nb + pieces - 1, size
    ext = v.new_empty(shape)
    # piece 0 covers the first nb bins completely; only the halo bins need zeros first
    ext.narrow(dim, 0, nb).copy_(v.narrow(dim + 1, 0, size))
    ext.narrow(dim, nb, pieces - 1).zero_()
    for j in range(1, pieces):
        ln = min(size, pad - j * size)
        ext.narrow(dim, j, nb).narrow(dim + 1, 0, ln).add_(v.narrow(dim + 1, j * size, ln))
    ext = ext.flatten(dim, dim + 1)
    total = ext.shape[dim]
    res = ext.narrow(dim, 0, min(period, total))
    for s in range(period, total, period):
        ln = min(period, total - s)
        res.narrow(dim, 0, ln).add_(ext.narrow(dim, s, ln))
    return res


def _add_periodic(out: torch.Tensor, start: int, v: torch.Tensor) -> None:
    """``out[(start + i) mod len(out)] += v[i]`` along the first axis, by contiguous pieces."""
    period, n, i = out.shape[0], v.shape[0], 0
    pos = start % period
    while i < n:
        ln = min(n - i, period - pos)
        out[pos : pos + ln].add_(v[i : i + ln])
        i += ln
        pos = 0


def _periodic_take(v: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """``v`` at indices ``(start + i) mod v.shape[dim]``, ``i < length``, along ``dim`` (a copy
    made of contiguous pieces)."""
    period = v.shape[dim]
    pieces, pos, i = [], start % period, 0
    while i < length:
        ln = min(length - i, period - pos)
        pieces.append(v.narrow(dim, pos, ln))
        i += ln
        pos = 0
    return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]


def _unravel(flat: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Multi-indices of row-major flat indices ``flat`` into ``shape``."""
    out = []
    for n in reversed(shape):
        out.append(flat % n)
        flat = torch.div(flat, n, rounding_mode="floor")
    return tuple(reversed(out))
