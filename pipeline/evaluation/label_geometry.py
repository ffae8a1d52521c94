"""Where the ZS3 labels' upsampling reads: ATen's bilinear weights and source indices for one map
size and mask size, and every pixel row of every token-grid cell as a set of lines (one per class).

Used by label_envelope (the argmax along each row) and label_settle (ATen's own values where the
argmax is too close to call). Everything is float64 holding ATen's float32 weights, so a value here
is ATen's up to its own roundings (EXACT)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

_F32_EPS = 2.0 ** -24  # float32 unit roundoff
# |ATen - value here| with ATen's own weights: at most six roundings of numbers <= 1 (two products
# and a sum per level, FMA or not), and the lines' 1 - w1 in place of w0 (off by <= 4 ulps,
# checked); twice that.
EXACT = 2.0 * 10.0 * _F32_EPS


def same_kernel(c: int, hw: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether the reference's call F.interpolate((1, C, h, w) -> size) runs ATen's generic bilinear
    kernel, as a batch (k, 1, h, w) of the same maps does. ATen's CPU dispatch switches to its
    channels-last kernel for outputs with H + W <= 128, for C == 3 on one thread, and for inputs
    that are channels-last contiguous (1 x 1 maps); it also needs upsampling here (`aten_weights`)."""
    return (sum(size) > 128 and not (c == 3 and torch.get_num_threads() == 1)
            and min(hw) >= 2 and size[0] > hw[0] and size[1] > hw[1])


@functools.lru_cache(maxsize=64)
def aten_weights(hw: tuple[int, int], size: tuple[int, int]) -> tuple[Tensor, ...] | None:
    """ATen's interpolation weights of this geometry, read off its own output: (on the first source
    row, on the second) per output row, then the same per output column, float64 holding float32.

    Bilinear weights depend on the sizes and the output index alone. Maps that are 1 on every
    other source column give, on output row 0 (vertical weights 1 and 0 there: source coordinate
    clamped at 0 when upsampling), each column's weight on its even or its odd source column, exactly;
    likewise rows on output column 0. None when that does not hold (no upsampling, or weights that
    are not ATen's bilinear ones within `tolerance`): the caller uses the reference."""
    (h, w), (height, width) = hw, size
    if height <= h or width <= w or h < 2 or w < 2:
        return None
    probe = torch.zeros(4, 1, h, w)
    probe[0, 0, :, 0::2] = 1.0
    probe[1, 0, :, 1::2] = 1.0
    probe[2, 0, 0::2, :] = 1.0
    probe[3, 0, 1::2, :] = 1.0
    out = F.interpolate(probe, size=size, mode="bilinear", align_corners=False)[:, 0].double()
    weights = []
    for parity, (i0, i1, exact) in ((out[0:2, 0, :], _axis(w, width)), (out[2:4, :, 0], _axis(h, height))):
        w0 = parity[i0 % 2, torch.arange(len(i0))]
        w1 = torch.where(i1 == i0, 0.0, parity[i1 % 2, torch.arange(len(i0))])
        if ((w0 + w1 - 1.0).abs().max() > 4 * _F32_EPS
                or (torch.where(i1 == i0, 0.0, exact) - w1).abs().max() > tolerance(max(h, w))):
            return None
        weights += [w0, w1]
    return weights[2], weights[3], weights[0], weights[1]


def tolerance(cells: int) -> float:
    """Bound on |float32 bilinear - exact bilinear| for values in [0, 1] on axes of at most `cells`
    token positions. Per axis, the source coordinate (at most `cells`) goes through three roundings,
    which move the weight, and so the value, by 3 ulps of `cells`; two products and a sum add 3 ulps
    of 1. Twice the sum over both axes."""
    return 2.0 * 2.0 * 3.0 * _F32_EPS * (cells + 2)


