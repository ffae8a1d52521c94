"""Image views fed to the frozen backbone: the eval view and seeded, reproducible train views.

Train view (REFERENCE "Training"): Resize(S, S) -> Cutout (always) -> RandAugment -> tensor ->
CLIP normalisation. Every random draw comes from the view's seed, so a cached view can be
recomputed bit-identically in any process from ``view_seed(seed, index, view)`` alone.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from pipeline.backbone import CLIP_MEAN, CLIP_STD  # the backbone's own normalisation, one source

# REFERENCE only says "Resize"; bicubic is what CLIP's own preprocessing uses.
INTERPOLATION = InterpolationMode.BICUBIC

# torchvision's RandAugment draws from the global torch RNG; this lock keeps two train_view calls
# in threads of one process from interleaving (processes each have their own RNG).
_GLOBAL_RNG_LOCK = threading.Lock()

_to_normalised_tensor = v2.Compose([
    v2.PILToTensor(),
    v2.ToDtype(torch.float32, scale=True),
    v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
])


def view_seed(seed: int, index: int, view: int) -> int:
    """Stable 63-bit seed of view ``view`` of image ``index``, the same in every process."""
    words = np.random.SeedSequence([seed, index, view]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _resize(image: Image.Image, size: int) -> Image.Image:
    return v2.functional.resize(image, [size, size], interpolation=INTERPOLATION)


def apply_cutout(image: Image.Image, rng: np.random.Generator
                 ) -> tuple[Image.Image, tuple[int, int, int, int], tuple[int, int, int]]:
    """Cutout as in ASL/DualCoOp: a (w/2, h/2) box around a uniform random centre, clipped at the
    borders, filled with one random RGB colour.

    Returns (image, box (x0, y0, x1, y1) half-open, colour)."""
    width, height = image.size
    box_w, box_h = int(0.5 * width + 0.5), int(0.5 * height + 0.5)
    cx, cy = int(rng.integers(width)), int(rng.integers(height))
    x0, x1 = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    y0, y1 = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    pixels = np.array(image.convert("RGB"))  # (H, W, 3) uint8, a copy
    pixels[y0:y1, x0:x1] = colour
    return Image.fromarray(pixels, "RGB"), (x0, y0, x1, y1), colour


def eval_view(image: Image.Image, size: int) -> torch.Tensor:
    """Test-time view: Resize(S, S) and CLIP normalisation -> (3, S, S) float32. Deterministic."""
    return _to_normalised_tensor(_resize(image.convert("RGB"), size))


def train_pil_view(image: Image.Image, size: int, seed: int, cutout: bool = True,
                   num_ops: int = 2, magnitude: int = 9) -> Image.Image:
    """The augmented train view before normalisation (for inspection and figures)."""
    rng = np.random.default_rng(seed)
    view = _resize(image.convert("RGB"), size)
    if cutout:
        view, _, _ = apply_cutout(view, rng)
    rand_augment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)  # torchvision defaults
    torch_seed = int(rng.integers(2**63 - 1))
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(torch_seed)  # CPU only: CUDA RNG state untouched
        return rand_augment(view)


def train_view(image: Image.Image, size: int, seed: int, cutout: bool = True,
               num_ops: int = 2, magnitude: int = 9) -> torch.Tensor:
    """Seeded train view -> (3, S, S) float32; same seed, same bits, in any process."""
    return _to_normalised_tensor(train_pil_view(image, size, seed, cutout, num_ops, magnitude))
