"""Projectors and DualCoOp region logits, checked against explicit loops and the paper's sizes."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.heads import (
    HeadOutput,
    ImageProjector,
    TextProjector,
    UnmixHead,
    positive_scores,
    region_logits,
)
from pipeline.model.losses import asl_loss, mfi_loss


def _loop_region_logits(image, text, mode):
    """Independent evaluation of DualCoOp aggregation with Python scalars."""
    batch, tokens, _ = image.shape
    prompts = text.shape[0]
    classes = prompts // 2
    out = torch.zeros(batch, prompts, dtype=torch.float64)
    for b in range(batch):
        s = [[20.0 * float(image[b, t] @ text[p]) for t in range(tokens)] for p in range(prompts)]
        for p in range(prompts):
            src = p if mode == "per_prompt" else classes + (p % classes)  # weights' prompt
            z = sum(math.exp(v) for v in s[src])
            w = [math.exp(v) / z for v in s[src]]
            out[b, p] = 5.0 * sum(s[p][t] * w[t] for t in range(tokens))
    return out.view(batch, 2, classes)


@pytest.mark.parametrize("mode", ["per_prompt", "positive"])
def test_region_logits_match_explicit_loop(mode):
    image = F.normalize(torch.randn(2, 5, 4, dtype=torch.float64), dim=-1)  # (B, T, D')
    text = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1)  # (2C, D'), C = 3
    got = region_logits(image, text, softmax_mode=mode)
    assert got.shape == (2, 2, 3)
    torch.testing.assert_close(got, _loop_region_logits(image, text, mode), rtol=1e-10, atol=1e-10)


def test_softmax_modes_agree_on_positive_half_only():
    image = F.normalize(torch.randn(3, 7, 8), dim=-1)
    text = F.normalize(torch.randn(8, 8), dim=-1)
    per_prompt = region_logits(image, text, "per_prompt")
    positive = region_logits(image, text, "positive")
    # Positive prompts use their own weights in both modes; negatives differ.
    torch.testing.assert_close(per_prompt[:, 1], positive[:, 1])
    assert not torch.allclose(per_prompt[:, 0], positive[:, 0])


def test_positive_scores_are_channel_softmax_in_unit_interval():
    logits = 10 * torch.randn(4, 2, 5)
    scores = positive_scores(logits)
    assert scores.shape == (4, 5)
    assert bool(((scores >= 0) & (scores <= 1)).all())
    torch.testing.assert_close(scores, torch.sigmoid(logits[:, 1] - logits[:, 0]))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_dimensions_and_rn101_parameter_count():
    head = UnmixHead(512)  # RN-101
    assert (head.text_hidden, head.proj_dim) == (384, 256)
    # Text: 512*384 + BatchNorm (weight, bias) 2*384 + 384*256; image: 512*256.
    expected = 512 * 384 + 2 * 384 + 384 * 256 + 512 * 256
    assert _n_params(head) == expected
    assert 0.35e6 < expected < 0.45e6  # "about 0.4M", paper Table 1
    rn50 = UnmixHead(1024)
    assert (rn50.text_hidden, rn50.proj_dim) == (768, 512)


def test_projector_layers_have_no_bias_and_expected_shapes():
    text = TextProjector(16, 12, 8)
    kinds = [type(m) for m in text.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert text.net[0].bias is None and text.net[3].bias is None
    linear = ImageProjector(16, 8, kind="linear")
    assert isinstance(linear.net, nn.Linear) and linear.net.bias is None
    mlp = ImageProjector(16, 8, kind="mlp")
    assert [type(m) for m in mlp.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert mlp.net[0].out_features == 8 and mlp.net[0].bias is None and mlp.net[2].bias is None
    with pytest.raises(ValueError, match="image_projector"):
        ImageProjector(16, 8, kind="conv")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_image_projector_acts_per_token(kind):
    proj = ImageProjector(16, 8, kind=kind)
    tokens = torch.randn(2, 5, 16)  # (B, T, D)
    out = proj(tokens)
    assert out.shape == (2, 5, 8)
    torch.testing.assert_close(out[1, 3], proj(tokens[1, 3][None, None])[0, 0])


def test_forward_projects_both_prompt_sets_through_one_batchnorm():
    head = UnmixHead(16).train()
    tokens, neg, pos = torch.randn(2, 5, 16), torch.randn(3, 16), torch.randn(3, 16)
    out = head(tokens, neg, pos)
    assert isinstance(out, HeadOutput) and out.logits.shape == (2, 2, 3)
    joint = head.project_text(torch.cat([neg, pos]))  # BatchNorm statistics over 2C rows
    torch.testing.assert_close(out.text_neg, joint[:3])
    torch.testing.assert_close(out.text_pos, joint[3:])
    assert not torch.allclose(out.text_pos, head.project_text(pos))  # C-row statistics differ
    torch.testing.assert_close(out.text_pos.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(head.project_tokens(tokens).norm(dim=-1), torch.ones(2, 5))
    image = head.project_tokens(tokens)
    torch.testing.assert_close(out.logits, region_logits(image, joint, "per_prompt"))


@pytest.mark.parametrize("form", ["paper", "authors-classes", "authors-features"])
def test_gradients_reach_every_projector_parameter_and_no_input(form):
    head = UnmixHead(16, image_projector="mlp").train()
    tokens, neg, pos = torch.randn(4, 5, 16), torch.randn(3, 16), torch.randn(3, 16)
    labels = torch.tensor([[1, 0, -1], [0, 1, 1], [0, 0, 1], [1, -1, 0]])
    out = head(tokens, neg, pos)
    loss = asl_loss(out.logits, labels) + 0.1 * mfi_loss(out.text_pos, out.text_neg, form=form)
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    for x in (tokens, neg, pos):  # frozen CLIP outputs: leaves without grad
        assert x.is_leaf and not x.requires_grad and x.grad is None
