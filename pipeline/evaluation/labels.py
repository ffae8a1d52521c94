"""Pixel labels from one image's low-resolution score maps, without the (C, H, W) stack, and
identical to the reference (segmentation.predict / label_with_background on normalised_maps).

The reference upsamples every class's min-max-normalised map to the mask's size (bilinear,
align_corners=False) and reduces over the C classes per pixel: C x H x W values (24.6M for 80
COCO classes on a 480 x 640 mask) read three times (max, argmax, softmax) for H x W labels.
Here, on a CPU:
1. The output is cut into tiles (at most TILE x TILE pixels, each within one cell: the pixels
   that share the same four source nodes). On a tile the bilinear interpolant is bilinear, so
   each class's extremes there are at the tile's corners: class c can only win where its
   largest corner value reaches the largest smallest corner value of all classes. Only those
   candidates (a few of the C) are upsampled on the tile, by this module's own float32
   arithmetic with ATen's source indices and weights (`_axis`). Classes equal on every node a
   tile reads tie exactly in the reference too: only the first of them is kept.
2. That arithmetic is within `_eps` of F.interpolate's (the kernel's operation order and FMA
   contraction are not known), so every decision whose margin exceeds the bound is the
   reference's. The rest (near-ties between classes, values near the threshold) are decided on
   F.interpolate's own values of the classes involved (`exact_planes`), so the labels are
   bit-identical, ties included (the first class wins, as torch's argmax).
3. The softmax rule sums over every class: the sum is taken over the tile's classes within TAU
   of the top (the rest add less than e^-100 TAU each) on these values, and pixels within its
   error bound of the threshold get the reference's own computation: the exact stack (once per
   image, only then) and torch's softmax over all classes, in full vector lanes.
Caveat shared with the reference: torch's softmax takes a scalar path for a few pixels at the
edges of each thread's share, whose exp may differ from the vector one by an ulp; there the
reference itself depends on the thread count, and this module follows the vector path.
On another device (CUDA) the reference computation runs there once for both label spaces,
everything staying on the device (`device_labels`).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

TAU = 0.3  # softmax rule: classes further below the top add < e^-30 each to the sum
SOFTMAX_SCALE = 100.0  # segmentation.SOFTMAX_SCALE (GEM)
TILE = 16  # output pixels per tile side: bounds per tile, candidates per tile
_PAD = 64  # softmax recomputation: pixels padded to full vector lanes of every thread's share


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for a block of cpu_labels calls: their hundreds of small operations per
    image lose more to OpenMP regions than they gain (on a shared 2-core host, a region waiting
    for a descheduled thread made them 3x slower than the reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eps(h: int, w: int) -> float:
    """Bound on |this module's bilinear value - F.interpolate's| for node values in [0, 1]: a few
    roundings of each (~4 u), and an ulp of the source coordinate (< max(h, w)) if ATen computes
    it with another contraction (the value's slope along it is at most 1)."""
    return 8 * 2.0**-24 * (1 + max(h, w))


@functools.lru_cache(maxsize=512)
def _axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One axis of F.interpolate(bilinear, align_corners=False) as ATen computes it in float32
    (the source coordinate scale (x + 1/2) - 1/2 rounded once): source indices i0, i1 (int64)
    and weights w0, w1 (float32) per output index."""
    if n_in == n_out:
        i = torch.arange(n_out)
        return i, i, torch.ones(n_out), torch.zeros(n_out)
    scale = (torch.tensor(n_in, dtype=torch.float32) / n_out).double()
    src = (scale * (torch.arange(n_out, dtype=torch.float64) + 0.5) - 0.5).float().clamp_min(0.0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    w1 = (src - i0).clamp(0.0, 1.0)
    i1 = i0 + (i0 < n_in - 1).long()
    return i0, i1, 1.0 - w1, w1


def _single(n_in: int, n_out: int) -> Tensor:
    """Per output index, whether it reads one source node only in ATen whatever the rounding of
    its coordinate: clamped at the near end (weight 0 on the second node), at the far end (both
    indices the last node), or a copy; decided with a margin on the exact coordinate."""
    if n_in in (1, n_out):
        return torch.ones(n_out, dtype=torch.bool)
    src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    return (src <= -1e-4) | (src >= n_in - 1 + 1e-4)


@functools.lru_cache(maxsize=512)
def _tiles(n_in: int, n_out: int, tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tiles of at most `tile` output indices along one axis, each within one run of equal source
    nodes and `_single` flag (so the interpolant is bilinear on a tile and takes its extremes at
    the tile's corners): (first and last index (N, 2), indices (N, tile) clamped to the tile,
    its last one repeated, single flag (N,))."""
    single = _single(n_in, n_out)
    _, counts = torch.unique_consecutive(_axis(n_in, n_out)[0] * 2 + single, return_counts=True)
    spans = []
    for count, stop in zip(counts.tolist(), counts.cumsum(0).tolist()):
        spans += [(a, min(a + tile, stop)) for a in range(stop - count, stop, tile)]
    bounds = torch.tensor(spans)  # (N, 2): [first, stop)
    steps = torch.minimum(bounds[:, :1] + torch.arange(tile), bounds[:, 1:] - 1)  # (N, tile)
    return torch.stack([bounds[:, 0], bounds[:, 1] - 1], dim=1), steps, single[bounds[:, 0]]


def _row_groups(key: Tensor) -> Tensor:
    """Group id of every row of `key` (P, K) int64, equal rows sharing one: a lexicographic sort by
    stable sorts column by column (torch.unique(dim=0) compares row pairs one call at a time)."""
    order = torch.arange(len(key))
    for column in reversed(range(key.shape[1])):
        order = order[torch.sort(key[order, column], stable=True).indices]
    ordered = key[order]
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), (ordered[1:] != ordered[:-1]).any(dim=1).long()])
    group = torch.empty_like(order)
    group[order] = starts.cumsum(0)
    return group


