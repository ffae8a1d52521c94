"""Dense tokens of a CLIP ViT (model/vit.py, model/vit_tokens.py), checked against open_clip's own
forward and against the published equations written out here with plain tensor ops.

Random weights only (nothing can be downloaded): the tiny ViT of model_configs/tiny-ViT.json with
every bias and LayerNorm randomised (open_clip initialises them to 0 / 1, which would hide a
missing bias or a swapped LayerNorm), and open_clip's real ViT-B-16 architecture once.
"""
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.backbone import FrozenCLIP, create_clip
from pipeline.model.vit import TINY_VIT, FrozenViT, frozen_backbone, load_any_backbone, load_vit
from pipeline.model.vit_tokens import VIT_METHODS, positional_embedding, vit_config_refusal
from pipeline.model.weights import WeightsError, sha256_file

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


def randomise(visual: nn.Module, seed: int) -> None:
    """Biases ~ N(0, 0.1), LayerNorm weights ~ 1 + N(0, 0.1), attention projections x2 (sharper
    attention, so q-k, q-q and v-v attention differ clearly)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in visual.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(noise * 0.1)
            elif ".ln_" in name or name.startswith("ln_"):
                p.copy_(1 + noise * 0.1)
            elif name.endswith("in_proj_weight"):
                p.mul_(2)


@pytest.fixture(scope="module")
def tiny():
    backbone = load_vit(TINY_VIT, pretrained=None)
    randomise(backbone.model.visual, seed=1)
    return backbone


# ---- independent reference computations --------------------------------------------------------

def open_clip_forward(visual, images, pos=None):
    """open_clip's own VisionTransformer.forward with output_tokens, every block's input recorded by
    forward pre-hooks; `pos` replaces the positional embedding for the call (other input sizes).
    Returns (pooled (B, D), ln_post'd patch tokens (B, hw, C), [block inputs (B, T, C)])."""
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
             for b in visual.transformer.resblocks]
    saved = visual.positional_embedding, visual.output_tokens
    if pos is not None:
        visual.positional_embedding = nn.Parameter(pos, requires_grad=False)
    visual.output_tokens = True
    try:
        with torch.no_grad():
            pooled, tokens = visual(images)
    finally:
        visual.positional_embedding, visual.output_tokens = saved
        for h in hooks:
            h.remove()
    return pooled, tokens, inputs


def layer_norm(ln, x):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def head(visual, x):
    """ln_post then proj, written out: (B, T, C) -> (B, T, D)."""
    return layer_norm(visual.ln_post, x) @ visual.proj


def projections(block, y):
    """q, k, v from the block's in_proj_weight / in_proj_bias rows [q; k; v]."""
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    c = y.shape[-1]
    return [y @ w[i * c:(i + 1) * c].t() + b[i * c:(i + 1) * c] for i in range(3)]


def einsum_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d_head)) v per head, with einsum."""
    b, t, c = q.shape
    d = c // heads
    qh, kh, vh = (z.reshape(b, t, heads, d) for z in (q, k, v))
    weights = (torch.einsum("bqhd,bkhd->bhqk", qh, kh) * d ** -0.5).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, vh).reshape(b, t, c)


def out_proj(block, z):
    return z @ block.attn.out_proj.weight.t() + block.attn.out_proj.bias


def reference_tokens(visual, images, pos=None):
    """Every method's tokens (B, 1+hw, D) from the published equations (REFERENCE.md 4.4)."""
    pooled, patch, inputs = open_clip_forward(visual, images, pos)
    blocks = visual.transformer.resblocks
    heads = blocks[-1].attn.num_heads
    last, x = blocks[-1], inputs[-1]
    with torch.no_grad():
        q, _, v = projections(last, layer_norm(last.ln_1, x))
        ref = {"qk": torch.cat([pooled[:, None], patch @ visual.proj], dim=1),
               "maskclip": head(visual, out_proj(last, v)),
               "clearclip": head(visual, out_proj(last, einsum_attention(q, q, v, heads)))}
        start = max(len(blocks) - 6, 0)
        x_s = inputs[start]
        for block, x_orig in zip(blocks[start:], inputs[start:]):
            _, _, v = projections(block, layer_norm(block.ln_1, x_orig))
            x_s = x_s + out_proj(block, einsum_attention(v, v, v, heads))
        ref["clip-surgery"] = torch.cat([pooled[:, None], head(visual, x_s[:, 1:])], dim=1)
    return ref


