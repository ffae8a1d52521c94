"""`segment` / `query` keep the photo's aspect ratio (resize "keep"): the view's size follows
mmsegmentation's keep-ratio rule, the attention pool's positional embedding is interpolated to the
non-square token grid exactly as hand-written interpolation does, the non-square maps are per-token
computations, and "square" is the implementation it replaces."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_world import CLASSES, SIZE, TEMPLATE, world  # noqa: F401  (session fixture)

from pipeline.api.unmix import UnmixCLIP
from pipeline.config.params import ParamError
from pipeline.data.augment import eval_view
from pipeline.data.dense_view import MAX_ASPECT, dense_view, keep_ratio_size
from pipeline.evaluation.segment_maps import (
    label_map,
    method_maps,
    normalised_maps,
    token_paths_for,
)
from pipeline.model.attention_pool import resize_positional_embedding

METHODS = ("clip", "clip-vv", "clip-surgery", "clip-surgery+ours", "ours")


# ---- independent references ---------------------------------------------------------------

def _bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of align_corners=False linear interpolation (edge-clamped)."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = math.floor(src)
        frac = src - i0
        w[i, min(i0, n_in - 1)] += 1.0 - frac
        w[i, min(i0 + 1, n_in - 1)] += frac
    return w


def _bicubic_1d(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) weights of Keys' cubic convolution (a = -0.75), align_corners=False, indices
    clamped at the borders."""
    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(src)
        t = src - i0
        for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            w[i, min(max(i0 + offset, 0), n_in - 1)] += weight
    return w


def _hand_resized(pos: np.ndarray, native: int, size: tuple[int, int], mode: str) -> np.ndarray:
    """(1+g*g, C) -> (1+h*w, C): row 0 kept, the g x g grid resized separably (rows, then columns)."""
    weights = _bilinear_1d if mode == "bilinear" else _bicubic_1d
    grid = pos[1:].reshape(native, native, -1)  # (g, g, C)
    rows = np.einsum("hg,gkc->hkc", weights(native, size[0]), grid)  # (h, g, C)
    both = np.einsum("wk,hkc->hwc", weights(native, size[1]), rows)  # (h, w, C)
    return np.concatenate([pos[:1], both.reshape(-1, pos.shape[1])])


# ---- the view and the positional embedding ----------------------------------------------

@pytest.mark.parametrize("width, height, size, expected", [
    (640, 480, 224, (224, 320)),  # 4:3: long side 298.7 -> 299, up to the next multiple of 32
    (90, 150, 128, (224, 128)),  # portrait: 213.3 -> 213 -> 224 rows
    (300, 300, 224, (224, 224)),  # square: the square view
    (1000, 100, 128, (64, 512)),  # panorama: the long side capped at 4 x 128, the short one 51 -> 64
])
def test_keep_ratio_size_is_mmsegmentations_keep_ratio_rescale_to_multiples_of_the_stride(
        width, height, size, expected):
    assert keep_ratio_size(width, height, size, 32) == expected


