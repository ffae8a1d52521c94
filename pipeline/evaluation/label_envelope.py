"""ZS3 labels on a CPU without upsampling every class: the exact argmax of the bilinear maps, row by
row, and the reference's own values wherever that cannot decide.

The reference (labels.stack_labels) upsamples all C normalised maps to the mask (bilinear,
align_corners=False) and takes the argmax (and max) over the classes at every pixel. On one pixel
row inside one cell of the token grid, every class's upsampled value is a line in the horizontal
weight u: a_c + b_c u. The argmax along the row is the upper envelope of C lines, found by walking
from line to steeper line (a few steps per row) instead of C values at every pixel.

Identical labels, given how ATen computes (label_settle._aten_at says what that rests on). The
lines use ATen's own weights, read off its output (label_geometry.aten_weights), so ATen's float32
value differs from the line's by at most EXACT (a few roundings). A pixel is decided only where its
winner leads every other class by more than twice that (and a max-score threshold by more than
that): ATen's argmax and comparison must agree. The rest (near-ties, exact ties, values at the
threshold, pixels whose source coordinate is too close to an integer to know ATen's indices) take
ATen's own values (label_settle).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.evaluation.label_geometry import EXACT, Rows, aten_weights, same_kernel
from pipeline.evaluation.label_settle import settle

# Below this many pixels per cell along a row the stack is as fast (bench: 80 classes at 480 x 640,
# 16 pixels per cell (40 x 40 grid) 0.91-0.99x the stack, 22 (28 x 28) 1.35-1.57x, 43 (14 x 14) 2.6-4.9x)
MIN_PIXELS_PER_CELL = 18


def _envelope(rows: Rows, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Walk each row's upper envelope from its first pixel to its last: per envelope and step, the
    step's first u, its winner, and the u interval where the winner leads every other line by more
    than 2 tol. (E, K) each, K the most steps of any row; padding steps start at +inf."""
    a, b, classes = _contenders(rows, tol)
    e = a.shape[0]
    u = rows.u_first
    winner = (a + b * u[:, None]).argmax(dim=1)
    starts: list[tuple[Tensor, Tensor]] = []
    winners: list[tuple[Tensor, Tensor]] = []
    lows: list[tuple[Tensor, Tensor]] = []
    highs: list[tuple[Tensor, Tensor]] = []
    alive = torch.arange(e)
    while alive.numel():
        aa, bb = a[alive], b[alive]
        w = winner[alive]
        da = aa.gather(1, w[:, None]) - aa  # gap to every line at u = 0 ...
        db = bb.gather(1, w[:, None]) - bb  # ... and its slope
        steeper = db < 0
        cross = torch.where(steeper, da / -db, torch.inf)  # where a steeper line overtakes
        nxt, nw = cross.min(dim=1)
        r = (2.0 * tol - da) / db  # gap = 2 tol here: below before it (db > 0) or after it (db < 0)
        low = torch.where(db > 0, r, -torch.inf).amax(dim=1)
        high = torch.where(steeper, r, torch.inf).amin(dim=1)
        parallel = ((db == 0) & (da <= 2.0 * tol)).sum(dim=1) > 1  # the winner itself is one
        low = torch.where(parallel, torch.inf, low)
        for found, value in zip((starts, winners, lows, highs), (u[alive], w, low, high)):
            found.append((alive, value))
        u = u.clone()
        u[alive] = torch.maximum(nxt, u[alive])
        winner = winner.clone()
        winner[alive] = nw
        alive = alive[nxt <= rows.u_last[alive]]
    out = []
    for found, fill in zip((starts, winners, lows, highs), (torch.inf, 0, torch.inf, -torch.inf)):
        table = torch.full((e, len(found)), fill, dtype=found[0][1].dtype)
        for k, (where, value) in enumerate(found):
            table[where, k] = value
        out.append(table)
    return out[0], classes.gather(1, out[1]), out[2], out[3]


def _contenders(rows: Rows, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per envelope, only the lines that reach within 2 tol of the best at some pixel (a line's
    extremes are at the row's ends), in class order, padded with lines far below: (a, b, class),
    (E, K) each, K the most any row keeps."""
    a, b = rows.a, rows.b
    first = a + b * rows.u_first[:, None]
    last = a + b * rows.u_last[:, None]
    keep = torch.maximum(first, last) >= torch.minimum(first, last).amax(dim=1, keepdim=True) - 2.0 * tol
    k = int(keep.sum(dim=1).max())
    if 2 * k > a.shape[1]:  # too few to drop to pay for the compaction
        return a, b, torch.arange(a.shape[1]).expand_as(a)
    classes = keep.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :k]
    kept = keep.gather(1, classes)
    return (torch.where(kept, a.gather(1, classes), -4.0), torch.where(kept, b.gather(1, classes), 0.0),
            classes)


def envelope_labels(normalised: Tensor, size: tuple[int, int], rule: str | None,
                    threshold: float) -> tuple[Tensor, Tensor | None] | None:
    """labels.stack_labels' results (identical) for CPU maps (C, h, w) in [0, 1], rule none or
    max-score (softmax sums every class: labels.py keeps the stack for it); None where the
    reference runs another ATen kernel or its weights cannot be read (label_geometry), and where
    the rows are too short for the walk to pay (MIN_PIXELS_PER_CELL)."""
    c, h, w = normalised.shape
    if not same_kernel(c, (h, w), size) or size[1] < MIN_PIXELS_PER_CELL * (w + 1):
        return None
    weights = aten_weights((h, w), size)
    if weights is None:
        return None
    tol = EXACT
    rows = Rows(normalised, size, weights)
    starts, winners, lows, highs = _envelope(rows, tol)
    step = (torch.searchsorted(starts, rows.u_grid, right=True) - 1).clamp_min(0)  # (E, width)
    u = rows.u_grid
    label_grid = winners.gather(1, step)
    doubtful = ~rows.robust  # ATen's indices unknown there: settled with the looser tolerance
    undecided = rows.to_image(~((lows.gather(1, step) < u) & (u < highs.gather(1, step)))) | doubtful
    label = rows.to_image(label_grid)
    background = None
    thr = float(torch.tensor(threshold, dtype=torch.float32))  # what the reference compares with
    if rule not in (None, "none"):
        best = rows.a.gather(1, label_grid) + rows.b.gather(1, label_grid) * u
        background = rows.to_image(best < thr)
        undecided |= rows.to_image((best - thr).abs() <= tol)
    if bool(undecided.any()):
        settle(normalised, size, rows, undecided, label, background, tol, thr)
    return label, background


