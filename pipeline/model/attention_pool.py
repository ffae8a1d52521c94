"""The ResNet CLIP's attention pool applied per token instead of pooling: the arithmetic on its
weights behind every token path of FrozenCLIP (DualCoOp's value path, v-v, CLIP Surgery's released
pool, q-k), with shapes at every reshape. `pool` is open_clip's `AttentionPool2d`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SURGERY_NORM_EPS = 1e-6  # CLIP Surgery's ResNet path: v / (||v|| + 1e-6) per head
SURGERY_SCALE_FACTOR = 8.0  # ... and a temperature 8 x head_dim^-0.5


def resize_positional_embedding(pos: torch.Tensor, size: tuple[int, int], mode: str,
                                native: tuple[int, int] | None = None) -> torch.Tensor:
    """Positional embedding (1+gh*gw, C) for an HxW grid; a new tensor, model untouched.

    Row 0 (the mean or class token's) is kept; the gh x gw grid is interpolated (align_corners=False).
    ``native`` is the learned grid (gh, gw); None means square. At the native grid the original
    tensor itself is returned, so native-size outputs are exact.
    """
    if native is None:
        side = round((pos.shape[0] - 1) ** 0.5)
        native = (side, side)
    native = (int(native[0]), int(native[1]))
    if tuple(size) == native:
        return pos
    spatial = pos[1:].reshape(1, *native, -1).permute(0, 3, 1, 2)  # (1, C, gh, gw)
    spatial = F.interpolate(spatial, size=tuple(size), mode=mode, align_corners=False)  # (1, C, H, W)
    spatial = spatial.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])  # (HW, C)
    return torch.cat([pos[:1], spatial], dim=0)  # (1+HW, C)


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v per head; q (B,Tq,C), k and v (B,T,C) -> (B,Tq,C)."""
    batch, _, width = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)  # (B, h, T, C/h)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B, h, Tq, C/h)
    return out.transpose(1, 2).reshape(batch, -1, width)  # (B, Tq, C)


def value_path(pool: Any, x: torch.Tensor) -> torch.Tensor:
    """DualCoOp's per-token value path c_proj(v_proj(x)): (B, 1+HW, C) -> (B, 1+HW, D)."""
    return pool.c_proj(pool.v_proj(x))  # (B, 1+HW, D)


def vv_attention(pool: Any, x: torch.Tensor, heads: int) -> torch.Tensor:
    """v-v attention per token as the paper describes CLIP Surgery's (FrozenCLIP.vv_tokens);
    token 0 keeps the pool's q-k output: (B, 1+HW, C) -> (B, 1+HW, D)."""
    v = pool.v_proj(x)  # (B, 1+HW, C)
    tokens = pool.c_proj(multi_head_attention(v, v, v, heads))  # (B, 1+HW, D)
    tokens[:, 0] = qk_first_token(pool, x, heads)  # (B, D)
    return tokens


def surgery_attention(pool: Any, x: torch.Tensor, heads: int) -> torch.Tensor:
    """CLIP Surgery's released ResNet attention pool (its clip_surgery_model.py; docs/METHOD.md).

    q, k and v are all v_proj(x). Two paths over the 1+HW tokens, per head (scale = head_dim^-0.5):
      original  softmax(scale v v^T) v                  (v as is)
      surgery   softmax(8 scale v' v'^T) v, v' = v / (||v|| + 1e-6)  (norm per head)
    both through c_proj, no residual. Tokens 1..HW come from the surgery path, token 0 from the
    original path (only its first row is computed: the other rows are discarded) -> (B, 1+HW, D).
    """
    batch, tokens, width = x.shape
    head_dim = width // heads
    v = pool.v_proj(x).reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, h, T, C/h)
    scale = head_dim ** -0.5
    unit = v / (v.norm(dim=-1, keepdim=True) + SURGERY_NORM_EPS)  # (B, h, T, C/h)
    surgery = F.scaled_dot_product_attention(unit, unit, v, scale=SURGERY_SCALE_FACTOR * scale)
    original = F.scaled_dot_product_attention(v[:, :, :1], v, v, scale=scale)  # (B, h, 1, C/h)
    out = torch.cat([original, surgery[:, :, 1:]], dim=2)  # (B, h, 1+HW, C/h)
    return pool.c_proj(out.transpose(1, 2).reshape(batch, tokens, width))  # (B, 1+HW, D)


def qk_attention(pool: Any, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The pool's ordinary q-k attention with every token as a query (the paper's CLIP row):
    c_proj(softmax(q_proj(x) k_proj(x)^T / sqrt(head_dim)) v_proj(x)) per head -> (B, 1+HW, D)."""
    out = multi_head_attention(pool.q_proj(x), pool.k_proj(x), pool.v_proj(x), heads)  # (B, 1+HW, C)
    return pool.c_proj(out)  # (B, 1+HW, D)


def qk_first_token(pool: Any, x: torch.Tensor, heads: int) -> torch.Tensor:
    """What the attention pool itself outputs: the mean token attending to all tokens -> (B, D)."""
    out = multi_head_attention(
        pool.q_proj(x[:, :1]), pool.k_proj(x), pool.v_proj(x), heads)  # (B, 1, C)
    return pool.c_proj(out)[:, 0]  # (B, D)
