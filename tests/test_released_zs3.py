"""The released ZS3 computations (REFERENCE.md 4.3), checked against this file's own transcription
of the equations: CLIP Surgery's ResNet attention pool, its feature surgery with class weights
from token 0, get_similarity_map, CS_Ours and "ours" with the image normalised after or before
the projector. Nothing here calls the library's arithmetic to build an expected value.

Backbones are random (no weights on these machines): a tiny-RN for most tests, RN-50 at 448 px
(14 x 14 grid, bilinear positional resize) once. With open_clip's initialisation the attention
pool's tokens hardly vary over the grid (RN-50's surgery tokens by ~2% of their norm), so the
per-class min-max stretches float32 rounding to ~1e-5; `varied` scales the pool's positional
embedding by 10, after which tokens vary by ~20% (as a trained CLIP's do) and the float32 library
meets the float64 transcription to ~2e-6. The references run in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.segmentation import (
    IMAGE_NORMS,
    feature_surgery,
    maps_from_tokens,
    method_text,
    normalise_minmax,
    normalised_maps,
    score_maps,
)
from pipeline.model.backbone import TINY_MODEL, load_backbone
from pipeline.model.heads import UnmixHead

POOL = "visual.attnpool."


# ---- the released equations, transcribed here (plain tensor ops on the state dict) ----

def pool_inputs(sd: dict, feat: torch.Tensor) -> torch.Tensor:
    """[mean; HW tokens] + positional embedding, its grid resized bilinearly as CLIP Surgery does."""
    b, c, h, w = feat.shape
    pos = sd[POOL + "positional_embedding"]  # (1+g*g, C)
    g = round((pos.shape[0] - 1) ** 0.5)
    if (h, w) != (g, g):
        grid = pos[1:].reshape(-1, g, g, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, (h, w), mode="bilinear")
        pos = torch.cat([pos[:1], grid.reshape(-1, c, h * w).transpose(1, 2)[0]])
    x = feat.reshape(b, c, h * w).permute(2, 0, 1)  # (HW, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1, B, C)
    return (x + pos[:, None, :]).transpose(0, 1)  # (B, 1+HW, C)


def released_pool(sd: dict, feat: torch.Tensor, heads: int) -> torch.Tensor:
    """CLIP Surgery's AttentionPool2d for ResNets: q = k = v from v_proj; the original path
    softmax(scale v v^T) v, the surgery path softmax(8 scale v' v'^T) v with v' = v / (|v| + 1e-6)
    per head; both through c_proj; token 0 from the original path -> (B, 1+HW, D)."""
    x = pool_inputs(sd, feat)
    b, n, c = x.shape
    wv, bv = sd[POOL + "v_proj.weight"], sd[POOL + "v_proj.bias"]
    qkv = F.linear(x, torch.cat([wv, wv, wv]), torch.cat([bv, bv, bv]))  # (B, N, 3C)
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # (B, h, N, C/h) each
    scale = (c // heads) ** -0.5
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    k = v / (v.norm(p=2, dim=-1, keepdim=True) + 1e-6)
    q = k
    attn = ((q @ k.transpose(-2, -1)) * (scale * 8)).softmax(dim=-1)
    x_ori = (attn_ori @ v).transpose(1, 2).reshape(b, n, c)
    x_new = (attn @ v).transpose(1, 2).reshape(b, n, c)
    proj_w, proj_b = sd[POOL + "c_proj.weight"], sd[POOL + "c_proj.bias"]
    x_new, x_ori = F.linear(x_new, proj_w, proj_b), F.linear(x_ori, proj_w, proj_b)
    x_new[:, 0, :] = x_ori[:, 0, :]
    return x_new


def released_surgery(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """clip_feature_surgery without redundant features, one image at a time (the released
    function's w.reshape(1, 1, n_t, 1) assumes a batch of one): (B, N, D), (C, D) -> (B, N, C)."""
    out = []
    for image in image_features.split(1):  # (1, N, D)
        prob = (image[:, :1, :] @ text_features.t() * 2).softmax(-1)
        w = prob / prob.mean(-1, keepdim=True)
        b, n_t, n_i, c = image.shape[0], text_features.shape[0], image.shape[1], image.shape[2]
        feats = image.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
        feats = feats * w.reshape(1, 1, n_t, 1)
        feats = feats - feats.mean(2, keepdim=True)
        out.append(feats.sum(-1))
    return torch.cat(out)


def similarity_map(sm: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """get_similarity_map: min-max over the tokens, reshape, bilinear upsampling -> (B, H, W, C)."""
    sm = (sm - sm.min(1, keepdim=True)[0]) / (sm.max(1, keepdim=True)[0] - sm.min(1, keepdim=True)[0])
    side = int(sm.shape[1] ** 0.5)
    sm = sm.reshape(sm.shape[0], side, side, -1).permute(0, 3, 1, 2)
    return F.interpolate(sm, shape, mode="bilinear").permute(0, 2, 3, 1)


def unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


def varied(backbone):
    """The backbone with its attention pool's positional embedding x 10 (see the module docstring)."""
    with torch.no_grad():
        backbone.model.visual.attnpool.positional_embedding.mul_(10.0)
    return backbone


def f64_state(backbone) -> dict:
    """The attention pool's weights in float64, keyed as in the model's state dict."""
    pool = backbone.model.visual.attnpool
    return {POOL + k: v.double() for k, v in pool.state_dict().items()}


def library_maps(maps: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The evaluation's normalised maps per image, (B, C, h, w) -> (B, H, W, C) like similarity_map."""
    return torch.stack([normalised_maps(m, shape) for m in maps]).permute(0, 2, 3, 1)


def layer4_of(backbone, images: torch.Tensor, paths: tuple[str, ...]) -> tuple[dict, torch.Tensor]:
    """The backbone's token paths and, from the same pass, its layer4 output (B, C, h, w)."""
    seen = []
    handle = backbone.model.visual.layer4.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        tokens = backbone.token_paths(images, paths)
    finally:
        handle.remove()
    return tokens, seen[0]


# ---- fixtures ----

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread in this module: on the 2 shared cores, 2 threads measured ~30x slower
    for the tiny-RN and ~3x slower for the RN-50 forward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return varied(load_backbone(TINY_MODEL, pretrained=None))


@pytest.fixture(scope="module")
def head(tiny):
    """A random projector head with non-trivial text BatchNorm statistics."""
    torch.manual_seed(3)
    projector = UnmixHead(tiny.embed_dim).eval()
    bn = projector.text_projector.net[1]
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)
    return projector


# ---- tests ----

def test_clip_surgery_on_rn50_at_448_equals_the_released_equations():
    """20 classes with random text features; the maps at a mask size the image is not."""
    torch.manual_seed(0)
    rn50 = varied(load_backbone("RN50", pretrained=None))
    images = torch.randn(1, 3, 448, 448)
    text = torch.randn(20, rn50.embed_dim)  # raw, as a text tower's output
    tokens, feat = layer4_of(rn50, images, ("surgery", "vv"))  # score_maps' one trunk pass
    assert feat.shape[-2:] == (14, 14)
    shape = (150, 210)
    maps = maps_from_tokens(tokens, None, {"clip-surgery": text, "clip-surgery-per-token": text})
    got = library_maps(maps["clip-surgery"], shape)  # (1, H, W, 20)

    expected_tokens = released_pool(f64_state(rn50), feat.double(), rn50.num_heads)  # (1, 197, 1024)
    torch.testing.assert_close(tokens["surgery"].double(), expected_tokens, atol=1e-5, rtol=1e-5)
    similarity = released_surgery(unit(expected_tokens), unit(text.double()))  # (1, 197, 20)
    expected = similarity_map(similarity[:, 1:, :], shape)
    assert (got - expected).abs().max() <= 1e-5

    per_token = library_maps(maps["clip-surgery-per-token"], shape)
    assert (per_token - got).abs().max() > 0.1  # the project's variant is another computation
    assert (per_token.argmax(-1) != got.argmax(-1)).float().mean() > 0.05


def test_feature_surgery_by_hand_three_classes():
    """D = 3, texts e1, e2, e3. Token 0 = (ln 2 / 2, 0, 0): softmax(2 s_0) = (2, 1, 1) / 4, so
    w = p / mean p = (1.5, 0.75, 0.75) for every token. Token n: w_c F_nc minus its class mean."""
    text = torch.eye(3)
    half_ln2 = 0.5 * torch.log(torch.tensor(2.0))
    tokens = torch.tensor([[[half_ln2.item(), 0.0, 0.0],
                            [1.0, 0.0, 0.0],    # w F = (1.5, 0, 0),      mean 0.5
                            [0.0, 2.0, 1.0],    # w F = (0, 1.5, 0.75),   mean 0.75
                            [2.0, 0.0, 4.0],    # w F = (3, 0, 3),        mean 2
                            [0.0, 0.0, 0.0]]])  # w F = 0
    expected = torch.tensor([[1.0, -0.5, -0.5],
                             [-0.75, 0.75, 0.0],
                             [1.0, -2.0, 1.0],
                             [0.0, 0.0, 0.0]])
    similarity = feature_surgery(tokens, text)  # (1, 5, 3)
    torch.testing.assert_close(similarity[0, 1:], expected)
    torch.testing.assert_close(similarity[0, 0], half_ln2 * torch.tensor([1.0, -0.5, -0.5]))
    # Per-class min-max over the 2 x 2 grid, tokens 1..4 row-major:
    #   class 0: (1, -0.75, 1, 0)    -> (1, 0, 1, 3/7)
    #   class 1: (-0.5, 0.75, -2, 0) -> (6/11, 1, 0, 8/11)
    #   class 2: (-0.5, 0, 1, 0)     -> (0, 1/3, 1, 1/3)
    grid = similarity[0, 1:].T.reshape(3, 2, 2)
    torch.testing.assert_close(normalise_minmax(grid), torch.tensor(
        [[[1, 0], [1, 3 / 7]], [[6 / 11, 1], [0, 8 / 11]], [[0, 1 / 3], [1, 1 / 3]]]))


def test_surgery_tokens_take_the_grid_from_the_surgery_path_and_token_0_from_the_original(tiny):
    images = torch.randn(2, 3, 160, 160)  # 5 x 5 grid: positional embedding resized from 7 x 7
    tokens, feat = layer4_of(tiny, images, ("surgery", "vv"))
    expected = released_pool(f64_state(tiny), feat.double(), tiny.num_heads)
    torch.testing.assert_close(tokens["surgery"].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(tiny.surgery_tokens(images), tokens["surgery"])
    assert (tokens["surgery"] - tokens["vv"]).abs().max() > 0.1  # not the paper's v-v path


@pytest.mark.parametrize("norm", IMAGE_NORMS)
def test_clip_surgery_plus_ours_equals_cs_ours_for_each_normalisation(tiny, head, norm):
    """CS_Ours: tokens normalised, image projector, not normalised after ("before", released); the
    paper's cosine normalises after the projector ("after"). Text: projector, then normalised."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 128, 128)  # 4 x 4 grid
    raw = torch.randn(6, tiny.embed_dim)
    texts = method_text(raw, head, ["clip-surgery+ours"], "batch")
    maps = score_maps(tiny, head, images, texts, cs_ours_norm=norm)["clip-surgery+ours"]
    shape = (37, 29)
    _, feat = layer4_of(tiny, images, ("surgery",))
    cs = released_pool(f64_state(tiny), feat.double(), tiny.num_heads)  # (2, 17, D)
    weight = head.image_projector.net.weight.detach().double()  # (D', D), no bias
    projected = unit(cs) @ weight.T if norm == "before" else unit(cs @ weight.T)
    with torch.no_grad():
        text = unit(head.text_projector(raw, "batch").double())
    expected = similarity_map(released_surgery(projected, text)[:, 1:, :], shape)
    assert (library_maps(maps, shape) - expected).abs().max() <= 1e-5
    other = score_maps(tiny, head, images, texts, cs_ours_norm={"before": "after", "after": "before"}[norm])
    assert (library_maps(other["clip-surgery+ours"], shape) - expected).abs().max() > 0.05


@pytest.mark.parametrize("norm", IMAGE_NORMS)
def test_ours_normalised_before_or_after_the_projector(tiny, head, norm):
    """"after": project the raw v-v tokens, normalise (VOC / Context scripts: a cosine); "before":
    normalise, project, no normalisation after (COCO script: a dot product)."""
    torch.manual_seed(2)
    images = torch.randn(2, 3, 128, 128)
    raw = torch.randn(5, tiny.embed_dim)
    texts = method_text(raw, head, ["ours"], "running")
    maps = score_maps(tiny, head, images, texts, ours_norm=norm)["ours"]  # (2, 5, 4, 4)
    vv = tiny.vv_tokens(images)[:, 1:].double()  # (2, 16, D)
    weight = head.image_projector.net.weight.detach().double()
    projected = unit(vv) @ weight.T if norm == "before" else unit(vv @ weight.T)
    with torch.no_grad():
        text = unit(head.text_projector(raw, "running").double())
    expected = (projected @ text.T).transpose(1, 2).reshape(2, 5, 4, 4)
    torch.testing.assert_close(maps.double(), expected, atol=1e-6, rtol=1e-5)
    if norm == "before":  # the per-token scale |h(f / |f|)| is not 1: not the cosine of "after"
        after = score_maps(tiny, head, images, texts, ours_norm="after")["ours"]
        assert (normalise_minmax(maps[0]) - normalise_minmax(after[0])).abs().max() > 0.05
