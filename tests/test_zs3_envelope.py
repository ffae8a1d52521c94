"""The CPU labels by row envelopes (pipeline/evaluation/label_envelope.py) are the whole stack's
(labels.stack_labels), bit for bit, at one and two threads, where the margins are tightest: exact
ties (duplicates, maxima shared on one token, few levels), near-ties of one ulp, thresholds at the
maps' own values, source rows that fall exactly on a token row; and each part checked on its own:
ATen's weights and the error bound, the packed ATen values, the kernel conditions.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation import label_envelope, label_settle
from pipeline.evaluation import labels as labels_module
from pipeline.evaluation.label_geometry import EXACT, Rows, aten_weights, same_kernel
from pipeline.evaluation.labels import labels, stack_labels
from pipeline.evaluation.segmentation import normalise_minmax


def _maps(kind: str, num: int, grid: tuple[int, int], seed: int) -> torch.Tensor:
    """Normalised maps (num, h, w) in [0, 1], as the evaluation passes them."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    if kind == "smooth":  # CLIP-like: low-rank token x text similarities
        scores = torch.randn(num, 6, generator=g) @ torch.randn(6, h * w, generator=g)
    elif kind == "noise":  # random-weight backbones: every class swings from token to token
        scores = torch.rand(num, h * w, generator=g)
    elif kind == "levels":  # few levels: exact ties everywhere, thresholds at node values
        scores = torch.randint(0, 5, (num, h * w), generator=g).float()
    else:  # "shared": duplicates, a constant class, several maxima of exactly 1 on one token
        scores = torch.rand(num, h * w, generator=g)
        scores[1] = scores[0]
        scores[2] = 0.3
        scores[3:num // 2, 0] = 10.0
    return normalise_minmax(scores.view(num, h, w))


GEOMETRIES = [((4, 4), (444, 640)),  # 444 / 4 = 111: rows 55, 166, ... sample a token row exactly
              ((14, 14), (427, 640)), ((4, 4), (480, 640)), ((7, 5), (97, 131)), ((2, 3), (300, 90))]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["smooth", "noise", "levels", "shared"])
@pytest.mark.parametrize("grid,size", GEOMETRIES)
def test_envelope_labels_are_the_stack_labels_bit_for_bit(threads, kind, grid, size):
    maps = _maps(kind, 40, grid, seed=grid[0] + size[0])
    assert label_envelope.envelope_labels(maps, size, None, 0.5) is not None  # not the fallback
    for rule, threshold in ((None, 0.85), ("max-score", 0.75), ("max-score", 0.5), ("softmax", 0.85)):
        expected = stack_labels(maps, size, rule, threshold)
        got = labels(maps, size, rule, threshold)
        assert torch.equal(got[0], expected[0]), (rule, threshold)
        assert (got[1] is None) == (expected[1] is None)
        if expected[1] is not None:
            assert torch.equal(got[1], expected[1]), (rule, threshold)


def test_eighty_classes_at_evaluation_sizes(threads):
    for grid, kind in (((4, 4), "noise"), ((14, 14), "smooth"), ((14, 14), "shared")):
        maps = _maps(kind, 80, grid, seed=7)
        for rule in (None, "max-score"):
            expected = stack_labels(maps, (480, 640), rule, 0.85)
            got = labels(maps, (480, 640), rule, 0.85)
            assert torch.equal(got[0], expected[0]) and (rule is None or torch.equal(got[1], expected[1]))


def test_near_ties_and_the_threshold_are_settled_by_aten(monkeypatch):
    """Two classes one float32 ulp apart everywhere, and a threshold equal to a map value: inside
    every margin, so ATen's values decide, and they are the stack's."""
    maps = _maps("smooth", 6, (5, 5), seed=1)
    maps[1] = torch.nextafter(maps[0], torch.tensor(2.0)).clamp_max(1.0)
    threshold = float(F.interpolate(maps[None], size=(200, 260), mode="bilinear",
                                    align_corners=False)[0].amax(dim=0)[100, 100])
    settled = []
    original = label_settle._aten_at
    monkeypatch.setattr(label_settle, "_aten_at", lambda *a: settled.append(len(a[3])) or original(*a))
    expected = stack_labels(maps, (200, 260), "max-score", threshold)
    got = labels(maps, (200, 260), "max-score", threshold)
    assert settled and settled[0] > 100
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_source_coordinate_just_below_an_integer_reads_the_next_token(threads):
    """3 tokens to 355 pixels: column 177's source coordinate is 1 - 2e-16 in float64 but 1 + 1.2e-7
    in ATen's float32, which reads tokens 1 and 2 there; two classes equal on tokens 0 and 1 differ
    on token 2 (found by a review: the packed map lacked token 2)."""
    maps = normalise_minmax(torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
                                          [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]))
    for m, size in ((maps, (5, 355)), (maps.transpose(1, 2).contiguous(), (355, 60))):
        assert label_envelope.envelope_labels(m, size, None, 0.0) is not None
        for rule in (None, "max-score", "softmax"):
            expected = stack_labels(m, size, rule, 0.5)
            got = labels(m, size, rule, 0.5)
            assert torch.equal(got[0], expected[0]), (size, rule)
            assert rule is None or torch.equal(got[1], expected[1])


