"""The frozen backbone's token maths, checked against plain tensor ops on the raw state dict."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.model.backbone import (
    NEGATIVE_TEMPLATE,
    PLAIN_TEMPLATE,
    POSITIVE_TEMPLATE,
    TINY_MODEL,
    load_backbone,
    resize_positional_embedding,
)
from pipeline.model.recalibrate import recalibrate_batchnorm

POOL = "visual.attnpool."


@pytest.fixture(scope="module")
def rn50():
    return load_backbone("RN50", pretrained=None)


@pytest.fixture(scope="module")
def rn101():
    return load_backbone("RN101", pretrained="random")


@pytest.fixture
def tiny():
    """A tiny-RN whose BatchNorm layers are randomised so every block of the trunk matters
    (open_clip zero-initialises each block's last BN weight, which would hide the residual branch)."""
    backbone = load_backbone(TINY_MODEL, pretrained=None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in backbone.model.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return backbone


# ---- independent reference computations (plain ops on state-dict tensors) ----

def raw_trunk(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """ModifiedResNet stem + layer1..4 from the state dict with F.conv2d / F.batch_norm."""

    def bn(t, key):
        return F.batch_norm(t, sd[key + ".running_mean"], sd[key + ".running_var"],
                            sd[key + ".weight"], sd[key + ".bias"], training=False, eps=1e-5)

    v = "visual."
    x = F.relu(bn(F.conv2d(x, sd[v + "conv1.weight"], stride=2, padding=1), v + "bn1"))
    x = F.relu(bn(F.conv2d(x, sd[v + "conv2.weight"], padding=1), v + "bn2"))
    x = F.relu(bn(F.conv2d(x, sd[v + "conv3.weight"], padding=1), v + "bn3"))
    x = F.avg_pool2d(x, 2)
    for layer in range(1, 5):
        blocks = sorted({int(k.split(".")[2]) for k in sd if k.startswith(f"visual.layer{layer}.")})
        for b in blocks:
            p = f"visual.layer{layer}.{b}."
            stride = 2 if layer > 1 and b == 0 else 1
            out = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), p + "bn1"))
            out = F.relu(bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), p + "bn2"))
            out = F.avg_pool2d(out, stride) if stride > 1 else out
            out = bn(F.conv2d(out, sd[p + "conv3.weight"]), p + "bn3")
            identity = x
            if p + "downsample.0.weight" in sd:
                identity = F.avg_pool2d(x, stride) if stride > 1 else x
                identity = bn(F.conv2d(identity, sd[p + "downsample.0.weight"]), p + "downsample.1")
            x = F.relu(out + identity)
    return x


def raw_pool_inputs(sd: dict, feat: torch.Tensor, mode: str) -> torch.Tensor:
    b, c, h, w = feat.shape
    pos = sd[POOL + "positional_embedding"]  # (1+g*g, C)
    g = round((pos.shape[0] - 1) ** 0.5)
    if (h, w) != (g, g):
        grid = pos[1:].t().reshape(1, c, g, g)
        grid = F.interpolate(grid, size=(h, w), mode=mode, align_corners=False)
        pos = torch.cat([pos[:1], grid.reshape(c, h * w).t()])
    x = feat.reshape(b, c, h * w).permute(0, 2, 1)
    return torch.cat([x.mean(1, keepdim=True), x], 1) + pos


def linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[POOL + name + ".weight"].t() + sd[POOL + name + ".bias"]


def einsum_attention(q, k, v, heads):
    b, tq, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(b, t.shape[1], heads, d) for t in (q, k, v))
    weights = (torch.einsum("bqhd,bkhd->bhqk", qh, kh) * d ** -0.5).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, vh).reshape(b, tq, c)


def raw_spatial_tokens(sd, feat):
    return linear(sd, "c_proj", linear(sd, "v_proj", raw_pool_inputs(sd, feat, "bicubic")))


def raw_vv_tokens(sd, feat, heads, mode):
    x = raw_pool_inputs(sd, feat, mode)
    v = linear(sd, "v_proj", x)
    out = linear(sd, "c_proj", einsum_attention(v, v, v, heads))
    qk = einsum_attention(linear(sd, "q_proj", x[:, :1]), linear(sd, "k_proj", x),
                          linear(sd, "v_proj", x), heads)
    out[:, :1] = linear(sd, "c_proj", qk)
    return out


