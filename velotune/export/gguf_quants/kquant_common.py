"""Scale searches and scale packing shared by the k-quants (Q4_K, Q5_K, Q6_K).

gguf-py can read k-quants but not write them, and llama.cpp's writer is C we do not build. These are numpy
versions of the searches llama.cpp's reference quantizers run (no importance matrix), vectorised over every
sub-block at once: the only Python loops are over the fixed number of search steps (16-21), never over blocks.

Two searches:

- `search_min_scale` (llama.cpp's `make_qkx2_quants`): asymmetric `x ~ scale * q - min` with q in [0, nmax] under
  weights w. Starts from the min/max grid, then tries `nstep + 1` stretched grids; each grid's q is refit by
  weighted least squares for (scale, min) and kept when its weighted squared error is lower. As in llama.cpp, an
  accepted fit moves `min`, and later grids are laid from the new min.
- `search_symmetric_scale` (llama.cpp's `make_qx_quants`, rmse_type 1): symmetric `x ~ scale * q` with q in
  [-nmax, nmax - 1] under weights x^2, trying 18 grids around `nmax / max|x|` and keeping the best least-squares
  scale.

Sums are float32 like llama.cpp's; the weighted error of a candidate is expanded from those sums (in float64) rather
than re-summed per element, which changes only which of two nearly equal candidates wins.
"""

from __future__ import annotations

import numpy as np

GROUP_MAX_EPS = np.float32(1e-15)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product: (S, n), (S, n) -> (S,)."""
    return np.einsum("ij,ij->i", a, b)


def _rowsum(a: np.ndarray) -> np.ndarray:
    """Row sums; einsum is several times faster than .sum(axis=1) over a short last axis: (S, n) -> (S,)."""
    return np.einsum("ij->i", a)


def _grid(x: np.ndarray, offset: np.ndarray, iscale: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """q = clamp(round_half_even(iscale * (x - offset)), lo, hi), as float32. x: (S, n); offset, iscale: (S,)."""
    q = x - offset[:, None]
    q *= iscale[:, None]
    np.rint(q, out=q)
    np.clip(q, lo, hi, out=q)
    return q


def search_min_scale(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (scale, min, q) with x ~ scale * q - min, q in [0, nmax], per row of x.

    x, w: (S, n) float32 sub-blocks and their weights. Returns scale (S,), min (S,) (>= 0, to subtract) and
    q (S, n) float32 holding integers.
    """
    f32 = np.float32
    sum_w = w.sum(axis=1)  # (S,)
    wx = w * x  # (S, n)
    sum_x = wx.sum(axis=1)
    sum_x2 = _rowdot(wx, x).astype(np.float64)
    lo = np.minimum(x.min(axis=1), f32(0))  # (S,)
    hi = x.max(axis=1)
    flat = hi == lo  # constant non-negative rows: q = 0, scale 0
    span = np.where(flat, f32(1), hi - lo)

    def error(scale: np.ndarray, mn: np.ndarray, s_l: np.ndarray, s_l2: np.ndarray, s_xl: np.ndarray) -> np.ndarray:
        s, m = scale.astype(np.float64), mn.astype(np.float64)
        return (
            s * s * s_l2 + 2 * s * m * s_l - 2 * s * s_xl + m * m * sum_w - 2 * m * sum_x + sum_x2
        )  # sum w * (s*q + m - x)^2

    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    q = _grid(x, lo, iscale, 0, nmax)
    wq = w * q
    best = error(scale, lo, _rowsum(wq), _rowdot(wq, q), _rowdot(wq, x))
    mn = lo.copy()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            width = hi - mn
            live = (width > 0) & ~flat
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(live, width, f32(1))
            qa = _grid(x, mn, iscale, 0, nmax)
            wq = w * qa
            s_l = _rowsum(wq)
            s_l2 = _rowdot(wq, qa)
            s_xl = _rowdot(wq, x)
            det = sum_w * s_l2 - s_l * s_l
            ok = live & (det > 0)
            det = np.where(ok, det, f32(1))
            this_scale = (sum_w * s_xl - sum_x * s_l) / det
            this_min = (s_l2 * sum_x - s_l * s_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, f32(0), this_min)
            this_scale = np.where(clamp, s_xl / np.where(s_l2 > 0, s_l2, f32(1)), this_scale)
            err = error(this_scale, this_min, s_l, s_l2, s_xl)
            better = ok & (err < best)
            np.copyto(q, qa, where=better[:, None])
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    q[flat] = 0
    scale = np.where(flat, f32(0), scale).astype(np.float32)
    return scale, (-mn).astype(np.float32), q


