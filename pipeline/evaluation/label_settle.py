"""The reference's own results at the pixels the envelope cannot decide: ATen's values of the few
classes within the margin there, from one small F.interpolate call (label_envelope explains the
margin)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.evaluation.label_geometry import Rows, tolerance


def settle(maps: Tensor, size: tuple[int, int], rows: Rows, undecided: Tensor, label: Tensor,
           background: Tensor | None, tol: float, threshold: float) -> None:
    """The reference's label (and background, when given: max-score against `threshold`, a float32
    value) at the undecided pixels, written in place.

    Only classes within twice the error bound of the best can be ATen's argmax there; the bound is
    `tol` where ATen's indices are known (rows.robust), `tolerance` elsewhere. Of classes whose inputs
    at the pixel are equal, ATen gives equal values and argmax the smallest index
    (`_first_of_equals`): where that leaves one class, and the best value is clear of the threshold,
    the pixel is settled without ATen. The rest take ATen's values (`_aten_at`)."""
    all_ys, all_xs = undecided.nonzero(as_tuple=True)
    key = (rows.same[0][all_ys] + 1) * (size[1] + 1) + rows.same[1][all_xs] + 1
    keys, copy = torch.unique(key, return_inverse=True)  # one pixel per key: ATen's values are equal
    one = _smallest(copy, torch.arange(len(key)), len(keys))
    ys, xs = all_ys[one], all_xs[one]
    own_label, own_background = _settle_pixels(maps, size, rows, ys, xs, tol, threshold,
                                               background is not None)
    label[all_ys, all_xs] = own_label[copy]
    if background is not None and own_background is not None:
        background[all_ys, all_xs] = own_background[copy]


def _settle_pixels(maps: Tensor, size: tuple[int, int], rows: Rows, ys: Tensor, xs: Tensor, tol: float,
                   threshold: float, with_background: bool) -> tuple[Tensor, Tensor | None]:
    """settle's labels (and background) at these pixels."""
    env = ys * rows.n_cells + rows.cell[xs]
    exact = rows.a[env] + rows.b[env] * rows.u[xs][:, None]  # (n, C)
    bound = torch.where(rows.robust[ys, xs], tol, tolerance(max(maps.shape[1:])))
    best = exact.amax(dim=1)
    near = exact >= (best - 2.0 * bound)[:, None]
    first = _first_of_equals(maps, rows, ys, xs)  # (n, C)
    c = maps.shape[0]
    low = torch.where(near, first, c).amin(dim=1)
    alone = low == torch.where(near, first, -1).amax(dim=1)
    label, background = low, None
    if with_background:
        alone &= (best - threshold).abs() > bound
        background = best < threshold
    rest = ~alone
    if bool(rest.any()):
        wanted = near[rest] & (first[rest] == torch.arange(c))
        values = torch.where(wanted, _aten_at(maps, size, rows, ys[rest], xs[rest], wanted), -torch.inf)
        top, pick = values.max(dim=1)  # the first of equal maxima, as the reference's argmax
        label = label.clone()
        label[rest] = pick
        if background is not None:
            background[rest] = top < threshold
    return label, background


