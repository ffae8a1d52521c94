"""A user's photo as the network sees it for dense prediction: its aspect ratio kept
(`resize="keep"`, the `segment` / `query` default) or squashed to the released evaluation's
square (`resize="square"`, augment.eval_view).

"keep" is the test pipeline of mmsegmentation, which the dense CLIP tools run on (MaskCLIP's
configs: Resize(img_scale=(2048, 512), keep_ratio=True), then ResizeToMultiple(size_divisor=32)),
with the model's image size S in place of 512: the short side to S, the long side at most
MAX_ASPECT x S (a panorama is shrunk until it fits, its short side then below S), each side then
rounded up to a multiple of the backbone's stride, so the token grid is exactly
H / stride x W / stride (h x w, not square). The whole picture goes through the network at once,
no sliding window: the ResNet attention pool takes any grid, its positional embedding
interpolated to h x w (model/attention_pool.py). On a square photo, with S a multiple of the
stride (224, 288, 384, 448), "keep" and "square" are the same pixels.
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.data.augment import eval_view, interpolation_mode, normalise_pixels

RESIZES = ("keep", "square")
MAX_ASPECT = 4  # long side / short side at most: mmsegmentation's (2048, 512) scale


def _pair(stride: int | tuple[int, int]) -> tuple[int, int]:
    return (stride, stride) if isinstance(stride, int) else (int(stride[0]), int(stride[1]))


def keep_ratio_size(width: int, height: int, size: int, stride: int | tuple[int, int] = 32
                    ) -> tuple[int, int]:
    """(H, W) of the "keep" view of a width x height picture: mmsegmentation's keep_ratio rescale
    to (MAX_ASPECT x size, size), sides rounded half up, then up to multiples of `stride` (an int,
    or (rows, columns) per token)."""
    factor = min(size / min(width, height), MAX_ASPECT * size / max(width, height))
    rows, cols = _pair(stride)

    def side(pixels: int, step: int) -> int:
        scaled = max(1, int(pixels * factor + 0.5))
        return -(-scaled // step) * step  # ceil to a multiple of the stride

    return side(height, rows), side(width, cols)


def token_grid_size(view: torch.Tensor, stride: int | tuple[int, int]) -> tuple[int, int]:
    """(h, w) tokens of a view (..., H, W) whose sides are multiples of `stride`."""
    rows, cols = _pair(stride)
    return view.shape[-2] // rows, view.shape[-1] // cols


def dense_view(image: Image.Image, size: int, stride: int | tuple[int, int] = 32, resize: str = "keep",
               interpolation: str = "bicubic") -> torch.Tensor:
    """(3, H, W) CLIP-normalised float32: the "keep" view (keep_ratio_size) or the "square" one
    (eval_view, (3, S, S)); the same resize and normalisation ops either way."""
    if resize == "square":
        return eval_view(image, size, interpolation)
    if resize != "keep":
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    picture = image.convert("RGB")
    height, width = keep_ratio_size(picture.width, picture.height, size, stride)
    resized = v2.functional.resize(picture, [height, width], interpolation=interpolation_mode(interpolation))
    return normalise_pixels(v2.functional.pil_to_tensor(resized))