@pytest.mark.parametrize("grid,size", GEOMETRIES[:3])
def test_lines_are_aten_within_the_bound(threads, grid, size):
    """The bound every decision rests on: a line's value (ATen's weights, float64) is within EXACT
    of ATen's float32 output, on noise maps (the largest swings between tokens)."""
    maps = _maps("noise", 30, grid, seed=3)
    rows = Rows(maps, size, aten_weights(grid, size))
    stack = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    lines = rows.a[:, None, :] + rows.b[:, None, :] * rows.u_grid[:, :, None]  # (E, width, C)
    values = torch.stack([rows.to_image(lines[..., c]) for c in range(30)])
    error = (values - stack.double()).abs()[:, rows.robust]
    assert float(error.max()) <= EXACT / 2  # twice as much room as the worst case seen


def test_packed_aten_values_are_the_whole_stack_values(threads):
    """Several classes share one input map where their tokens do not overlap; every value read back
    is the whole stack's bit for bit, at source rows exactly on a token row too."""
    maps = _maps("noise", 25, (4, 4), seed=5)
    size = (444, 640)
    rows = Rows(maps, size, aten_weights((4, 4), size))
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.randint(0, size[0], (300,), generator=g), torch.randint(0, size[1], (300,), generator=g)
    ys[:40] = 55  # a row sampling token row 0 exactly: ATen's indices there are not trusted
    wanted = torch.rand(300, 25, generator=g) < 0.3
    got = label_settle._aten_at(maps, size, rows, ys, xs, wanted)
    stack = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    assert torch.equal(got[wanted], stack[:, ys, xs].T[wanted])


def test_the_envelope_steps_aside_where_aten_runs_another_kernel():
    assert not same_kernel(3, (4, 4), (480, 640)) or torch.get_num_threads() > 1
    assert not same_kernel(10, (4, 4), (60, 60))  # H + W <= 128: ATen's channels-last kernel
    assert not same_kernel(10, (1, 1), (480, 640)) and not same_kernel(10, (14, 14), (10, 640))
    assert aten_weights((14, 14), (10, 640)) is None  # no upsampling on rows
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        maps = _maps("shared", 3, (4, 4), seed=2)
        assert label_envelope.envelope_labels(maps, (480, 640), None, 0.5) is None
        assert torch.equal(labels(maps, (480, 640), None, 0.5)[0], stack_labels(maps, (480, 640), None, 0.5)[0])
    finally:
        torch.set_num_threads(before)


def test_maps_outside_the_unit_range_take_the_stack(monkeypatch):
    """The error bound assumes values in [0, 1]: other maps never reach the envelope."""
    maps = _maps("smooth", 5, (4, 4), seed=0) * 2.0
    calls = []
    original = label_envelope.envelope_labels
    monkeypatch.setattr(labels_module, "envelope_labels", lambda *a: calls.append(1) or original(*a))
    assert torch.equal(labels(maps, (200, 200), None, 0.5)[0], stack_labels(maps, (200, 200), None, 0.5)[0])
    assert not calls
    labels(maps / 2.0, (200, 200), None, 0.5)
    assert calls


def test_random_geometries_and_maps_agree_with_the_stack(threads):
    """Grids of 2 to 16 tokens, masks of 20 to 800 pixels, odd multiples of the grid (source rows
    exactly on token rows), 4 to 27 classes, every kind of map: identical labels everywhere."""
    g = torch.Generator().manual_seed(threads)
    kinds = ["noise", "levels", "smooth", "shared"]
    used = 0
    for case in range(24):
        h, w = (int(v) for v in torch.randint(2, 17, (2,), generator=g))
        height, width = (int(v) for v in torch.randint(20, 500, (2,), generator=g))
        if case % 4:  # rows long enough for the envelope (the others take the stack)
            width += label_envelope.MIN_PIXELS_PER_CELL * (w + 1)
        if case % 3 == 0:
            height = h * (2 * int(torch.randint(1, 16, (1,), generator=g)) + 1)
        maps = _maps(kinds[case % 4], 4 + case, (h, w), seed=case)
        used += label_envelope.envelope_labels(maps, (height, width), None, 0.5) is not None
        for rule, threshold in ((None, 0.5), ("max-score", 0.5), ("max-score", 0.75)):
            expected = stack_labels(maps, (height, width), rule, threshold)
            got = labels(maps, (height, width), rule, threshold)
            assert torch.equal(got[0], expected[0]), (case, h, w, height, width, rule)
            assert rule is None or torch.equal(got[1], expected[1]), (case, h, w, height, width, rule)
    assert used >= 15  # most cases run the envelope, not its fallback