def _first_of_equals(maps: Tensor, rows: Rows, ys: Tensor, xs: Tensor) -> Tensor:
    """(n, C): per pixel and class, the smallest class whose inputs at the pixel (those with a
    nonzero weight) are bit for bit the class's own; the class itself where the pixel's source
    coordinate is too close to an integer to know ATen's indices."""
    (iy, gy, _), (ix, gx, _) = rows.sources
    c = maps.shape[0]
    own = torch.arange(c)
    robust = (gy[ys] >= 0) & (gx[xs] >= 0)
    cell = torch.where(robust, gy[ys] * (int(gx.max()) + 1) + gx[xs], -1)  # pixels sharing inputs
    cells, at = torch.unique(cell, return_inverse=True)
    one = _smallest(at, torch.arange(len(ys)), len(cells))
    y, x = ys[one], xs[one]  # one pixel of each cell
    quad = torch.stack([maps[:, iy[0, y], ix[0, x]], maps[:, iy[0, y], ix[1, x]],
                        maps[:, iy[1, y], ix[0, x]], maps[:, iy[1, y], ix[1, x]]], dim=-1)  # (C, cells, 4)
    bits = quad.float().contiguous().view(torch.int32).permute(1, 0, 2).long()  # (cells, C, 4)
    keys = torch.cat([torch.arange(len(cells)).repeat_interleave(c)[:, None], bits.reshape(-1, 4)], dim=1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    cls = own.repeat(len(cells))
    first = _smallest(group, cls, int(group.max()) + 1)[group].view(-1, c)
    first[cells < 0] = own
    return first[at]


def _smallest(group: Tensor, values: Tensor, groups: int) -> Tensor:
    """(groups,): the smallest of `values` (non-negative int64) in each group; groups are 0 .. groups - 1,
    every one present."""
    return torch.full((groups,), int(values.max()) + 1, dtype=torch.long).scatter_reduce(0, group, values, "amin")


def _aten_at(maps: Tensor, size: tuple[int, int], rows: Rows, ys: Tensor, xs: Tensor,
             wanted: Tensor) -> Tensor:
    """(n, C) float32: ATen's upsampled value of each wanted class at each pixel (others arbitrary),
    as in the reference's call on the whole stack.

    That call runs ATen's generic bilinear kernel (label_geometry.same_kernel), which computes each
    output from the inputs at its cell's corners and weights that depend on the sizes and the output
    index alone; a batch (k, 1, h, w) runs the same kernel. So one input map can carry several
    classes, each on the tokens its pixels read, where those tokens do not overlap: a few maps
    instead of one per class."""
    c, h, w = maps.shape
    (iy, gy, _), (ix, gx, _) = rows.sources
    # the tokens a pixel reads: its cell's, or where ATen's indices are unsure (a source coordinate
    # within float32 error of an integer k) k - 1 .. k + 1
    y_lo = torch.where(gy[ys] >= 0, iy[0, ys], (iy[0, ys] - 1).clamp_min(0))
    y_hi = torch.where(gy[ys] >= 0, iy[1, ys], (iy[0, ys] + 1).clamp_max(h - 1))
    x_lo = torch.where(gx[xs] >= 0, ix[0, xs], (ix[0, xs] - 1).clamp_min(0))
    x_hi = torch.where(gx[xs] >= 0, ix[1, xs], (ix[0, xs] + 1).clamp_max(w - 1))
    pixel, cls = wanted.nonzero(as_tuple=True)
    step = torch.arange(3)
    ty = torch.minimum(y_lo[pixel][:, None] + step, y_hi[pixel][:, None])  # (pairs, 3), repeats allowed
    tx = torch.minimum(x_lo[pixel][:, None] + step, x_hi[pixel][:, None])
    tokens = torch.zeros(c * h * w, dtype=torch.bool)
    tokens[((cls[:, None] * h + ty)[:, :, None] * w + tx[:, None, :]).reshape(-1)] = True
    tokens = tokens.view(c, h, w)
    channel = torch.zeros(c, dtype=torch.long)
    taken: list[Tensor] = []
    for k in wanted.any(dim=0).nonzero()[:, 0].tolist():  # first fit, in class order
        free = [i for i, used in enumerate(taken) if not bool((used & tokens[k]).any())]
        if not free:
            taken.append(torch.zeros(h, w, dtype=torch.bool))
            free = [len(taken) - 1]
        taken[free[0]] |= tokens[k]
        channel[k] = free[0]
    values = maps.float()
    packed = torch.zeros(len(taken), h, w)
    for k in wanted.any(dim=0).nonzero()[:, 0].tolist():
        packed[channel[k]] += torch.where(tokens[k], values[k], 0.0)  # disjoint: the sum is a copy
    out = F.interpolate(packed[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return out[:, ys, xs][channel].T