def rel_err(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


def assert_methods_match(got, ref, tol=1e-5):
    errors = {m: rel_err(got[m], ref[m]) for m in ref}
    assert max(errors.values()) < tol, errors
    return errors


def hand_interpolated(pos, native, size):
    """The positional embedding resized by hand: class row kept, grid bilinear (align_corners=False)."""
    c = pos.shape[1]
    grid = pos[1:].t().reshape(1, c, *native)
    grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], grid.reshape(c, size[0] * size[1]).t()])


# ---- tests ----------------------------------------------------------------------------------------

def test_every_method_equals_its_independent_computation_at_the_native_size(tiny):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    got = tiny.token_paths(images)
    for m in VIT_METHODS:
        assert got[m].shape == (2, 1 + 8 * 8, 64) and got[m].dtype == torch.float32
    assert_methods_match(got, reference_tokens(tiny.model.visual, images))
    # the methods really differ from each other
    for a in VIT_METHODS:
        for b in VIT_METHODS:
            if a < b:
                assert not torch.allclose(got[a][:, 1:], got[b][:, 1:], atol=1e-3), (a, b)
    # token 0: encode_image for q-k and CLIP Surgery (its original path); global_embedding too
    encoded = tiny.model.encode_image(images)
    for m in ("qk", "clip-surgery"):
        torch.testing.assert_close(got[m][:, 0], encoded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny.global_embedding(images), encoded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(128, 128), (64, 96)])
def test_other_sizes_use_the_hand_interpolated_positional_embedding(tiny, size):
    """Twice the native size, and a non-square input: every method equals open_clip's forward with
    the positional embedding replaced by a hand-written bilinear interpolation of its grid."""
    visual = tiny.model.visual
    grid = (size[0] // 8, size[1] // 8)
    pos = hand_interpolated(visual.positional_embedding.detach(), (8, 8), grid)
    ours = positional_embedding(visual, grid)
    torch.testing.assert_close(ours, pos, atol=1e-6, rtol=1e-6)
    assert torch.equal(ours[0], visual.positional_embedding[0])  # class position kept
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    got = tiny.token_paths(images)
    assert got["qk"].shape == (2, 1 + grid[0] * grid[1], 64)
    assert_methods_match(got, reference_tokens(visual, images, pos))


def test_native_positional_embedding_is_the_models_own_and_model_is_untouched(tiny):
    visual = tiny.model.visual
    assert positional_embedding(visual, (8, 8)) is visual.positional_embedding
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny.token_paths(torch.randn(1, 3, 128, 96))
    tiny.text_features(["a photo of a cat"])
    after = tiny.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert visual.positional_embedding.shape == (65, 64)


def test_one_pass_through_the_trunk_for_all_methods(tiny):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: calls.append(n))
             for n, b in enumerate(tiny.model.visual.transformer.resblocks)]
    try:
        both = tiny.token_paths(images, ("vproj", "vv", "qk", "clearclip"))
        calls_all = sorted(calls)
        calls.clear()
        tiny.token_paths(images, ("maskclip",))
    finally:
        for h in hooks:
            h.remove()
    assert calls_all == list(range(tiny.layers))  # every block exactly once, the last included
    assert sorted(calls) == list(range(tiny.layers - 1))  # value path only: the last block is not run
    torch.testing.assert_close(both["vproj"], tiny.spatial_tokens(images), atol=0, rtol=0)
    torch.testing.assert_close(both["vv"], tiny.vv_tokens(images), atol=0, rtol=0)
    torch.testing.assert_close(both["qk"], tiny.qk_tokens(images), atol=0, rtol=0)
    torch.testing.assert_close(both["clearclip"], tiny.clearclip_tokens(images), atol=0, rtol=0)
    with pytest.raises(ValueError, match="token paths"):
        tiny.token_paths(images, ("kq",))
    with pytest.raises(ValueError, match="multiple of the 8x8 patch"):
        tiny.token_paths(torch.randn(1, 3, 60, 64))


def tiny_vision_cfg(**vision):
    return {"image_size": 32, "layers": 4, "width": 32, "head_width": 8, "patch_size": 8, **vision}


def tiny_clip(**vision):
    cfg = tiny_vision_cfg(**vision)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.CLIP(embed_dim=32, vision_cfg=cfg, text_cfg=TINY_TEXT)


def test_fewer_than_six_blocks_run_the_surgery_path_through_all_and_say_so():
    model = tiny_clip()  # 4 blocks
    randomise(model.visual, seed=5)
    with pytest.warns(UserWarning, match="4 blocks < 6.*all 4"):
        backbone = FrozenViT(model, "four-blocks", "random:0")
    assert backbone.surgery_from == 0
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    assert_methods_match(backbone.token_paths(images), reference_tokens(model.visual, images))