def _source(n_in: int, n_out: int) -> Tensor:
    """Each output pixel's exact (float64) align_corners=False source coordinate, before clamping."""
    return (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5


def _axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact (float64) align_corners=False geometry of one axis: both source indices and the
    weight of the second, per output pixel."""
    src = _source(n_in, n_out).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0, i1, src - i0


def _cells(i0: Tensor, i1: Tensor) -> tuple[Tensor, Tensor]:
    """Runs of pixels sharing their two source columns: (cell of each pixel, first pixel of each)."""
    new = torch.ones(i0.numel(), dtype=torch.bool)
    new[1:] = (i0[1:] != i0[:-1]) | (i1[1:] != i1[:-1])
    return new.cumsum(0) - 1, new.nonzero()[:, 0]


def _sources(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per output pixel of one axis: the source indices ATen's value depends on (both, or twice
    the one whose weight is 1: clamped at either end; twice the nearest integer where doubtful); a
    group id, pixels with equal indices, or -1 (doubtful) where the float32 source coordinate may
    fall on the other side of an integer; and a key equal for pixels ATen computes identically
    (clamped at 0: weights exactly 1 and 0), else the pixel."""
    src = _source(n_in, n_out)
    i0 = src.floor().long().clamp(0, n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    margin = 16.0 * _F32_EPS * (n_in + 1)  # > the float32 source coordinate's error, 3 roundings
    low, high = src < -margin, src > n_in - 1 + margin
    i0 = torch.where(high, n_in - 1, i0)
    i1 = torch.where(low, 0, torch.where(high, n_in - 1, i1))
    frac = src - src.floor()
    robust = low | high | ((frac > margin) & (frac < 1.0 - margin))
    group = torch.where(robust, i0 * n_in + i1, -1)
    nearest = src.round().long().clamp(0, n_in - 1)  # doubtful: ATen reads two of nearest - 1 .. + 1
    i0, i1 = torch.where(robust, i0, nearest), torch.where(robust, i1, nearest)
    return torch.stack([i0, i1]), group, torch.where(low, -1, torch.arange(n_out))


class Rows:
    """Every pixel row of every cell as a set of C lines over the row's pixels, with ATen's own
    interpolation weights (`aten_weights`)."""

    def __init__(self, maps: Tensor, size: tuple[int, int], weights: tuple[Tensor, ...]) -> None:
        c, h, w = maps.shape
        y0, y1, _ = _axis(h, size[0])
        x0, x1, _ = _axis(w, size[1])
        wy0, wy1, _, wx1 = weights  # the lines use 1 - wx1 for wx0: within 4 ulps (aten_weights)
        self.u = wx1  # the weight of a cell's right column: lines are a + b u, off by < EXACT
        self.cell, first = _cells(x0, x1)
        self.n_cells = len(first)
        self.offset = torch.arange(size[1]) - first[self.cell]  # pixel's place in its cell
        self.width = int(self.offset.max()) + 1
        x = maps.float().double()  # what the reference upsamples
        v = (x[:, y0] * wy0[:, None] + x[:, y1] * wy1[:, None]).permute(1, 2, 0)  # (H, w, C): token columns
        left, right = v[:, x0[first]], v[:, x1[first]]  # (H, cells, C)
        self.a = left.reshape(-1, c)  # (E, C): value at u = 0 ...
        self.b = (right - left).reshape(-1, c)  # ... and slope in u, one row of one cell each
        self.sources = (_sources(h, size[0]), _sources(w, size[1]))
        self.robust = (self.sources[0][1] >= 0)[:, None] & (self.sources[1][1] >= 0)[None, :]  # (H, W)
        self.same = (self.sources[0][2], self.sources[1][2])  # pixels with equal keys: equal values
        last = torch.cat([first[1:] - 1, torch.tensor([size[1] - 1])])
        n = size[0]
        self.u_first = self.u[first].repeat(n)  # (E,)
        self.u_last = self.u[last].repeat(n)
        # the pixels of each envelope as a (E, width) grid of u, padded with the cell's last u
        pos = torch.minimum(first[:, None] + torch.arange(self.width), last[:, None])  # (cells, width)
        self.u_grid = self.u[pos].repeat(n, 1)
        self.size = size

    def to_image(self, grid: Tensor) -> Tensor:
        """(E, width) per-envelope values -> (H, W) image."""
        per_row = grid.view(self.size[0], self.n_cells * self.width)
        return per_row[:, self.cell * self.width + self.offset]