def capture_layer4(backbone):
    """Record the model's own trunk output during a call (saves a second big forward pass)."""
    seen = []
    handle = backbone.model.visual.layer4.register_forward_hook(lambda m, i, o: seen.append(o))
    return seen, handle


# ---- tests ----

@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("which", ["rn50", "rn101"])
def test_spatial_tokens_equal_raw_attnpool_value_path(which, size, request):
    backbone = request.getfixturevalue(which)
    images = torch.randn(1, 3, size, size)
    seen, handle = capture_layer4(backbone)
    tokens = backbone.spatial_tokens(images)
    handle.remove()
    grid = size // 32
    assert tokens.shape == (1, 1 + grid * grid, backbone.embed_dim)
    assert tokens.dtype == torch.float32
    expected = raw_spatial_tokens(backbone.model.state_dict(), seen[0])
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (96, 160)])
def test_tiny_tokens_equal_fully_independent_computation(tiny, size):
    images = torch.randn(2, 3, *size)
    sd = tiny.model.state_dict()
    feat = raw_trunk(sd, images)
    torch.testing.assert_close(tiny.spatial_tokens(images), raw_spatial_tokens(sd, feat),
                               atol=1e-5, rtol=1e-5)
    for mode in ("bilinear", "bicubic"):
        torch.testing.assert_close(tiny.vv_tokens(images, pos_interpolation=mode),
                                   raw_vv_tokens(sd, feat, tiny.num_heads, mode),
                                   atol=1e-5, rtol=1e-5)


def test_vv_first_token_is_the_attention_pool_output(tiny):
    images = torch.randn(2, 3, 224, 224)
    pooled = tiny.model.visual.attnpool(tiny._trunk_eager(images))  # open_clip's own pool
    torch.testing.assert_close(tiny.vv_tokens(images)[:, 0], pooled, atol=1e-5, rtol=1e-5)
    # and the other tokens really are v-v attention, not the value path
    assert not torch.allclose(tiny.vv_tokens(images)[:, 1:], tiny.spatial_tokens(images)[:, 1:])


def test_global_embedding_equals_encode_image(tiny):
    images = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(tiny.global_embedding(images), tiny.model.encode_image(images),
                               atol=1e-5, rtol=1e-5)


def test_native_positional_embedding_is_the_original_and_model_is_untouched(tiny):
    pos = tiny.model.visual.attnpool.positional_embedding
    assert resize_positional_embedding(pos, (7, 7), "bicubic") is pos
    resized = resize_positional_embedding(pos, (14, 14), "bicubic")
    assert resized.shape == (1 + 196, pos.shape[1])
    assert torch.equal(resized[0], pos[0])
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    images = torch.randn(1, 3, 128, 128)
    tiny.spatial_tokens(images)
    tiny.vv_tokens(images)
    tiny.global_embedding(images)
    tiny.text_features(["a photo of a cat"])
    after = tiny.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_backbone_is_frozen(tiny):
    tiny.train()
    assert not tiny.model.training and not tiny.model.visual.training
    assert not any(p.requires_grad for p in tiny.parameters())
    assert not tiny.spatial_tokens(torch.randn(1, 3, 64, 64)).requires_grad


def test_text_features_are_normalised_with_the_model_embed_dim(tiny, rn50, rn101):
    prompts = ["A photo of a cat", "Not a photo of a dog"]  # few prompts: RN-101's text tower is big
    for backbone, dim in ((tiny, 64), (rn50, 1024), (rn101, 512)):
        assert backbone.embed_dim == dim
        features = backbone.text_features(prompts)
        assert features.shape == (2, dim)
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
        assert not torch.allclose(features[0], features[1])


def test_class_text_features_use_the_three_templates(tiny):
    names = ["cat", "dog"]
    features = tiny.class_text_features(names)
    for key, template in (("positive", POSITIVE_TEMPLATE), ("negative", NEGATIVE_TEMPLATE),
                          ("plain", PLAIN_TEMPLATE)):
        expected = tiny.text_features([template.format(n) for n in names])
        torch.testing.assert_close(features[key], expected)
    assert not torch.allclose(features["positive"], features["negative"])


