"""Views: eval view = resize + CLIP normalisation; train views reproducible from their seed."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pipeline.data.augment import (
    CLIP_MEAN,
    CLIP_STD,
    apply_cutout,
    eval_pil_view,
    eval_view,
    train_pil_view,
    train_view,
    view_seed,
)

SIZE = 64


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_eval_view_is_bicubic_resize_then_clip_normalisation(image):
    view = eval_view(image, SIZE)
    assert view.shape == (3, SIZE, SIZE) and view.dtype == torch.float32
    resized = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float32) / 255
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    expected = (resized - mean) / std  # (S, S, 3)
    np.testing.assert_allclose(view.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert torch.equal(view, eval_view(image, SIZE))


@pytest.mark.parametrize("size", [SIZE, 37, 448])  # 50 x 70 source: mixed, down, up
def test_bilinear_eval_view_is_pils_bilinear_resize_bit_for_bit(image, size):
    """The authors' MLR evaluation view: torchvision Resize((S, S)) with its default (bilinear)
    interpolation on a PIL image, which is PIL's Image.resize(..., BILINEAR)."""
    pil = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))  # (S, S, 3) uint8
    assert np.array_equal(np.asarray(eval_pil_view(image, size, "bilinear")), pil)
    authors = transforms.Resize((size, size))(image)  # torchvision's default interpolation
    assert np.array_equal(np.asarray(authors), pil)
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    expected = (pil.astype(np.float32) / 255 - mean) / std
    view = eval_view(image, size, "bilinear")
    np.testing.assert_allclose(view.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert not torch.equal(view, eval_view(image, size))  # the default stays bicubic


def test_train_view_recomputed_from_its_seed_is_bit_identical(image):
    seed = view_seed(7, 3, 1)
    first = train_view(image, SIZE, seed)
    torch.manual_seed(12345)  # the global RNG state must not matter ...
    np.random.seed(6789)
    assert torch.equal(first, train_view(image, SIZE, seed))
    before = torch.get_rng_state()
    train_view(image, SIZE, seed)
    assert torch.equal(before, torch.get_rng_state())  # ... nor be disturbed


def test_train_view_is_bit_identical_in_a_fresh_process(image, tmp_path):
    path = tmp_path / "img.png"
    image.save(path)
    code = ("import hashlib, sys; from PIL import Image;"
            "from pipeline.data.augment import train_view, view_seed;"
            f"t = train_view(Image.open(r'{path}'), {SIZE}, view_seed(7, 3, 1));"
            "print(view_seed(7, 3, 1), hashlib.sha256(t.numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seed, digest = out.stdout.split()
    assert int(seed) == view_seed(7, 3, 1)
    assert digest == _digest(train_view(image, SIZE, view_seed(7, 3, 1)))


def test_different_seeds_give_different_views(image):
    seeds = [view_seed(0, 0, v) for v in range(4)] + [view_seed(0, 1, 0), view_seed(1, 0, 0)]
    assert len(set(seeds)) == len(seeds)
    digests = {_digest(train_view(image, SIZE, s)) for s in seeds}
    assert len(digests) == len(seeds)


@pytest.mark.parametrize("seed", range(20))
def test_cutout_paints_one_constant_box_of_half_the_side_clipped_at_borders(image, seed):
    before = np.asarray(image)  # (H, W, 3), 70 x 50
    after_img, (x0, y0, x1, y1), colour = apply_cutout(image, np.random.default_rng(seed))
    after = np.asarray(after_img)
    inside = np.zeros(before.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    assert (after[inside] == colour).all()  # one constant colour over the box
    assert np.array_equal(after[~inside], before[~inside])  # nothing else touched
    # A box of half the side (35 x 25) around a centre inside the image: clipping keeps >= half.
    assert 17 <= x1 - x0 <= 35 and 12 <= y1 - y0 <= 25
    assert 0 <= x0 < x1 <= 70 and 0 <= y0 < y1 <= 50


def test_train_view_without_cutout_and_ops_is_the_eval_view(image):
    assert torch.equal(train_view(image, SIZE, 0, cutout=False, num_ops=0), eval_view(image, SIZE))


def test_train_view_cutout_region_survives_to_the_output(image):
    """With RandAugment off, the unnormalised view holds a filled constant box >= S/4 a side."""
    for seed in range(5):
        pixels = np.asarray(train_pil_view(image, SIZE, seed, num_ops=0))  # (S, S, 3)
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        box = (pixels == colours[counts.argmax()]).all(2)  # random-noise pixels almost never repeat
        rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
        assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # a filled rectangle
        assert len(rows) >= SIZE // 4 and len(cols) >= SIZE // 4


# -- augmentation as run (docs/METHOD.md "Training as released") ----------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_inclusive_cutout_is_pils_rectangle_one_row_and_column_larger(image, seed):
    """The authors' Cutout is ImageDraw.rectangle([x0, y0, x1, y1]), which paints its far edge."""
    from PIL import ImageDraw

    width, height = image.size
    draw = np.random.default_rng(seed)  # the draws apply_cutout makes, replayed independently
    cx, cy = int(draw.integers(width)), int(draw.integers(height))
    colour = tuple(int(c) for c in draw.integers(0, 256, size=3))
    half_w, half_h = int(0.5 * width + 0.5) // 2, int(0.5 * height + 0.5) // 2
    x0, x1 = np.clip([cx - half_w, cx + half_w], 0, width)
    y0, y1 = np.clip([cy - half_h, cy + half_h], 0, height)
    expected = image.copy()
    ImageDraw.Draw(expected).rectangle([int(x0), int(y0), int(x1), int(y1)], fill=colour)

    inclusive, box_in, _ = apply_cutout(image, np.random.default_rng(seed), inclusive=True)
    exclusive, box_ex, _ = apply_cutout(image, np.random.default_rng(seed), inclusive=False)
    assert np.array_equal(np.asarray(inclusive), np.asarray(expected))
    painted = (np.asarray(inclusive) != np.asarray(exclusive)).any(2)  # (H, W) the extra pixels
    assert np.array_equal(np.asarray(exclusive)[~painted], np.asarray(inclusive)[~painted])
    extra_cols, extra_rows = int(x1 < width), int(y1 < height)  # nothing to add past the border
    assert box_in[2] - box_in[0] == box_ex[2] - box_ex[0] + extra_cols
    assert box_in[3] - box_in[1] == box_ex[3] - box_ex[1] + extra_rows
    box_w, box_h = box_ex[2] - box_ex[0], box_ex[3] - box_ex[1]
    assert painted.sum() == extra_cols * box_h + extra_rows * box_w + extra_cols * extra_rows


def test_package_randaugment_views_are_reproducible_in_a_fresh_process_and_differ(image, tmp_path):
    import random

    path = tmp_path / "img.png"
    image.save(path)
    kw = "randaugment='package', interpolation='bilinear', cutout_inclusive=True"
    code = ("import hashlib; from PIL import Image; from pipeline.data.augment import train_view, view_seed;"
            f"print(*[hashlib.sha256(train_view(Image.open(r'{path}'), {SIZE}, view_seed(7, 3, v), {kw})"
            ".numpy().tobytes()).hexdigest() for v in range(4)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kwargs = {"randaugment": "package", "interpolation": "bilinear", "cutout_inclusive": True}
    random.seed(11)
    np.random.seed(12)
    py_state, np_state = random.getstate(), np.random.get_state()
    here = [_digest(train_view(image, SIZE, view_seed(7, 3, v), **kwargs)) for v in range(4)]
    assert out.stdout.split() == here  # same bits in another process
    assert len(set(here)) == 4  # and a different view each
    assert random.getstate() == py_state  # the global RNGs are restored ...
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert "int" not in np.__dict__  # ... and NumPy's removed alias is not left behind
    # without Cutout the ops alone change the view (each of the two applies with p 0.5)
    plain = _digest(train_view(image, SIZE, 0, cutout=False, num_ops=0, interpolation="bilinear"))
    ops = {_digest(train_view(image, SIZE, view_seed(7, 3, v), cutout=False, randaugment="package"))
           for v in range(6)}
    assert len(ops - {plain}) >= 3


def test_training_view_interpolation_is_the_named_resize(image):
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    for name, pil in (("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC)):
        view = train_view(image, SIZE, 0, cutout=False, num_ops=0, interpolation=name)  # (3, S, S)
        resized = np.asarray(image.resize((SIZE, SIZE), pil), np.float32) / 255
        np.testing.assert_allclose(view.permute(1, 2, 0).numpy(), (resized - mean) / std, atol=1e-6)
    with pytest.raises(ValueError, match="interpolation"):
        train_view(image, SIZE, 0, interpolation="nearest")


def test_every_augment_param_reaches_the_view_and_the_store_fingerprint():
    import inspect

    from pipeline.config.schema import Augment
    from pipeline.extraction.engine import DEFAULT_AUGMENT

    assert set(DEFAULT_AUGMENT) == set(Augment.model_fields)  # each param key has a default ...
    assert set(DEFAULT_AUGMENT) <= set(inspect.signature(train_view).parameters)  # ... and is used
