"""Compiled loops of the engine's transform passes (numba, ``nogil``, cached on disk).

Each function is one fused pass over one block of lines, so that a block costs a handful of calls instead of
~20 numpy passes over short strided lines (where numpy's per-loop overhead dominated). Lines are the last
axis of canonical ``(P, Q, n)`` views (any strides); a block is the flat line range ``[l0, l0 + L)`` of the
``P * Q`` lines (line ``l`` is ``(l // Q, l % Q)``). Two real lines share one complex line (``x1 + i x2``;
the transfer functions are real, so the two never mix): lines ``2r`` and ``2r + 1`` of the block are complex
line ``r``. The complex buffer has one of two layouts, each read and written with unit-stride inner loops:

* ``LINES`` (the pass's lines are contiguous in memory): ``z`` is ``(rows, M)``, one complex line per row;
  its float view ``zf`` ``(rows, 2M)`` holds line ``2r`` at ``zf[r, 0::2]`` and ``2r + 1`` at ``zf[r, 1::2]``.
* ``SAMPLES`` (the lines are strided, so that neighbouring lines are neighbours in memory): ``z`` is
  ``(M, rows)``, one sample of every line per row; ``zf`` ``(M, 2 rows)`` holds line ``j`` at ``zf[:, j]``.

Compiled code is cached beside this file or in numba's user cache (``NUMBA_CACHE_DIR``), so a new process
(a Dask worker) loads it instead of compiling.
"""
from __future__ import annotations

import numba as nb
import numpy as np

_JIT = dict(nogil=True, cache=True, boundscheck=False)

EDGE_NONE, EDGE_LEFT, EDGE_RIGHT, EDGE_BOTH = 0, 1, 2, 3
LINES, SAMPLES = 0, 1
OP_SET, OP_SUB = 0, 1


@nb.njit(inline="always", **_JIT)
def _at(mem, axis, p, q, i):
    """Sample i of line (p, q) of ``mem`` (line axis ``axis``)."""
    if axis == 0:
        return mem[i, p, q]
    if axis == 1:
        return mem[p, i, q]
    return mem[p, q, i]


@nb.njit(**_JIT)
def load(mem, axis, Q, l0, L, zf, m, layout, edge, c, e):
    """Block lines minus their edge value into the float view ``zf``, zero-padded beyond sample ``m``.

    ``mem``: the source in memory order, lines along ``axis`` (``Q``: lines per row of the canonical view);
    its SAMPLES rows (axis 0 or 1) and LINES lines (axis 2) are read with unit stride when it is C-ordered.
    Edge values per line (float64, first: unsigned differences would wrap) go to ``c`` (subtracted) and
    ``e`` (the right-end extension): EDGE_LEFT ``c = v[0]`` (a true left end: its 'nearest' extension becomes
    zero), EDGE_BOTH also ``e = v[m-1] - v[0]``, EDGE_RIGHT ``c = v[m-1]``, EDGE_NONE zeros. A block of odd
    ``L`` leaves the second line of its last pair zero.
    """
    for j in range(L):
        p, q = (l0 + j) // Q, (l0 + j) % Q
        cv = 0.0
        ev = 0.0
        if edge == EDGE_LEFT or edge == EDGE_BOTH:
            cv = np.float64(_at(mem, axis, p, q, 0))
            if edge == EDGE_BOTH:
                ev = np.float64(_at(mem, axis, p, q, m - 1)) - cv
        elif edge == EDGE_RIGHT:
            cv = np.float64(_at(mem, axis, p, q, m - 1))
        c[j] = cv
        e[j] = ev
    rows = (L + 1) >> 1
    if layout == SAMPLES:
        M = zf.shape[0]
        j = 0
        while j < L:
            p, q = (l0 + j) // Q, (l0 + j) % Q
            cnt = min(Q - q, L - j)
            cc = c[j:j + cnt]
            for i in range(m):
                row = mem[i, p, q:q + cnt] if axis == 0 else mem[p, i, q:q + cnt]
                out = zf[i, j:j + cnt]
                for t in range(cnt):
                    out[t] = row[t] - cc[t]
            j += cnt
        for i in range(m):
            for t in range(L, 2 * rows):
                zf[i, t] = 0
        for i in range(m, M):
            for t in range(2 * rows):
                zf[i, t] = 0
    else:
        M2 = zf.shape[1]
        for r in range(rows):
            j0 = 2 * r
            p0, q0 = (l0 + j0) // Q, (l0 + j0) % Q
            a = mem[p0, q0, :m]
            out = zf[r]
            c0 = c[j0]
            if j0 + 1 < L:
                p1, q1 = (l0 + j0 + 1) // Q, (l0 + j0 + 1) % Q
                b = mem[p1, q1, :m]
                c1 = c[j0 + 1]
                for i in range(m):
                    out[2 * i] = a[i] - c0
                    out[2 * i + 1] = b[i] - c1
            else:
                for i in range(m):
                    out[2 * i] = a[i] - c0
                    out[2 * i + 1] = 0
            for i in range(2 * m, M2):
                out[i] = 0