def exact_planes(normalised: Tensor, classes: Tensor, size: tuple[int, int]) -> Tensor:
    """F.interpolate's own upsampled maps (K, H, W) of `classes` (K,), from the very call the
    reference makes (all C classes at once): ATen picks its kernel and vector lanes by the channel
    count and thread count (3 of 80 classes at one thread differ from the whole stack by an ulp),
    so only the same call gives the same values."""
    return F.interpolate(normalised[None], size=size, mode="bilinear", align_corners=False)[0][classes]


def _softmax_best(stack: Tensor, pixels: Tensor) -> Tensor:
    """max_c softmax_c(100 n) at flat `pixels` (P,) of the exact stack (C, H, W), by torch's own
    softmax over the class axis as the reference runs it, the pixels padded to full lanes."""
    values = stack.flatten(1)[:, pixels]  # (C, P)
    lanes = _PAD * max(1, torch.get_num_threads())
    pad = -values.shape[1] % lanes
    if pad:
        values = torch.cat([values, values[:, :1].expand(-1, pad)], dim=1)
    return (SOFTMAX_SCALE * values).softmax(dim=0).max(dim=0).values[: pixels.numel()]


def cpu_labels(normalised: Tensor, size: tuple[int, int], rule: str | None,
               threshold: float) -> tuple[Tensor, Tensor | None]:
    """Normalised maps (C, h, w) on the CPU -> (argmax over classes (H, W) int64 in 0..C-1,
    background (H, W) bool by `rule` "softmax" | "max-score", or None for "none" / None), equal
    to the reference's labels (module docstring)."""
    n = normalised.float().contiguous()
    num, h, w = n.shape
    height, width = size
    eps = _eps(h, w)
    y0, y1, wy0, wy1 = _axis(h, height)
    x0, x1, wx0, wx1 = _axis(w, width)
    rows = n[:, :, x0] * wx0 + n[:, :, x1] * wx1  # (C, h, W): along x on every node row
    ends_y, ys, single_y = _tiles(h, height, TILE)  # (R, 2), (R, t), (R,)
    ends_x, xs, single_x = _tiles(w, width, TILE)  # (Q, 2), (Q, t), (Q,)
    num_q = len(xs)
    # every class at every tile corner: (C, R, 2, Q, 2) -> bounds per tile (C, R, Q)
    corner = (rows[:, y0[ends_y]][..., ends_x] * wy0[ends_y][:, :, None, None]
              + rows[:, y1[ends_y]][..., ends_x] * wy1[ends_y][:, :, None, None])
    low, high = corner.amin(dim=(2, 4)), corner.amax(dim=(2, 4))
    softmax = rule == "softmax"
    cand = high >= low.amax(dim=0) - (TAU if softmax else 2 * eps)  # (C, R, Q)
    r, q, c = cand.permute(1, 2, 0).nonzero().unbind(1)  # (P,) each: tile by tile, classes ascending
    ry, qx = y0[ys[r, 0]], x0[xs[q, 0]]  # (P,) the tile's first source node row / column
    if not softmax:  # classes equal on every node a tile reads tie exactly: the first one stands
        ry1 = torch.where(single_y[r], ry, y1[ys[r, 0]])
        qx1 = torch.where(single_x[q], qx, x1[xs[q, 0]])
        nodes = torch.stack([n[c, ry, qx], n[c, ry, qx1], n[c, ry1, qx], n[c, ry1, qx1]], dim=1)
        key = torch.cat([(r * num_q + q)[:, None], nodes.view(torch.int32).long()], dim=1)
        group = _row_groups(key)
        first = torch.full((int(group.max()) + 1,), num).scatter_reduce_(0, group, c, "amin")
        keep = c == first[group]
        r, q, c, ry = r[keep], q[keep], c[keep], ry[keep]
    tile = r * num_q + q  # (P,) ascending
    counts = torch.bincount(tile)
    starts = counts.cumsum(0) - counts
    label_map = torch.empty(height * width, dtype=torch.int64)
    best_map = torch.empty(height * width)
    unsure: list[Tensor] = []  # flat pixels whose decision is not certain
    involved: list[Tensor] = [c[:0]]  # classes those decisions need exact values of
    rho = 300 * eps + 1e-5  # softmax rule: > the relative error of the pruned, approximate sum
    for k in torch.unique(counts[counts > 0]).tolist():  # tiles with k candidates, all at once
        tiles = (counts == k).nonzero().flatten()  # (N,)
        pairs = starts[tiles, None] + torch.arange(k)  # (N, k)
        cls = c[pairs]  # (N, k) ascending per tile
        yy, xx = ys[r[pairs[:, 0]]], xs[q[pairs[:, 0]]]  # (N, t) each
        # a tile's rows share their two source node rows: interpolate along y between them
        top = rows[cls[:, :, None], ry[pairs[:, 0], None, None], xx[:, None, :]]  # (N, k, t)
        bottom = rows[cls[:, :, None], y1[yy[:, :1]][:, :, None], xx[:, None, :]]
        v = (top[:, :, None, :] * wy0[yy][:, None, :, None]
             + bottom[:, :, None, :] * wy1[yy][:, None, :, None])  # (N, k, t, t) within eps
        best, arg = v.max(dim=1)  # (N, t, t): the first of equal maxima, as torch.argmax
        pixels = (yy[:, :, None] * width + xx[:, None, :]).flatten()  # (N t t,) flat, repeats equal
        label_map[pixels] = cls.gather(1, arg.flatten(1)).flatten()
        near = v >= best[:, None] - 2 * eps  # (N, k, t, t): within the error of the top
        doubt = near.sum(dim=1) > 1 if k > 1 else torch.zeros_like(best, dtype=torch.bool)
        if softmax:  # max_c softmax_c = 1 / sum_c exp(100 (n_c - max n)), up to rho
            best = 1.0 / (SOFTMAX_SCALE * v - SOFTMAX_SCALE * best[:, None]).exp().sum(dim=1)
            doubt |= (best - threshold).abs() <= rho * threshold
        elif rule == "max-score":
            doubt |= (best - threshold).abs() <= eps
        if doubt.any() and not softmax:
            involved.append(cls[(near & doubt[:, None]).flatten(2).any(dim=2)])
        best_map[pixels] = best.flatten()
        unsure.append(pixels[doubt.flatten()])
    doubtful = torch.unique(torch.cat(unsure))
    if len(doubtful) and softmax:  # the exact stack, as the reference: class and softmax there
        stack = F.interpolate(n[None], size=size, mode="bilinear", align_corners=False)[0]
        label_map[doubtful] = stack.flatten(1)[:, doubtful].argmax(dim=0)
        best_map[doubtful] = _softmax_best(stack, doubtful)
    elif len(doubtful):
        classes = torch.unique(torch.cat(involved))  # ascending
        values = exact_planes(n, classes, size).flatten(1)[:, doubtful]  # (K, U) exact
        top_value, arg = values.max(dim=0)
        label_map[doubtful] = classes[arg]
        best_map[doubtful] = top_value
    label_map = label_map.view(height, width)
    if rule in (None, "none"):
        return label_map, None
    return label_map, best_map.view(height, width) < threshold


def device_labels(normalised: Tensor, size: tuple[int, int], rule: str | None,
                  threshold: float) -> tuple[Tensor, Tensor | None]:
    """cpu_labels' contract by the reference's own computation, on the maps' device (CUDA): the
    stack made once for both label spaces; nothing leaves the device."""
    stack = F.interpolate(normalised[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    label = stack.argmax(dim=0)
    if rule in (None, "none"):
        return label, None
    best, _ = stack.max(dim=0)
    if rule == "softmax":
        best = (SOFTMAX_SCALE * stack).softmax(dim=0).max(dim=0).values
    return label, best < threshold


def labels(normalised: Tensor, size: tuple[int, int], rule: str | None,
           threshold: float) -> tuple[Tensor, Tensor | None]:
    """Normalised maps (C, h, w) -> (argmax over the classes (H, W) int64, background mask (H, W)
    bool by `rule`, None for "none" / None) on the maps' device; rule assumed valid."""
    if normalised.device.type == "cpu":
        return cpu_labels(normalised, size, rule, threshold)
    return device_labels(normalised, size, rule, threshold)