def test_random_init_is_identical_whatever_the_global_rng(tiny):
    torch.manual_seed(123)
    a = load_backbone(TINY_MODEL, pretrained=None, init_seed=0)
    torch.manual_seed(456)
    state = torch.get_rng_state()
    b = load_backbone(TINY_MODEL, pretrained="random", init_seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # global stream not consumed
    c = load_backbone(TINY_MODEL, pretrained=None, init_seed=1)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.attnpool.v_proj.weight"], sc["visual.attnpool.v_proj.weight"])
    assert a.weights_digest == "random:0" and c.weights_digest == "random:1"


def test_reduced_precision_and_channels_last_agree_with_fp32():
    images = torch.randn(2, 3, 96, 96)
    ref = load_backbone(TINY_MODEL, pretrained=None)
    recalibrate_batchnorm(ref, [torch.randn(4, 3, 96, 96)])
    expected = ref.spatial_tokens(images)
    cl = load_backbone(TINY_MODEL, pretrained=None, channels_last=True)
    cl.model.load_state_dict(ref.model.state_dict())
    torch.testing.assert_close(cl.spatial_tokens(images), expected, atol=1e-5, rtol=1e-5)
    bf16 = load_backbone(TINY_MODEL, pretrained=None, precision="bf16")
    bf16.model.load_state_dict(ref.model.state_dict())
    low = bf16.spatial_tokens(images)
    assert low.dtype == torch.float32
    rel = (low - expected).norm() / expected.norm()
    assert rel < 0.05


def test_batchnorm_recalibration_makes_tokens_depend_on_the_image():
    """docs/TESTING.md trap 1: at initial BN statistics tokens barely vary across images."""
    backbone = load_backbone(TINY_MODEL, pretrained=None)
    images = torch.rand(8, 3, 64, 64) * 4 - 2  # roughly CLIP-normalised pixel range
    std_before = backbone.spatial_tokens(images).std(dim=0).mean()
    digest = backbone.weights_digest
    recalibrate_batchnorm(backbone, images.split(2))
    std_after = backbone.spatial_tokens(images).std(dim=0).mean()
    assert std_after > 100 * std_before
    assert not backbone.model.visual.training
    assert backbone.weights_digest.startswith(digest + "+bn:")


@pytest.mark.parametrize("size", [(224, 224), (96, 160)])
def test_qk_tokens_equal_torch_multihead_attention_on_the_pool_weights(tiny, size):
    """The CLIP row: every token queries with q_proj, keys k_proj, values v_proj, then c_proj.
    Independent: nn.MultiheadAttention loaded with the pool's weights, on the raw trunk."""
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    sd = tiny.model.state_dict()
    x = raw_pool_inputs(sd, raw_trunk(sd, images), "bilinear")  # (B, 1+HW, C)
    width = x.shape[-1]
    mha = torch.nn.MultiheadAttention(width, tiny.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([sd[POOL + f"{n}_proj.weight"] for n in "qkv"]))
        mha.in_proj_bias.copy_(torch.cat([sd[POOL + f"{n}_proj.bias"] for n in "qkv"]))
        mha.out_proj.weight.copy_(torch.eye(width))  # c_proj applied below (its output width differs)
        mha.out_proj.bias.zero_()
        attended, _ = mha(x, x, x, need_weights=False)  # (B, 1+HW, C)
    expected = linear(sd, "c_proj", attended)  # (B, 1+HW, D)
    got = tiny.qk_tokens(images, "bilinear")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # token 0 is the pool's own output (global embedding at the native size)
    if size == (224, 224):
        torch.testing.assert_close(got[:, 0], tiny.model.visual.attnpool(tiny._trunk_eager(images)),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_interpolation", ["bilinear", "bicubic"])
def test_token_paths_give_every_path_from_one_trunk_pass(tiny, pos_interpolation):
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    calls = []
    handle = tiny.model.visual.layer4.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        out = tiny.token_paths(images, ("vproj", "vv", "qk"), pos_interpolation)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert torch.equal(out["vproj"], tiny.spatial_tokens(images))
    assert torch.equal(out["vv"], tiny.vv_tokens(images, pos_interpolation))
    assert torch.equal(out["qk"], tiny.qk_tokens(images, pos_interpolation))
    with pytest.raises(ValueError, match="token paths"):
        tiny.token_paths(images, ("kq",))
