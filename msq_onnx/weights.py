"""Per-channel k-bit weight quantization with searched clipping.

The grid is the k-bit two's-complement range below 8 bits (zero point 0, so every container and kernel
takes it as it is) and -127..127 at 8.

Each layer's weight is viewed as [out_channels, fan_in]. For every candidate
width the clipping range of each output channel is chosen to minimise the
output error estimate sum_j E[x_j^2] * (w_j - q(w_j))^2, with E[x_j^2] the
mean square of the input channel that w_j multiplies (a diagonal
approximation of the layer's output MSE on the calibration data).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .ops import Layer

CLIP_RATIOS = np.array([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3,
                        0.25, 0.2], dtype=np.float32)


def levels(bits: int) -> int:
    """Largest integer of the k-bit grid, 2^(k-1)-1; the grid step is a row's clip over it."""
    return 2 ** (bits - 1) - 1


FULL_RANGE_BELOW = 8  # widths whose grid also takes the two's-complement level -2^(k-1)


def lowest(top):
    """Magnitude of the grid's most negative integer for a largest integer `top` (a width's levels()):
    below 8 bits the k-bit two's-complement range, -2^(k-1)..2^(k-1)-1, which every container holds
    (int4 and MatMulNBits store -8..7, int2 -2..1): 2 bits get four levels instead of three. 8 bits keep
    -127..127, where ORT's u8s8 kernels can saturate on -128."""
    return np.where(np.asarray(top) < levels(FULL_RANGE_BELOW), np.asarray(top) + 1, np.asarray(top))


TRANSPOSE_TILE = 64  # rows of the source a tile of transposed() takes: a [64, 384] float32 tile stays in L2


