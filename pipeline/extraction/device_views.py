"""The extraction views computed on the backbone's device (``extract.transforms: device``).

The recipe of pipeline/data/augment.py on (3, H, W) uint8 tensors instead of PIL images: decode
(nvJPEG, batched, on CUDA; libjpeg-turbo on CPU; RGB, EXIF orientation not applied, as
load_image), Resize(S, S) with antialias, Cutout painting cutout_box's box and colour, and
torchvision's RandAugment with its op draws from the view's seed (view_draws: the draws of the
PIL path, in the same order). The decoders and resize kernels are not PIL's, so pixels differ by
about a grey level; the Cutout box and the ops drawn are identical. The `randaugment` package
works on PIL images only, so it has no device form.

Payloads come from the decode workers (pipeline/data/images.py read_for_device): 1-D uint8 tensors
are encoded JPEGs, (3, H, W) ones pixels PIL already decoded. A file the device decoder rejects is
retried with load_image: it is then either decoded by PIL or reported with load_image's reason.
torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (not installed here); they
remain the nvJPEG batch decoder at hand (pyproject's pytest filter hides the warning).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor, resize

from pipeline.data.augment import (
    check_randaugment,
    interpolation_mode,
    torchvision_randaugment,
    view_draws,
    view_seed,
)
from pipeline.data.images import BadImageError, load_image, read_for_device


def read_payload(path: str) -> torch.Tensor:
    """The decode workers' share: a JPEG's bytes (1-D uint8) or PIL's pixels (3, H, W) uint8.
    Raises BadImageError (load_image's reason) for a file PIL cannot read either."""
    data = read_for_device(path)
    if isinstance(data, bytes):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return pil_to_tensor(data)


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor | str:
    """One JPEG -> (3, H, W) uint8 on ``device``; else PIL's pixels, or load_image's reason."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        try:
            return pil_to_tensor(load_image(path)).to(device, non_blocking=True)
        except BadImageError as err:
            return err.reason


def decode_images(payloads: Sequence[torch.Tensor], paths: Sequence[str], reasons: Sequence[str],
                  device: torch.device) -> tuple[list[torch.Tensor | None], list[str]]:
    """Worker payloads -> ((3, H, W) uint8 images on ``device``, None where bad; reasons).

    ``reasons[j]`` non-empty means the worker already found file j bad. All JPEGs of the batch go
    to the decoder in one call (one nvJPEG batch); if it fails, they are decoded one by one.
    """
    images: list[torch.Tensor | None] = [None] * len(payloads)
    reasons = list(reasons)
    jpegs = [j for j, p in enumerate(payloads) if not reasons[j] and p.ndim == 1]
    for j, p in enumerate(payloads):
        if not reasons[j] and p.ndim == 3:  # decoded by PIL in the worker
            images[j] = p.to(device, non_blocking=True)
    if jpegs:
        try:
            decoded: list[torch.Tensor | str] = decode_jpeg(
                [payloads[j] for j in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad stream fails the whole call
            decoded = [_decode_one(payloads[j], paths[j], device) for j in jpegs]
        for j, image in zip(jpegs, decoded):
            if isinstance(image, str):
                reasons[j] = image
            else:
                images[j] = image
    return images, reasons


def eval_device_view(image: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """(3, H, W) uint8 -> the test-time view (3, S, S) uint8: Resize(S, S), antialias, bicubic
    unless told (eval_pil_view's recipe; within about a grey level of it, not bit-equal)."""
    return resize(image, [size, size], interpolation=interpolation_mode(interpolation), antialias=True)


def train_device_views(image: torch.Tensor, size: int, seeds: Sequence[int], cutout: bool = True,
                       num_ops: int = 2, magnitude: int = 9, cutout_inclusive: bool = False,
                       randaugment: str = "torchvision", interpolation: str = "bicubic"
                       ) -> torch.Tensor:
    """(3, H, W) uint8 -> (K, 3, S, S) uint8, view k = train_pil_view(image, size, seeds[k], ...)
    up to the decoder and resize kernels. The image is resized once for its K views."""
    check_randaugment(randaugment)
    if randaugment != "torchvision":
        raise ValueError("the `randaugment` package works on PIL images only: device views need "
                         "randaugment='torchvision'")
    resized = resize(image, [size, size], interpolation=interpolation_mode(interpolation),
                     antialias=True)  # (3, S, S)
    views = []
    for seed in seeds:
        cut, op_seed = view_draws(seed, size, cutout, cutout_inclusive)
        view = resized.clone()
        if cut is not None:
            (x0, y0, x1, y1), colour = cut
            for c in range(3):  # scalar fills: no host-to-device copy of the colour
                view[c, y0:y1, x0:x1] = colour[c]
        views.append(torchvision_randaugment(view, op_seed, num_ops, magnitude))
    return torch.stack(views)  # (K, 3, S, S)


def batch_views(spec: Any, index: Sequence[int], payloads: Sequence[torch.Tensor],
                reasons: Sequence[str], device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """One batch of worker payloads -> ((b, K, 3, S, S) uint8 views on ``device``, reasons).

    ``spec`` is the extraction's ViewSpec (pipeline/extraction/views.py); a bad image gets zero views.
    """
    images, reasons = decode_images(payloads, [spec.path(i) for i in index], reasons, device)
    s = spec.image_size
    pixels = torch.zeros(len(index), spec.views, 3, s, s, dtype=torch.uint8, device=device)
    for row, (i, image) in enumerate(zip(index, images)):
        if image is None:
            continue
        if spec.train_augment:
            seeds = [view_seed(spec.seed, i, k) for k in range(spec.views)]
            pixels[row] = train_device_views(image, s, seeds, **spec.augment)
        else:
            pixels[row] = eval_device_view(image, s, spec.eval_interpolation)  # broadcast over K (= 1)
    return pixels, reasons


def file_view(path: str, size: int, seed: int | None, augment: dict[str, Any],
              device: torch.device) -> torch.Tensor:
    """One view of one file as batch_views makes it -> (3, S, S) uint8 on ``device``; seed None is
    the eval view, resized with ``augment["interpolation"]`` (bicubic if absent). For recomputing
    cached views (train --online) from a store's recorded augment. Raises BadImageError."""
    images, reasons = decode_images([read_payload(path)], [path], [""], device)
    if images[0] is None:
        raise BadImageError(path, reasons[0])
    if seed is None:
        return eval_device_view(images[0], size, augment.get("interpolation", "bicubic"))
    return train_device_views(images[0], size, [seed], **augment)[0]