@pytest.mark.parametrize("vision, reason", [
    ({"pool_type": "avg"}, "pools by 'avg'"),
    ({"attentional_pool": True, "attn_pooler_heads": 4}, "attentional pooler"),
    ({"ls_init_value": 1e-4}, "layer scale"),
    ({"qk_norm": True}, "CustomResidualAttentionBlock"),
    ({"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "avg"}, "TimmModel"),
])
def test_other_poolings_and_blocks_are_refused_in_one_line(vision, reason):
    if "timm_model_name" in vision:
        pytest.importorskip("timm")
    model = tiny_clip(**vision)
    with pytest.raises(WeightsError, match=reason) as err:
        frozen_backbone(model, "odd-ViT", "random:0")
    message = str(err.value)
    assert message.startswith("odd-ViT: ") and "\n" not in message
    # the torch-free reading of the same config (for params validation) refuses it too
    assert vit_config_refusal(tiny_vision_cfg(**vision)) is not None


def test_config_check_accepts_what_frozenvit_accepts():
    configs = Path(__file__).resolve().parents[1] / "pipeline" / "model" / "model_configs"
    assert vit_config_refusal(json.loads((configs / "tiny-ViT.json").read_text())["vision_cfg"]) is None
    resnet = json.loads((configs / "tiny-RN.json").read_text())["vision_cfg"]
    assert "ModifiedResNet" in vit_config_refusal(resnet)
    assert vit_config_refusal(tiny_vision_cfg()) is None
    FrozenViT(tiny_clip(layers=6), "six-blocks", "random:0")  # accepted, and 6 blocks: no warning


def test_a_resnet_is_refused_by_frozenvit_and_dispatched_to_frozenclip():
    model, digest = create_clip("tiny-RN", None)
    with pytest.raises(WeightsError, match="tiny-RN: .*ModifiedResNet, not open_clip's VisionTransformer"):
        FrozenViT(model, "tiny-RN", digest)
    assert isinstance(frozen_backbone(model, "tiny-RN", digest), FrozenCLIP)
    assert isinstance(load_any_backbone(TINY_VIT, pretrained=None), FrozenViT)


def test_weights_come_through_the_resnet_path_checkpoint_and_digest(tiny, tmp_path):
    path = tmp_path / "tiny-vit.pt"
    torch.save(tiny.model.state_dict(), path)
    digest = sha256_file(path)
    loaded = load_vit(TINY_VIT, checkpoint=path, sha256=digest, init_seed=99)
    assert loaded.weights_digest == digest
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.token_paths(images), tiny.token_paths(images), atol=0, rtol=0)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_vit(TINY_VIT, checkpoint=path, sha256="0" * 64)
    a = load_vit(TINY_VIT, pretrained=None, init_seed=0)
    b = load_vit(TINY_VIT, pretrained="random", init_seed=0)
    assert a.weights_digest == "random:0"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_frozen_text_features_and_reduced_precision(tiny):
    tiny.train()
    assert not tiny.model.training and not any(p.requires_grad for p in tiny.parameters())
    assert tiny.embed_dim == 64 and tiny.stride == 8 and tiny.image_size == 64 and tiny.num_heads == 4
    features = tiny.text_features(["A photo of a cat", "Not a photo of a dog"])
    assert features.shape == (2, 64)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    assert set(tiny.class_text_features(["cat", "dog"])) == {"positive", "negative", "plain"}
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    expected = tiny.token_paths(images)
    bf16 = load_vit(TINY_VIT, pretrained=None, precision="bf16")
    bf16.model.load_state_dict(tiny.model.state_dict())
    low = bf16.token_paths(images)
    for m in VIT_METHODS:
        assert low[m].dtype == torch.float32 and not low[m].requires_grad
        assert (low[m] - expected[m]).norm() / expected[m].norm() < 0.05, m


def test_real_vit_b16_architecture_at_an_interpolated_size():
    """open_clip's ViT-B-16 (random weights, biases and LayerNorms randomised) at 112 px: its 14x14
    positional grid interpolated to 7x7 (keeps the test to a few seconds on 2 shared cores)."""
    backbone = load_vit("ViT-B-16", pretrained=None)
    visual = backbone.model.visual
    randomise(visual, seed=8)
    assert (backbone.embed_dim, backbone.layers, backbone.num_heads, backbone.stride) == (512, 12, 12, 16)
    assert backbone.surgery_from == 6
    images = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(9))
    got = backbone.token_paths(images)
    assert got["qk"].shape == (1, 1 + 7 * 7, 512)
    pos = hand_interpolated(visual.positional_embedding.detach(), (14, 14), (7, 7))
    assert_methods_match(got, reference_tokens(visual, images, pos))