@nb.njit(**_JIT)
def spectra(zfa, Ha, zfb, Hb, yf, layout, rows):
    """y = za * Ha + zb * Hb on float views (H real, signs folded in; y may be za or zb; Hb = 0 for one term),
    over the first ``rows`` complex lines. SAMPLES: one H value per sample (row); LINES: per float (each
    value twice, length 2 M)."""
    if layout == SAMPLES:
        n = 2 * rows
        for i in range(zfa.shape[0]):
            ha, hb = Ha[i], Hb[i]
            a, b, y = zfa[i, :n], zfb[i, :n], yf[i, :n]
            for t in range(n):
                y[t] = a[t] * ha + b[t] * hb
    else:
        for r in range(rows):
            a, b, y = zfa[r], zfb[r], yf[r]
            for t in range(zfa.shape[1]):
                y[t] = a[t] * Ha[t] + b[t] * Hb[t]


@nb.njit(**_JIT)
def store(yf, off, mem, axis, Q, nbo, l0, L, layout, op, C, S, E, R, shift):
    """Block line ``j``, outputs ``i`` in ``[0, nbo)`` of the destination (``mem`` in memory order, as for
    :func:`load`):  op= (its sample ``off + i`` in ``yf``)
    ``+ S[0] C[0, j] + S[1] C[1, j] + E[0, j] R[0, i] + E[1, j] R[1, i]``.

    ``C[t]``: the edge values term t's source had subtracted at load and ``S[t]`` the term's sign (zero for
    no term), so they are added back; ``E[t]``: the right-end extensions ``v[n-1] - v[0]`` and ``R[t]`` the
    signed kernel mass right of the line per output (zero where no tap reaches past the end, or no such
    term). ``op``: OP_SET or OP_SUB. ``shift`` (length >= L) is workspace.
    """
    s0, s1 = S[0], S[1]
    for j in range(L):
        shift[j] = s0 * C[0, j] + s1 * C[1, j]
    if layout == SAMPLES:
        j = 0
        while j < L:
            p, q = (l0 + j) // Q, (l0 + j) % Q
            cnt = min(Q - q, L - j)
            sh, e0, e1 = shift[j:j + cnt], E[0, j:j + cnt], E[1, j:j + cnt]
            for i in range(nbo):
                r0, r1 = R[0, i], R[1, i]
                y = yf[off + i, j:j + cnt]
                row = mem[i, p, q:q + cnt] if axis == 0 else mem[p, i, q:q + cnt]
                if op == OP_SET:
                    for t in range(cnt):
                        row[t] = y[t] + sh[t] + e0[t] * r0 + e1[t] * r1
                else:
                    for t in range(cnt):
                        row[t] -= y[t] + sh[t] + e0[t] * r0 + e1[t] * r1
            j += cnt
    else:
        R0, R1 = R[0], R[1]
        for r in range((L + 1) >> 1):
            j = 2 * r
            y = yf[r, 2 * off:2 * (off + nbo)]
            p, q = (l0 + j) // Q, (l0 + j) % Q
            a = mem[p, q, :nbo]
            sa, ea0, ea1 = shift[j], E[0, j], E[1, j]
            if j + 1 < L:       # both lines of the pair in one sweep over the complex line
                p, q = (l0 + j + 1) // Q, (l0 + j + 1) % Q
                b = mem[p, q, :nbo]
                sb, eb0, eb1 = shift[j + 1], E[0, j + 1], E[1, j + 1]
                if op == OP_SET:
                    for i in range(nbo):
                        a[i] = y[2 * i] + sa + ea0 * R0[i] + ea1 * R1[i]
                        b[i] = y[2 * i + 1] + sb + eb0 * R0[i] + eb1 * R1[i]
                else:
                    for i in range(nbo):
                        a[i] -= y[2 * i] + sa + ea0 * R0[i] + ea1 * R1[i]
                        b[i] -= y[2 * i + 1] + sb + eb0 * R0[i] + eb1 * R1[i]
            elif op == OP_SET:
                for i in range(nbo):
                    a[i] = y[2 * i] + sa + ea0 * R0[i] + ea1 * R1[i]
            else:
                for i in range(nbo):
                    a[i] -= y[2 * i] + sa + ea0 * R0[i] + ea1 * R1[i]



def warm(work_dtypes=(np.float32,), src_dtypes=(np.uint16, np.float32)) -> None:
    """Load (or compile, the first time on a host) the specialisations a DoG of ``src_dtypes`` input in
    ``work_dtypes`` precision uses, contiguous and strided, so that the first engine call in a process (a
    Dask worker's first task) does not pay numba's per-process loading. Tiny arrays; no result kept."""
    for wd in work_dtypes:
        wd = np.dtype(wd)
        c, e, sh = np.zeros(4), np.zeros(4), np.zeros(4)
        C, E, R, S = np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 4)), np.zeros(2)
        H = np.zeros(8, wd)
        H.flags.writeable = False       # the engine's transfer functions are frozen (a numba type of its own)
        for layout, zshape in ((LINES, (2, 8)), (SAMPLES, (4, 4))):
            zf = np.zeros(zshape, wd)
            spectra(zf, H, zf, H, zf, layout, 1)
        for sd in tuple(src_dtypes) + (wd,):
            full = np.zeros((4, 4, 8), sd)
            for mem in (full, full[:, :, :4]):          # C-ordered, and a strided window
                for axis, layout in ((2, LINES), (0, SAMPLES)):
                    zf = np.zeros((2, 8) if layout == LINES else (4, 4), wd)
                    load(mem, axis, 4, 0, 2, zf, 2, layout, EDGE_BOTH, c, e)
                    if sd == wd:
                        store(zf, 0, mem, axis, 4, 2, 0, 2, layout, OP_SET, C, S, E, R, sh)