def test_keep_ratio_views_keep_the_aspect_ratio_within_a_stride():
    rng = np.random.default_rng(0)
    for _ in range(200):
        width, height = (int(v) for v in rng.integers(20, 3000, size=2))
        rows, cols = keep_ratio_size(width, height, 224, 32)
        assert rows % 32 == 0 and cols % 32 == 0
        factor = min(224 / min(width, height), MAX_ASPECT * 224 / max(width, height))
        assert -0.5 <= rows - height * factor < 32 + 0.5 and -0.5 <= cols - width * factor < 32 + 0.5
        assert max(rows, cols) <= MAX_ASPECT * 224 + 32


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(5, 9), (12, 4), (7, 7), (3, 7)])
def test_positional_embedding_on_a_non_square_grid_is_hand_written_interpolation(mode, size):
    native = 7
    pos = torch.randn(1 + native * native, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    resized = resize_positional_embedding(pos, size, mode)
    assert resized.shape == (1 + size[0] * size[1], 16)
    np.testing.assert_allclose(resized.numpy(), _hand_resized(pos.numpy(), native, size, mode),
                               rtol=0, atol=1e-12)


def test_a_portrait_views_tokens_are_the_pool_on_an_h_by_w_grid(world):
    """The backbone's v-proj tokens of a portrait view: c_proj(v_proj(x + pos)) with the trunk's
    (h, w) feature map and the hand-interpolated embedding (bicubic, DualCoOp's)."""
    backbone = world["backbone"]
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 90, 3), dtype=np.uint8))
    view = dense_view(picture, SIZE, backbone.stride)  # (3, 224, 128)
    assert view.shape == (3, 224, 128)
    tokens = backbone.token_paths(view[None], ("vproj",))["vproj"]  # (1, 1+7*4, D)
    feat = backbone._trunk_eager(view[None])  # (1, C, 7, 4)
    assert feat.shape[-2:] == (7, 4) and tokens.shape[1] == 1 + 28
    pool = backbone.model.visual.attnpool
    native = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
    pos = _hand_resized(pool.positional_embedding.double().numpy(), native, (7, 4), "bicubic")
    x = feat.flatten(2).transpose(1, 2)[0].double()  # (28, C)
    x = torch.cat([x.mean(0, keepdim=True), x]) + torch.from_numpy(pos)  # (1+28, C)
    expected = pool.c_proj.double()(pool.v_proj.double()(x))
    pool.float()
    torch.testing.assert_close(tokens[0].double(), expected, atol=1e-4, rtol=1e-4)


# ---- maps on a non-square grid --------------------------------------------------------------

def test_non_square_maps_are_per_token_cosines_and_surgery(world):
    """method_maps on an (h, w) grid equals the methods written per token: cosine (clip-vv), the
    projected dot product (ours) and feature surgery weighted from token 0 (clip-surgery)."""
    backbone, head = world["backbone"], world["head"]
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (96, 200, 3), dtype=np.uint8))
    view = dense_view(picture, SIZE, backbone.stride)[None]  # (1, 3, 128, 288)
    grid = (view.shape[2] // 32, view.shape[3] // 32)
    tokens = backbone.token_paths(view, token_paths_for(METHODS))
    raw = backbone.text_features([TEMPLATE.format(c) for c in CLASSES[:3]])  # (3, D)
    projected = head.project_text(raw, stats="running")
    maps = method_maps(tokens, head, raw, projected, METHODS, grid=grid)
    h, w = grid

    def on_grid(per_token: torch.Tensor) -> torch.Tensor:  # (hw, C) -> (C, h, w), row-major
        return per_token.t().reshape(-1, h, w)

    vv = F.normalize(tokens["vv"][0, 1:], dim=-1)
    torch.testing.assert_close(maps["clip-vv"][0], on_grid(vv @ F.normalize(raw, dim=-1).t()))
    ours = head.project_tokens(tokens["vv"][0, 1:]) @ projected.t()
    torch.testing.assert_close(maps["ours"][0], on_grid(ours), atol=1e-5, rtol=1e-5)
    f = F.normalize(tokens["surgery"][0], dim=-1)  # (1+hw, D)
    t = F.normalize(raw, dim=-1)
    prob = (2 * f[0] @ t.t()).softmax(-1)  # (C,) from token 0
    weighted = (prob / prob.mean()) * (f[1:] @ t.t())  # (hw, C)
    torch.testing.assert_close(maps["clip-surgery"][0], on_grid(weighted - weighted.mean(-1, keepdim=True)),
                               atol=1e-5, rtol=1e-5)


# ---- the API ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(world):
    return UnmixCLIP.from_files(world["projectors"], checkpoint=world["checkpoint"], device="cpu",
                                image_size=SIZE, batch_size=5)


def _pictures(world) -> dict[str, Image.Image]:
    """Planted test images side by side (landscape), stacked (portrait) and alone (square)."""
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in world["files"][:4]]
    return {"portrait": Image.fromarray(np.concatenate(arrays[:2], axis=0)),  # (192, 96)
            "landscape": Image.fromarray(np.concatenate(arrays[2:4], axis=1)),  # (96, 192)
            "square": Image.fromarray(arrays[0])}