def transposed(matrix: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """A C-contiguous copy of a 2-D matrix's transpose (its rows in `order`, if given), made tile by tile: numpy's
    own copy of a transposed view walks the source column by column, a cache miss a value once it outgrows the
    cache (MiniLM-L6's stacked [7680, 384] GPTQ candidates: 21 ms, in tiles 2.5 ms; with the act-order gather,
    20.7 -> 3.8 ms)."""
    result = np.empty(matrix.shape[::-1], matrix.dtype)
    for start in range(0, matrix.shape[0], TRANSPOSE_TILE):
        tile = matrix[start:start + TRANSPOSE_TILE].T
        result[:, start:start + TRANSPOSE_TILE] = tile if order is None else tile[order]
    return result


def contiguous(matrix: np.ndarray, dtype=np.float32) -> np.ndarray:
    """np.ascontiguousarray(matrix, dtype), through transposed() where the matrix is a transposed view (a MatMul's
    [in, out] weight seen as [out, in] rows)."""
    if matrix.ndim == 2 and not matrix.flags.c_contiguous and matrix.T.flags.c_contiguous:
        return transposed(matrix.T.astype(dtype, copy=False))
    return np.ascontiguousarray(matrix, dtype=dtype)


def as_matrix(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """[out, fan_in] view of a layer's weight, rows being per-channel groups."""
    return layer.kind.matrix(layer, weight)


def from_matrix(layer: Layer, matrix: np.ndarray) -> np.ndarray:
    return layer.kind.from_matrix(layer, matrix)


def input_channel_index(layer: Layer) -> np.ndarray:
    """[out, fan_in] index of the input channel each weight multiplies."""
    return layer.kind.input_channel_index(layer)


def input_weights(layer: Layer, channel_values: np.ndarray | None) -> np.ndarray:
    """Per-weight factor from per-input-channel statistics; ones if unknown."""
    index = input_channel_index(layer)
    if channel_values is None or np.ndim(channel_values) != 1 or index.max() >= len(channel_values):
        return np.ones(index.shape, np.float32)
    return np.asarray(channel_values, np.float32)[index]


def steps(scale: np.ndarray, fan_in: int) -> np.ndarray:
    """The grid step of every weight: [out, 1] for a scale per row, [out, fan_in] for one per block."""
    if np.ndim(scale) == 1:
        return np.asarray(scale)[:, None]
    return np.repeat(scale, fan_in // scale.shape[1], axis=1)


def grid_bounds(top, flipped, fan_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest integer of every weight's grid, broadcastable to [rows, fan_in]: top [rows] (or one
    width's scalar), flipped None or per row ([rows]), per block ([rows, blocks]) or per weight, True where a
    row's extra level sits on the positive side (-top..top+1 instead of -(top+1)..top): a shift up by one."""
    top = np.asarray(top, np.float32).reshape(-1, 1)
    shift = 0 if flipped is None else steps(np.asarray(flipped), fan_in)
    return -lowest(top).astype(np.float32) + shift, top + shift


def grid_scale(clip: np.ndarray, bits: int) -> np.ndarray:
    """The k-bit grid's float32 step of each row ([out] clip) or block ([out, blocks]): its clip over levels(bits)."""
    return (np.maximum(clip, 1e-12) / levels(bits)).astype(np.float32)


def grid_integers(matrix: np.ndarray, clip: np.ndarray, bits: int, flipped: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Round to the k-bit grid of step clip / levels(bits) per row ([out] clip) or per block of a row
    ([out, blocks] clip), its extra level on the side `flipped` says; returns (integers, scales)."""
    top = levels(bits)
    scale = grid_scale(clip, bits)
    integers = matrix / steps(scale, matrix.shape[1])  # one array, rounded and clipped in place (an embedding: 47 MB)
    np.rint(integers, out=integers)
    return np.clip(integers, *grid_bounds(top, flipped, matrix.shape[1]), out=integers), scale


def grid_codes(matrix: np.ndarray, clip: np.ndarray, bits: int, flipped: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """grid_integers as int8, rounded SEARCH_BLOCK weights at a time: no float array the size of the weight."""
    scale = grid_scale(clip, bits)
    low, high = grid_bounds(levels(bits), flipped, matrix.shape[1])
    codes = np.empty(matrix.shape, np.int8)
    rows = max(1, SEARCH_BLOCK // max(matrix.shape[1], 1))
    for start in range(0, len(matrix), rows):
        part = slice(start, start + rows)
        values = matrix[part] / steps(scale[part], matrix.shape[1])
        np.rint(values, out=values)
        codes[part] = np.clip(values, *(bound[part] if len(bound) > 1 else bound for bound in (low, high)), out=values)
    return codes, scale


def fake_quantize(matrix: np.ndarray, clip: np.ndarray, bits: int, flipped: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """grid_integers as values on the grid; returns (values, scales)."""
    integers, scale = grid_integers(matrix, clip, bits, flipped)
    return (integers * steps(scale, matrix.shape[1])).astype(np.float32), scale


@dataclass
class WidthChoice:
    bits: int
    clip: np.ndarray  # per output channel, or [out, blocks]: per block of `block` inputs of a row; the grid's step
    # is clip / levels(bits) (a level set's rows: their step, times levels(bits))
    error: float  # relative output error: sum s*dw^2 / sum s*w^2, or with the full input Hessian after GPTQ
    integers: np.ndarray | None = None  # [out, fan_in] int8 from GPTQ or a level set; None: round to nearest
    flipped: np.ndarray | None = None  # like clip: True where the grid's extra level is +2^(k-1), not -2^(k-1)
    level_set: np.ndarray | None = None  # the layer's non-uniform integer levels (shared_levels); None: uniform


LARGE_LAYER = 2_000_000  # parameters above which the clipping grid is searched every third ratio ...
REFINED_BELOW_BITS = 5  # ... and refined around the best only at narrower widths, where the error is large


class SearchRows:
    """A weight's [rows, fan_in] view prepared once for the clipping search at every width: a contiguous float32
    copy, its input weights, each row's peak and the weighted signal, and on first use the rows negated where
    the mirrored grid's extra level goes. None of that depends on the width (MiniLM-L6's embedding table: 0.67 of
    its 1.94 s at seven widths was recomputing it). It also remembers the last width searched on it, where the next
    width's search starts (_start_of_search): a layer's widths share one, searched narrowest first."""

    def __init__(self, matrix: np.ndarray, weights: np.ndarray | None):
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.weights = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
        # |x|'s peak, without its copy; the extremes are kept for mirrored (a 32-value row's reductions are slow)
        self._extremes = self.matrix.max(axis=1), self.matrix.min(axis=1)
        self.peak = np.maximum(self._extremes[0], -self._extremes[1])
        self.signal = float((self.matrix ** 2 if self.weights is None else self.weights * self.matrix ** 2).sum())
        self._mirrored = None
        # The last width searched, each row's best ratio index there, and how many ratios the layer's best moved
        # (median over rows) from the width before it: where the next width's search starts
        self.last_bits, self.last_best, self.last_shift = None, None, None

    def mirrored(self) -> tuple[np.ndarray, np.ndarray]:
        """(flipped, rows): True where a row's larger extreme is positive, and the rows negated there."""
        if self._mirrored is None:
            flipped = self._extremes[0] > -self._extremes[1]
            rows = self.matrix.copy()  # negated in place: no third copy of an embedding table's 47 MB at once
            np.negative(rows, out=rows, where=flipped[:, None])
            self._mirrored = flipped, rows
        return self._mirrored


def search_clips(matrix, weights: np.ndarray | None, bits: int, ratios=CLIP_RATIOS,
                 search: bool = True, mirror: bool = False) -> WidthChoice:
    """Per-channel clipping ratio minimising the input-weighted squared error (weights None: unweighted).

    Every ratio costs a full pass over the weight, so the grid is searched coarse to fine: every other
    ratio, then each row's two neighbours of its best one (the error is unimodal in the ratio on every
    layer measured, so this finds the full grid's optimum in 11 passes instead of 17). A layer past
    LARGE_LAYER (an embedding table: 11.7 M values in MiniLM-L6) searches every third ratio, and refines
    around the best (its two neighbours) only below REFINED_BELOW_BITS, where the error is large: MiniLM-L6's
    table at 2 / 3 / 4 bits, error 0.1167 / 0.0283 / 0.0082 unrefined, 0.1124 / 0.0268 / 0.0076 refined,
    0.1122 / 0.0267 / 0.0076 with the full search (11 passes instead of 8). The work runs in place on a
    contiguous copy: a transposed view made it 3-6x slower. On SearchRows that searched the width one bit
    narrower, the rows walk from there instead (_walk_rows), ending on the same coarse ratio where the error is
    unimodal along the coarse grid: the result can depend on the widths searched before on the same SearchRows.

    mirror: the container has room for the level +2^(k-1) too, so each row puts its extra level on the side
    of its larger extreme (searched as the negated row). On MiniLM-L6 that takes 13% off the 3-bit error of
    the dense layers and 17% off the 2-bit embedding's, 98% of what searching both sides finds.

    matrix: an array, or SearchRows already made from it and `weights` (then ignored)."""
    prepared = matrix if isinstance(matrix, SearchRows) else SearchRows(matrix, weights)
    flipped, matrix = prepared.mirrored() if mirror and bits < FULL_RANGE_BELOW else (None, prepared.matrix)
    weights, peak = prepared.weights, prepared.peak
    large = matrix.size > LARGE_LAYER
    stride = (3 if large else 2) if search else len(ratios)
    refine = search and (not large or bits < REFINED_BELOW_BITS)
    hint = _start_of_search(prepared, bits) if search and matrix.shape[1] >= WALK_MIN_ROW else None
    best_index = np.zeros(matrix.shape[0], np.int64)
    best_err = np.zeros(matrix.shape[0], np.float32)
    rows = max(1, SEARCH_BLOCK // max(matrix.shape[1], 1))
    for start in range(0, matrix.shape[0], rows):
        part = slice(start, start + rows)
        block = (matrix[part], None if weights is None else weights[part], peak[part], levels(bits), ratios,
                 stride, refine)
        best_index[part], best_err[part] = _search_rows(*block) if hint is None else _walk_rows(*block, hint[part])
    if search:
        consecutive = prepared.last_bits == bits - 1 and best_index.size > 0  # an empty weight has no median
        prepared.last_shift = int(np.median(prepared.last_best - best_index)) if consecutive else None
        prepared.last_bits, prepared.last_best = bits, best_index
    return WidthChoice(bits, peak * ratios[best_index], float(best_err.sum()) / max(prepared.signal, 1e-30),
                       flipped=flipped)


SEARCH_BLOCK = 1 << 20  # weights searched at a time: 4 MB work arrays instead of an embedding table's 47 MB; blocks
# of 1 << 16 kept the searches of two table threads taking turns at the GIL (3.6-3.8 s -> 3.1 s with 1 << 20)


def _search_rows(matrix: np.ndarray, weights: np.ndarray | None, peak: np.ndarray, top: int, ratios: np.ndarray,
                 stride: int, refine: bool) -> tuple[np.ndarray, np.ndarray]:
    """search_clips on a block of rows: each row's best ratio index and its error, a pass over the block per
    ratio. The error is counted in grid units, step^2 * sum w (q - x / step)^2: one product fewer per weight,
    a multiplication for the division, row sums as products (numpy's reduction along a short row, an embedding
    table's 32-value blocks, is slow): MiniLM-L6's embedding table at seven widths 2.2-2.35 -> 1.4-1.5 s, the
    same clips. peak: each row's largest magnitude."""
    row_errors = _row_errors(matrix, weights, peak, top)
    best_err = np.full(matrix.shape[0], np.inf, np.float32)
    best_index = np.zeros(matrix.shape[0], np.int64)
    for index in np.arange(0, len(ratios), stride):
        err = row_errors(np.full(len(peak), ratios[index], np.float32))
        better = err < best_err
        best_err[better], best_index[better] = err[better], index
    if refine:
        _refine(row_errors, best_index, best_err, ratios)
    return best_index, best_err


def _start_of_search(prepared: SearchRows, bits: int) -> np.ndarray | None:
    """Each row's ratio index where a walk (_walk_rows) starts, or None for the coarse-to-fine search.

    A width one bit wider than the last searched, whose own step from the width before it is known, starts three
    ratios short of that step from the last best. The best ratio's step shrinks by about one a bit (EfficientNet-Lite0
    and MiniLM-L6: median steps 5, 4, 3, 2, 1, 0 from 2 to 8 bits, in CLIP_RATIOS' steps of 0.05), and the walk is
    best started on the clipped side of the best ratio: the error rises smoothly with the clipping there, while near
    the unclipped end a row's outlier makes it jagged and a walk from that side can stop at a bump. Started one,
    two and three ratios short, with every row walked, the walk differed from the coarse-to-fine search's ratio on
    369, 385 and 475 of EfficientNet-Lite0's 152,824 rows at the seven widths, with 34, 32 and 29 widths worse and
    3, 9 and 15 better; on 12-18 of 362,390 of MiniLM-L6's (its embedding table taken as 384-value rows there;
    written, its 32-value blocks are below WALK_MIN_ROW and keep the coarse-to-fine search)."""
    if prepared.last_shift is None or prepared.last_bits != bits - 1:
        return None
    return prepared.last_best - max(prepared.last_shift - WALK_LAG, 0)


WALK_LAG = 3
# Rows of fewer weights keep the coarse-to-fine search: their error curves are jagged (a depthwise row's 9 or 25
# weights), and they cost little. EfficientNet-Lite0's rows at seven widths where the walk ends elsewhere: 475 of
# 152,824 with every row walked, 26 with rows of 128 or more (its time the same, 0.41 s against 0.61).
WALK_MIN_ROW = 128


def _row_errors(matrix: np.ndarray, weights: np.ndarray | None, peak: np.ndarray, top: int):
    """row_errors(ratio, rows=None): the rows' (all, or the indices given) input-weighted squared errors in grid
    units at one ratio each, a pass over them."""
    scaled, work = np.empty_like(matrix), np.empty_like(matrix)
    ones = np.ones(matrix.shape[1], np.float32)
    floor = -float(lowest(top))

    def row_errors(ratio: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        values, weighed, peaks = (matrix, weights, peak) if rows is None else \
            (matrix[rows], None if weights is None else weights[rows], peak[rows])
        into, temporary = (scaled, work) if rows is None else (np.empty_like(values), np.empty_like(values))
        step = np.maximum(peaks * ratio, 1e-12) / top
        np.multiply(values, (1.0 / step)[:, None], out=into)
        np.rint(into, out=temporary)
        np.clip(temporary, floor, top, out=temporary)
        np.subtract(temporary, into, out=temporary)
        np.square(temporary, out=temporary)
        sums = temporary @ ones if weighed is None else np.einsum("ij,ij->i", temporary, weighed)
        return sums * step ** 2

    return row_errors


def _walk_rows(matrix: np.ndarray, weights: np.ndarray | None, peak: np.ndarray, top: int, ratios: np.ndarray,
               stride: int, refine: bool, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_search_rows' result from fewer passes, started near each row's best ratio (`start`, predicted from the
    layer's other widths): the coarse grid's ratio nearest the start and its two coarse neighbours, then, for the
    rows where a neighbour was better, one coarse ratio further that way while the error falls, then the same
    refinement. Wherever the error is unimodal along the coarse grid (a bump between two of its ratios does not
    count) this ends where the coarse-to-fine search does, in about five passes over the weight instead of eleven."""
    row_errors = _row_errors(matrix, weights, peak, top)
    last = (len(ratios) - 1) // stride * stride  # the coarse grid's last ratio
    centre = np.clip(np.rint(np.asarray(start) / stride).astype(np.int64) * stride, 0, last)
    best_index, best_err = centre.copy(), row_errors(ratios[centre])
    for offset in (-stride, stride):
        index = np.clip(centre + offset, 0, last)
        err = row_errors(ratios[index])
        better = err < best_err
        best_err[better], best_index[better] = err[better], index[better]
    direction = np.sign(best_index - centre) * stride
    walking = np.flatnonzero(direction)
    while len(walking):
        index = best_index[walking] + direction[walking]
        inside = (index >= 0) & (index <= last)
        walking, index = walking[inside], index[inside]
        if not len(walking):
            break
        err = row_errors(ratios[index], walking)
        better = err < best_err[walking]
        walking, index, err = walking[better], index[better], err[better]
        best_err[walking], best_index[walking] = err, index
    if refine:
        _refine(row_errors, best_index, best_err, ratios)
    return best_index, best_err


def _refine(row_errors, best_index: np.ndarray, best_err: np.ndarray, ratios: np.ndarray) -> None:
    """Each row's best ratio's two neighbours on the full grid, taken in place where better."""
    for offset in (-1, 1):
        index = np.clip(best_index + offset, 0, len(ratios) - 1)
        err = row_errors(ratios[index])
        better = err < best_err
        best_err[better], best_index[better] = err[better], index[better]


GPTQ_BLOCK = 64  # columns rounded before their error is pushed to the rest in one product (64: fastest here)
GPTQ_MAX_BITS = 6  # wider grids round to nearest: their error is already small, and GPTQ costs rows x fan_in^2
GPTQ_DAMPING = 0.01  # of the mean diagonal, added to the Hessian (as in the GPTQ paper)


def gptq_round(matrix: np.ndarray, scale: np.ndarray, top: np.ndarray, hessian: np.ndarray,
               flipped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Round [rows, fan_in] column by column onto per-row grids (step `scale`, [rows] or per weight
    [rows, fan_in] for block-wise scales; levels +-`top`), each
    column's rounding error compensated on the columns not yet rounded through the inverse input Hessian
    (Frantar et al., GPTQ, 2023: OBQ's update in a fixed order, a block of columns at a time).

    The columns go in decreasing order of their input's power (the Hessian's diagonal, GPTQ's "act order"):
    the inputs whose errors cost most are rounded while the most columns remain to take up their error.
    MiniLM-L6 --avg-bits 3 --prefer size, cosine 0.96285 -> 0.96385 and 0.96287 -> 0.96403 on the two halves
    of its evaluation texts (docs/BENCHMARKS.md, round 20).

    Rows may stack one weight at several widths: one pass serves the whole error table. Returns the int8
    integers and each row's added output error sum_i ((w_i - q_i) / U_ii)^2, which is exactly the growth
    of (W - Q) H (W - Q)^T for the damped Hessian, so no second product is needed to measure it.
    """
    order = np.argsort(-np.diag(hessian), kind="stable")

    def reordered(values):  # a value per weight follows its column; one per row ([rows] or [rows, 1]) stays
        per_row = values is None or np.ndim(values) < 2 or np.shape(values)[1] == 1
        return values if per_row else np.asarray(values)[:, order]

    # the reordered copy is the one the rounding works on: the factorisation is float64, the updates float32
    integers, losses = _gptq_columns(transposed(np.asarray(matrix, np.float32), order), reordered(scale), top,
                                     hessian[np.ix_(order, order)], reordered(flipped))
    return transposed(integers[np.argsort(order)]), losses


def _gptq_in_order(w: np.ndarray, scale: np.ndarray, top: np.ndarray, hessian: np.ndarray,
                   flipped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """gptq_round with the columns in the order given."""
    integers, losses = _gptq_columns(transposed(np.asarray(w, np.float32)), scale, top, hessian, flipped)
    return transposed(integers), losses


def _gptq_columns(columns: np.ndarray, scale: np.ndarray, top: np.ndarray, hessian: np.ndarray,
                  flipped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """_gptq_in_order on the weight's columns as the rows of a [fan_in, rows] float32 array of its own, in which
    the columns of inputs that never fire are zeroed and the rounding works; the integers come back [fan_in, rows]."""
    h = damped(hessian)
    dead = np.diag(hessian) <= 0
    columns[dead] = 0.0
    w = columns.T
    per_row = np.size(scale) == len(w)  # one step per row: every column rounds on the same [rows] steps
    grid = np.broadcast_to(scale.astype(np.float32).reshape(len(w), -1), w.shape)  # [rows, fan_in]
    # Each row's grid is -lowest..top, shifted up by one where flipped: kept as a bool per weight (1 byte),
    # not as two float bound arrays, which cost MiniLM-L6's table workers about 50 MB each.
    floor, limit = -lowest(top).astype(np.float32), top.astype(np.float32)
    flip = None if flipped is None else np.broadcast_to(steps(np.asarray(flipped), w.shape[1]), w.shape)
    try:
        upper = inverse_factor(h).astype(np.float32)
    except np.linalg.LinAlgError:
        integers = np.clip(np.rint(w / grid), *grid_bounds(top, flip, w.shape[1]))
        delta = w - integers * grid
        return integers.astype(np.int8).T, np.einsum("ij,jk,ik->i", delta, h, delta)
    # Per row, column j's steps and shifts are views of one [rows] vector, not a transposed copy of every weight's
    column_steps = np.broadcast_to(grid[:, 0], grid.T.shape) if per_row else np.ascontiguousarray(grid.T)
    column_flips = None if flip is None else (np.broadcast_to(flip[:, 0], flip.T.shape)
                                              if per_row and np.ndim(flipped) == 1 else np.ascontiguousarray(flip.T))
    lower = np.ascontiguousarray(upper.T)  # lower[j, :j]: what the block's earlier errors add to column j
    integers = np.zeros(columns.shape, np.int8)
    losses = np.zeros(w.shape[0])
    for start in range(0, len(columns), GPTQ_BLOCK):
        stop = min(start + GPTQ_BLOCK, len(columns))
        block = columns[start:stop]
        errors = np.zeros_like(block)
        for i in range(stop - start):
            # Each column takes the block's earlier errors when its turn comes (one product) instead of every
            # later column taking each error as it is made (an outer product over the rest of the block): the
            # same sums in another order, with no temporary. MiniLM-L6's error tables 2.67-2.76 -> 2.27-2.33 s
            # (CPU 4.8-5.0 -> 4.1-4.2 s); 574 of its 35 M candidate integers moved, by the summation order.
            j = start + i
            column = block[i] - lower[j, start:j] @ errors[:i] if i else block[i]
            q = np.rint(column / column_steps[j])
            # np.clip's bounds in place, and no bounds made anew where no row is flipped: 384 columns x 30 MiniLM-L6
            # layers of small calls
            low, high = (floor, limit) if column_flips is None else (floor + column_flips[j], limit + column_flips[j])
            np.minimum(np.maximum(q, low, out=q), high, out=q)
            integers[j] = q
            errors[i] = (column - q * column_steps[j]) / upper[j, j]
        losses += (errors ** 2).sum(axis=0)
        columns[stop:] -= upper[start:stop, stop:].T @ errors
    return integers, losses


def inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), as J L^-1 J with L the lower factor of J H J (J: the
    order reversed): one factorization and a triangular inverse, where inverting H and factoring the inverse took
    2.4x the time (8.3 -> 3.4 ms at 384 x 384, the same float32 factor). LinAlgError where H is not positive
    definite."""
    lower = np.linalg.cholesky(hessian[::-1, ::-1])
    inverse, info = lower_inverse(lower)
    if info != 0:
        raise np.linalg.LinAlgError("singular factor")
    return inverse[::-1, ::-1]


def damped(hessian: np.ndarray) -> np.ndarray:
    """The Hessian GPTQ inverts: dead inputs given a unit diagonal, plus 1% of the mean diagonal."""
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += GPTQ_DAMPING * float(np.mean(np.diag(h)))
    return h


def hessian_errors(matrix: np.ndarray, candidates: np.ndarray, hessian: np.ndarray,
                   factor: np.ndarray | None = None) -> np.ndarray:
    """Per stacked candidate row: (w - q) H (w - q)^T, one product for all of them. factor: H's lower Cholesky
    factor L (hessian_factor), when it has one: |(w - q) L|^2 then, a triangular product at about 2/3 of the
    full one's time (MiniLM-L6's [7680, 384] stacks: 18.5 -> 12.3 ms), within 3e-7 of it."""
    delta = (candidates.reshape(-1, *matrix.shape) - matrix).reshape(candidates.shape).astype(np.float32, copy=False)
    if factor is None:
        return np.sum((delta @ hessian.astype(np.float32)) * delta, axis=1, dtype=np.float64)
    # delta (ours alone) transposed is [fan_in, rows] in Fortran order, as BLAS takes it: L^T delta^T, computed in
    # place, is (delta L)^T
    product = lower_transposed_product(factor, delta.T)
    return np.square(product).sum(axis=0, dtype=np.float64)


def lower_transposed_product(lower: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """L^T B for a lower triangular float32 L, in place where B ([K, n], float32) is in Fortran order: BLAS's
    strmm, let go of the GIL (without_gil); else scipy's wrapper."""
    strmm = without_gil("strmm")
    if strmm is None:
        from scipy.linalg.blas import strmm as scipy_strmm

        return scipy_strmm(1.0, lower, columns, side=0, lower=1, trans_a=1, overwrite_b=1)
    return _call_strmm(strmm, lower, columns)


def _call_strmm(strmm, lower: np.ndarray, columns: np.ndarray) -> np.ndarray:
    import ctypes

    if np.ndim(lower) != 2 or np.ndim(columns) != 2 or np.shape(lower) != (len(columns), len(columns)):
        raise ValueError(f"strmm: a {np.shape(lower)} factor cannot multiply {np.shape(columns)} columns")
    if not (columns.flags.f_contiguous and columns.flags.writeable and columns.dtype == np.float32):
        columns = np.array(columns, np.float32, order="F")  # a copy: never written through a read-only view
    lower = np.asfortranarray(lower, np.float32)  # the copy scipy's wrapper makes of a C-ordered factor
    rows, count = (ctypes.c_int(n) for n in columns.shape)
    lead, alpha = ctypes.c_int(max(1, columns.shape[0])), ctypes.c_float(1.0)
    floats = ctypes.POINTER(ctypes.c_float)
    strmm(b"L", b"L", b"T", b"N", ctypes.byref(rows), ctypes.byref(count), ctypes.byref(alpha),
          lower.ctypes.data_as(floats), ctypes.byref(lead), columns.ctypes.data_as(floats), ctypes.byref(lead))
    return columns


def lower_inverse(lower: np.ndarray) -> tuple[np.ndarray, int]:
    """The inverse of a lower triangular float64 matrix and LAPACK's info: dtrtri, let go of the GIL
    (without_gil); else scipy's wrapper."""
    dtrtri = without_gil("dtrtri") if np.ndim(lower) == 2 and np.size(lower) else None
    if dtrtri is None:  # an empty or malformed input gets scipy's own answer and errors
        from scipy.linalg import lapack

        return lapack.dtrtri(lower, lower=1)
    return _call_dtrtri(dtrtri, lower)


def _call_dtrtri(dtrtri, lower: np.ndarray) -> tuple[np.ndarray, int]:
    import ctypes

    if np.ndim(lower) != 2 or np.shape(lower)[0] != np.shape(lower)[1]:
        raise ValueError(f"dtrtri: a {np.shape(lower)} matrix is not square")
    inverse = np.array(lower, np.float64, order="F")  # a copy, as scipy's wrapper makes
    size, info = ctypes.c_int(len(inverse)), ctypes.c_int(0)
    dtrtri(b"L", b"N", ctypes.byref(size), inverse.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
           ctypes.byref(ctypes.c_int(max(1, len(inverse)))), ctypes.byref(info))
    return inverse, info.value


def _strmm_agrees(strmm) -> bool:
    from scipy.linalg.blas import strmm as scipy_strmm

    rng = np.random.default_rng(0)
    lower = np.tril(rng.standard_normal((7, 7))).astype(np.float32)
    columns = np.asfortranarray(rng.standard_normal((7, 5)), np.float32)
    expected = scipy_strmm(1.0, lower, columns.copy(order="F"), side=0, lower=1, trans_a=1)
    return np.array_equal(_call_strmm(strmm, lower, columns), expected)


def _dtrtri_agrees(dtrtri) -> bool:
    from scipy.linalg import lapack

    rng = np.random.default_rng(0)
    lower = np.tril(rng.standard_normal((7, 7))) + 4 * np.eye(7)
    expected, expected_info = lapack.dtrtri(lower, lower=1)
    inverse, info = _call_dtrtri(dtrtri, lower)
    return info == expected_info and np.array_equal(inverse, expected)


_AGREES = {"strmm": _strmm_agrees, "dtrtri": _dtrtri_agrees}


@functools.lru_cache(maxsize=None)
def without_gil(routine: str):
    """scipy's BLAS or LAPACK `routine` ("strmm", "dtrtri") as a ctypes function, which releases the GIL around
    the call where scipy's wrapper holds it: two error-table workers stalled each other through it (MiniLM-L6:
    strmm 0.6 s, dtrtri 0.17 s of one core). Only where scipy links the OpenBLAS its wheels bundle (symbols
    scipy_<routine>_, 32-bit integers) and a small call through it equals scipy's own; None elsewhere (another
    BLAS, whose integer width is not known here)."""
    try:
        import ctypes

        from scipy.linalg import _fblas

        function = getattr(ctypes.CDLL(_fblas.__file__), f"scipy_{routine}_")  # in the libraries _fblas links
        function.restype = None
        return function if _AGREES[routine](function) else None
    except Exception:  # not found, or a check that cannot run: scipy's wrapper then, as before
        return None


FACTOR_JITTER = 1e-6  # of the mean diagonal, below what a float32 product resolves


def hessian_factor(hessian: np.ndarray) -> np.ndarray | None:
    """The float32 lower Cholesky factor of a Hessian, or of it plus FACTOR_JITTER where rounding left it just
    short of positive definite: a LayerNorm's output has one direction of no variance, and 12 of MiniLM-L6's 30
    centred Hessians measured one eigenvalue of -4e-9 to -3.4e-8 of their mean diagonal (an input that never fires
    factors with it too). None where neither factors: its errors take the full product."""
    hessian = np.asarray(hessian, np.float64)
    for jitter in (0.0, FACTOR_JITTER * float(np.mean(np.diag(hessian)))):
        try:
            return np.linalg.cholesky(hessian + jitter * np.eye(len(hessian)) if jitter else hessian
                                      ).astype(np.float32)
        except np.linalg.LinAlgError:
            continue
    return None


def error_table(layer: Layer, weight: np.ndarray, input_sq: np.ndarray | None, candidate_bits,
                search: bool = True, hessians=None, blocks: dict | None = None,
                mirrors: dict | None = None, level_sets: dict | None = None) -> dict[int, WidthChoice]:
    """Per width: clipping from the diagonal search. With input Hessians (instrument.InputHessians), GPTQ
    rounds on one half of the calibration rows and, per width, the rounding (GPTQ or nearest) whose output
    error on the other half is lower is kept, with that error: honest, and GPTQ never makes a width worse.
    Without them, a width up to SHARED_LEVELS_MAX_BITS whose container takes any integers (level_sets[bits])
    gets a non-uniform level set where it has less error than the uniform grid (shared_levels).
    mirrors[bits]: the width's container holds +2^(k-1) too (search_clips)."""
    matrix = contiguous(as_matrix(layer, weight))
    weights = None if input_sq is None else input_weights(layer, input_sq)
    prepared = {}  # per block size: the search's width-independent work, done once for all widths
    table = {bits: _width_choice(matrix, weights, bits, search, (blocks or {}).get(bits, 0),
                                 (mirrors or {}).get(bits, False), prepared)
             for bits in candidate_bits}
    if hessians is None:
        for bits, uniform in table.items():
            if bits <= SHARED_LEVELS_MAX_BITS and (level_sets or {}).get(bits) and np.ndim(uniform.clip) == 1:
                table[bits] = shared_levels(prepared[0], uniform) or uniform
        return table
    del prepared
    widths, rows = list(table), matrix.shape[0]
    # A scale per row stays a [rows x widths, 1] column that broadcasts over the fan-in; block scales (and their
    # flips) are spread to every weight: MiniLM-L6's 1536-row layers held four such 16 MB arrays per width stack.
    per_row = all(np.ndim(table[b].clip) == 1 for b in widths)
    fan_in = 1 if per_row else matrix.shape[1]
    scales = np.concatenate([steps(np.maximum(table[b].clip, 1e-12) / levels(b), fan_in)
                             * np.ones((1, fan_in), np.float32) for b in widths])  # [rows x widths, fan_in or 1]
    tops = np.repeat([levels(b) for b in widths], rows)
    flips = np.concatenate([np.broadcast_to(steps(np.zeros(rows, bool) if table[b].flipped is None else
                                                  table[b].flipped, fan_in), (rows, fan_in))
                            for b in widths])  # [rows x widths, fan_in or 1]
    stacked = np.tile(matrix, (len(widths), 1))
    nearest = np.rint(stacked / scales)
    np.maximum(nearest, -lowest(tops)[:, None].astype(np.float32) + flips, out=nearest)  # one temporary at a time
    np.minimum(nearest, tops[:, None].astype(np.float32) + flips, out=nearest)
    rounded = np.repeat([b <= GPTQ_MAX_BITS for b in widths], rows)  # wider grids: nearest is enough
    any_rounded = bool(rounded.any())
    if rounded[:rounded.sum()].all():  # the narrow widths first: a slice's views instead of the mask's copies
        rounded = slice(0, int(rounded.sum()))
    gptq = nearest.copy()
    if any_rounded:
        gptq[rounded], _ = gptq_round(stacked[rounded], scales[rounded], tops[rounded], hessians.fit,
                                      flips[rounded][:, 0] if per_row else flips[rounded])
    check = hessians.check.astype(np.float64)
    signal = max(float(np.sum((matrix.astype(np.float64) @ check) * matrix)), 1e-30)
    factor = hessian_factor(check)
    nearest_errors = hessian_errors(matrix, nearest * scales, check, factor)
    gptq_errors = nearest_errors.copy()  # the wider grids' GPTQ rows are their nearest rows
    if any_rounded:  # whole widths, each the matrix's rows in order, as hessian_errors tiles them
        gptq_errors[rounded] = hessian_errors(matrix, gptq[rounded] * scales[rounded], check, factor)
    for index, bits in enumerate(widths):
        part = slice(index * rows, (index + 1) * rows)
        gptq_error, nearest_error = gptq_errors[part].sum() / signal, nearest_errors[part].sum() / signal
        if gptq_error < nearest_error:
            table[bits].integers = gptq[part].astype(np.int8)
        table[bits].error = float(min(gptq_error, nearest_error))
    return table


def _width_choice(matrix: np.ndarray, weights: np.ndarray | None, bits: int, search: bool, block: int,
                  mirror: bool, prepared: dict) -> WidthChoice:
    """The clipping search per row, or per block of `block` inputs of a row (a MatMulNBits weight: every
    block has its own scale, which is what makes 2-4 bits usable on a transformer's MatMuls). prepared:
    block -> SearchRows, filled here and shared by the layer's widths."""
    if block not in prepared:  # consecutive blocks of one row are consecutive rows of the reshaped view
        shape = (-1, block) if block else matrix.shape
        prepared[block] = SearchRows(matrix.reshape(shape), None if weights is None else weights.reshape(shape))
    choice = search_clips(prepared[block], None, bits, search=search, mirror=mirror)
    if not block:
        return choice
    choice.clip = choice.clip.reshape(matrix.shape[0], -1)
    if choice.flipped is not None:
        choice.flipped = choice.flipped.reshape(matrix.shape[0], -1)
    return choice


SHARED_LEVELS_MAX_BITS = 4  # widths that may take a level set of their own (shared_levels)
LEVEL_CODE_LIMIT = 63  # a level set's integers: 7 bits, which no integer kernel saturates on (pipeline.saturation_caps)
LEVEL_FIT_WEIGHTS = 1 << 14  # weights (whole rows) the level set is fitted on; every row then takes its scale
LEVEL_FIT_ROUNDS = 6
# Passes over every row after the fit: nearest level, then the row's least-squares step. A second pass took the
# median error ratio on EfficientNet-Lite0 from 0.90 / 0.87 / 0.92 to 0.895 / 0.857 / 0.904 at 2 / 3 / 4 bits and
# won on the tuning half (docs/BENCHMARKS.md, round 24); a third tied with it.
LEVEL_STEP_ROUNDS = 2


def _nearest_code(rows: np.ndarray, step: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Index of each value's nearest multiple of its row's step among a sorted set of integers within
    +-LEVEL_CODE_LIMIT, through a table over half-integers: every midpoint between two integers is a multiple
    of one half, so the half-unit a value falls in decides its level exactly (a binary search per weight took
    5x as long)."""
    first = -2 * LEVEL_CODE_LIMIT - 2
    halves = np.arange(first, -first)  # [h/2, (h+1)/2) for each h
    table = np.searchsorted((codes[1:] + codes[:-1]) / 2, (halves + 0.5) / 2)
    position = np.multiply(rows, (2.0 / step)[:, None])
    position -= first
    np.floor(position, out=position)
    np.clip(position, 0, len(halves) - 1, out=position)
    return table[position.astype(np.intp)]


def _least_squares_steps(rows: np.ndarray, weights: np.ndarray | None, chosen: np.ndarray,
                         step: np.ndarray) -> np.ndarray:
    """Each row's step minimising sum w (x - step q)^2 for its chosen integers q (the old step where q is 0)."""
    weighted = chosen if weights is None else weights * chosen
    fit, norm = np.einsum("ij,ij->i", weighted, rows), np.einsum("ij,ij->i", weighted, chosen)
    return np.maximum(np.where(norm > 0, fit / np.maximum(norm, 1e-30), step), 1e-12).astype(np.float32)


def shared_levels(prepared: SearchRows, uniform: WidthChoice) -> WidthChoice | None:
    """The width's 2^k levels placed where the layer's weights are, not evenly: one set of integers for the
    whole layer (its rows mirrored as search_clips mirrors them, so each row's extra level sits on its larger
    side) and a step per row, fitted by Lloyd's algorithm on the input-weighted squared error the clipping
    search minimises (nearest level, then least-squares levels, then least-squares steps), started from the
    searched uniform grid. The integers stay within +-LEVEL_CODE_LIMIT: an int8 container holds them, and the
    integer kernels take them as they take any int8 weight, at the same speed.

    A row's k bits still pick one of 2^k values, and the set is 2^k small integers per layer, not per row (a
    set per row fits a depthwise convolution's 9 weights exactly, which makes the width meaningless).
    EfficientNet-Lite0: 10-14% less error than the uniform grid at 2-4 bits (median over its layers).
    The set is fitted on every n-th row (LEVEL_FIT_WEIGHTS weights); every row then fits its step.
    Returns None where the uniform grid is as good."""
    if not (np.isfinite(prepared.signal) and np.isfinite(uniform.error) and prepared.signal > 0):
        return None  # weights whose squares overflow: the uniform grid's error is the one measured
    flipped, rows = prepared.mirrored()
    weights, top = prepared.weights, levels(uniform.bits)
    uniform_codes = np.arange(-lowest(top), top + 1, dtype=np.float32)
    spread = LEVEL_CODE_LIMIT / float(lowest(top))  # the uniform grid spread over the integers the set may use
    codes = np.rint(uniform_codes * spread)
    step = (np.maximum(uniform.clip, 1e-12) / top / spread).astype(np.float32)
    fit = slice(None, None, max(1, rows.size // LEVEL_FIT_WEIGHTS))
    fit_rows, fit_weights, fit_step = rows[fit], None if weights is None else weights[fit], step[fit]
    for _ in range(LEVEL_FIT_ROUNDS):
        index = _nearest_code(fit_rows, fit_step, codes)
        mass = np.broadcast_to(fit_step[:, None] ** 2, fit_rows.shape)
        moment = fit_rows * fit_step[:, None]
        if fit_weights is not None:
            mass, moment = mass * fit_weights, moment * fit_weights
        total = np.bincount(index.ravel(), mass.ravel(), len(codes))
        centres = np.where(total > 0, np.bincount(index.ravel(), moment.ravel(), len(codes))
                           / np.maximum(total, 1e-30), codes)
        peak = float(np.abs(centres).max()) / LEVEL_CODE_LIMIT  # back onto the integers: the steps take the scale
        if not (np.isfinite(peak) and peak > 0):
            return None
        codes, fit_step, step = np.unique(np.rint(centres / peak)), fit_step * peak, step * peak
        fit_step = _least_squares_steps(fit_rows, fit_weights, codes[_nearest_code(fit_rows, fit_step, codes)],
                                        fit_step)
    integers, error = np.empty(rows.shape, np.int8), 0.0
    block = max(1, SEARCH_BLOCK // max(rows.shape[1], 1))  # rows at a time: the work arrays stay a few MB
    for start in range(0, len(rows), block):
        part = slice(start, start + block)
        part_weights = None if weights is None else weights[part]
        for _ in range(LEVEL_STEP_ROUNDS):
            chosen = codes[_nearest_code(rows[part], step[part], codes)]
            step[part] = _least_squares_steps(rows[part], part_weights, chosen, step[part])  # the error only falls
        squares = np.square(rows[part] - step[part, None] * chosen)
        error += float(squares.sum() if part_weights is None else np.einsum("ij,ij->", squares, part_weights))
        integers[part] = chosen
    relative = error / max(prepared.signal, 1e-30)
    if not relative < uniform.error:  # NaN included
        return None
    integers[flipped] *= -1
    return WidthChoice(uniform.bits, step * top, relative, integers, level_set=codes.astype(np.int8))


@dataclass
class QuantizedLayer:
    weight: np.ndarray | None  # on its grid, in the layer's own layout (None: written from `integers` alone)
    scale: np.ndarray  # per output channel, or [out, blocks]
    bias: np.ndarray | None  # corrected bias (new when the layer had none); None: leave it as it is
    integers: np.ndarray | None = None  # int8 [out, fan_in] (as_matrix's layout): weight = integers x scale


def quantize_layer(layer: Layer, weight: np.ndarray, bias: np.ndarray | None, choice: WidthChoice,
                   input_mean: np.ndarray | None, bias_correction: bool = True,
                   keep_integers: bool = False) -> QuantizedLayer:
    """A layer's weight on its k-bit grid, and the bias that cancels the expected output shift; keep_integers: its
    int8 integers too (QuantizedLayer.integers, for a layer written from them). A layer written from its integers
    with no bias to correct gets no float values (QuantizedLayer.weight None), and its integers are rounded a
    block of rows at a time: MiniLM-L6's embedding table took 47 MB of floats besides its int8 integers."""
    correcting = bias_correction and layer.bias_factor is not None and input_mean is not None
    if keep_integers and not correcting:
        if choice.integers is not None:
            codes = choice.integers.astype(np.int8)
            scale = grid_scale(choice.clip, choice.bits)
        else:
            codes, scale = grid_codes(as_matrix(layer, weight), choice.clip, choice.bits, choice.flipped)
        return QuantizedLayer(None, layer.kind.stored_scale(scale), None, codes)
    if choice.integers is not None:
        integers = choice.integers
        scale = grid_scale(choice.clip, choice.bits)
    else:
        integers, scale = grid_integers(as_matrix(layer, weight), choice.clip, choice.bits, choice.flipped)
    scale = layer.kind.stored_scale(scale)  # what the file holds: the simulation uses exactly it
    grid = steps(scale.astype(np.float32), integers.shape[1])
    codes = integers.astype(np.int8) if keep_integers else None
    if choice.integers is None:  # the integers rounded here become the values, in place
        matrix = np.multiply(integers, grid, out=integers).astype(np.float32, copy=False)
    else:
        matrix = (integers * grid).astype(np.float32, copy=False)
    quantized = from_matrix(layer, matrix)
    if not bias_correction or layer.bias_factor is None or input_mean is None:
        return QuantizedLayer(quantized, scale, None, codes)
    shift = bias_shift(layer, weight, quantized, input_mean) * layer.bias_factor
    if not np.any(shift):
        return QuantizedLayer(quantized, scale, None, codes)
    base = bias.astype(np.float32) if bias is not None else np.zeros_like(shift)
    return QuantizedLayer(quantized, scale, (base - shift).astype(np.float32), codes)


def bias_shift(layer: Layer, weight: np.ndarray, quantized: np.ndarray, input_mean: np.ndarray | None) -> np.ndarray:
    """Expected output shift E[(W_q - W) x] per output channel, to subtract from the bias."""
    delta = as_matrix(layer, quantized) - as_matrix(layer, weight)
    if input_mean is None:
        return np.zeros(delta.shape[0], np.float32)
    return (delta * input_weights(layer, input_mean)).sum(axis=1).astype(np.float32)