def search_symmetric_scale(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, q) with x ~ scale * q, q in [-nmax, nmax - 1], weights x^2, per row of x.

    x: (S, n) float32. Returns scale (S,) (0 for all-zero rows) and q + nmax (S, n) float32 holding integers.
    """
    f32 = np.float32
    imax = np.abs(x).argmax(axis=1)  # first index of the largest |x|, like llama.cpp's strict '>'
    amax_signed = np.take_along_axis(x, imax[:, None], axis=1)[:, 0]  # (S,)
    zero = np.abs(amax_signed) < GROUP_MAX_EPS
    safe_max = np.where(zero, f32(1), amax_signed)
    w = x * x
    wx = w * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = _grid(x, np.zeros_like(iscale), iscale, -nmax, nmax - 1)
        return q, _rowdot(wx, q), _rowdot(w * q, q)

    q, sumlx, suml2 = fit(f32(-nmax) / safe_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            qa, slx, sl2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / safe_max)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            np.copyto(q, qa, where=better[:, None])
            scale = np.where(better, slx / np.where(sl2 > 0, sl2, f32(1)), scale)
            best = np.where(better, scale * slx, best)
    q += f32(nmax)
    q[zero] = 0
    return np.where(zero, f32(0), scale).astype(np.float32), q


def fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes (S, 2), the fp16 value back as float32 (S,)) for float32 values v (S,)."""
    h = v.astype(np.float16)
    return h.reshape(-1, 1).view(np.uint8), h.astype(np.float32)


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins per block -> the 12-byte layout Q4_K/Q5_K use. (nb, 8) x2 -> (nb, 12)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def unpack_scales_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack_scales_k4`: (nb, 12) uint8 -> scales (nb, 8), mins (nb, 8) as uint8."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    ls = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    lm = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return ls, lm


def quantize_min_scale_blocks(
    x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Q4_K/Q5_K super-block step shared by both: per-32 search, 6-bit scales/mins, requantize.

    x: (nb, 256) float32. Returns d bytes (nb, 2), dmin bytes (nb, 2), packed scales (nb, 12) and
    q (nb, 256) uint8 in [0, nmax].
    """
    f32 = np.float32
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)  # (S, 32) sub-blocks
    av_x = np.sqrt((sub * sub).sum(axis=1) / f32(32))  # (S,)
    w = av_x[:, None] + np.abs(sub)
    scale, mins, q = search_min_scale(sub, w, nmax, rmin, rdelta, nstep)
    scale = scale.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = np.maximum(scale.max(axis=1), f32(0))  # (nb,)
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.clip(np.rint(inv_scale[:, None] * scale), 0, 63)  # (nb, 8)
    lm = np.clip(np.rint(inv_min[:, None] * mins), 0, 63)
    d_bytes, d = fp16_round(max_scale / f32(63))
    dmin_bytes, dmin = fp16_round(max_min / f32(63))
    sub_d = (d[:, None] * ls.astype(np.float32)).reshape(-1)  # (S,)
    sub_m = (dmin[:, None] * lm.astype(np.float32)).reshape(-1)
    live = sub_d != 0  # llama.cpp keeps the search's q where the rounded scale is 0
    with np.errstate(divide="ignore", invalid="ignore"):
        rq = (sub + sub_m[:, None]) / np.where(live, sub_d, f32(1))[:, None]
    np.rint(rq, out=rq)
    np.clip(rq, 0, nmax, out=rq)
    q = np.where(live[:, None], rq, q)
    return d_bytes, dmin_bytes, pack_scales_k4(ls, lm), q.reshape(nb, 256).astype(np.uint8)