def test_a_portrait_photos_label_map_has_its_size_from_a_non_square_grid(world, model):
    pictures = _pictures(world)
    result = model.segment([pictures["portrait"], pictures["landscape"]], CLASSES[:3], template=TEMPLATE)
    assert result.resize == "keep" and model.describe()["resize"] == "keep"
    assert result.input_sizes == [(256, 128), (128, 256)]  # short side SIZE, 2:1 kept
    assert result.label_maps[0].shape == (192, 96) and result.label_maps[1].shape == (96, 192)
    assert result.summary(0)["resize"] == "keep" and result.summary(0)["input_size"] == [256, 128]
    # clip-vv by hand: per-token cosine on the (8, 4) grid, min-max, bilinear to the photo's size
    backbone = model.backbone
    tokens = backbone.token_paths(dense_view(pictures["portrait"], SIZE, 32)[None], ("vv",))["vv"]
    text = model.text_features(CLASSES[:3], TEMPLATE).raw
    cos = (F.normalize(tokens[0, 1:], dim=-1) @ F.normalize(text, dim=-1).t()).t().reshape(3, 8, 4)
    low = cos.flatten(1).min(1).values[:, None, None]
    high = cos.flatten(1).max(1).values[:, None, None]
    expected = F.interpolate(((cos - low) / (high - low))[None], size=(192, 96), mode="bilinear",
                             align_corners=False)[0]
    again = model.segment(pictures["portrait"], CLASSES[:3], template=TEMPLATE, methods=("clip-vv",))
    np.testing.assert_allclose(again.method_score_maps["clip-vv"][0], expected.numpy(), rtol=0, atol=1e-5)


def test_keep_on_a_square_photo_is_the_square_view(world, model):
    files = world["files"][:6]  # 96 x 96: both views are SIZE x SIZE, one batch of 5 and one of 1
    keep = model.segment(files, CLASSES[:3], template=TEMPLATE, methods=METHODS)
    square = model.segment(files, CLASSES[:3], template=TEMPLATE, methods=METHODS, resize="square")
    assert keep.input_sizes == square.input_sizes == [(SIZE, SIZE)] * 6
    np.testing.assert_array_equal(keep.image_scores, square.image_scores)
    for m in METHODS:
        for a, b in zip(keep.method_score_maps[m], square.method_score_maps[m]):
            np.testing.assert_array_equal(a, b)


def test_square_is_the_implementation_it_replaces(world, model):
    """resize "square" on photos of three shapes: one batch of eval_view squares, exactly as the
    API computed before "keep" existed (commit 32cf06d's segment loop, inlined)."""
    pictures = list(_pictures(world).values())
    result = model.segment(pictures, CLASSES[:3], template=TEMPLATE, methods=METHODS, resize="square",
                           background="max-score", threshold=0.6)
    text = model.text_features(CLASSES[:3], TEMPLATE)
    inputs = torch.stack([eval_view(p, SIZE, model.interpolation) for p in pictures])
    tokens = model.backbone.token_paths(inputs, token_paths_for(METHODS), model.pos_interpolation)
    maps = method_maps(tokens, model.head, text.raw, text.projected, METHODS)
    for j, picture in enumerate(pictures):
        for m in METHODS:
            n = normalised_maps(maps[m][j], (picture.height, picture.width))
            np.testing.assert_array_equal(result.method_score_maps[m][j], n.numpy())
            np.testing.assert_array_equal(result.method_label_maps[m][j],
                                          label_map(n, "max-score", 0.6).to(torch.uint8).numpy())


def test_photos_of_several_shapes_in_one_call_are_each_alone(world, model):
    """Views are batched per shape: the order of the results is the order of the images."""
    p = _pictures(world)
    mixed = [p["portrait"], p["square"], p["landscape"], p["portrait"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    together = model.segment(mixed, CLASSES[:3], template=TEMPLATE)
    for j, picture in enumerate(mixed):
        alone = model.segment(picture, CLASSES[:3], template=TEMPLATE)
        np.testing.assert_allclose(together.score_maps[j], alone.score_maps[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(together.image_scores[j], alone.image_scores[0], rtol=0, atol=1e-5)
    with pytest.raises(ParamError, match="call image_tokens once per shape"):
        model.image_tokens([p["portrait"], p["landscape"]])
    assert model.image_tokens([p["portrait"]]).grid == (8, 4)
    with pytest.raises(ParamError, match="resize must be one of keep, square"):
        model.segment(p["square"], CLASSES[:3], resize="squash")
