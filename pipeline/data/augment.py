"""Image views fed to the frozen backbone: the eval view and seeded, reproducible train views.

Train view (docs/METHOD.md "Augmentation and cached views"): Resize(S, S) -> Cutout (always) ->
RandAugment -> tensor -> CLIP normalisation. Every random draw comes from the view's seed, so a cached view can be
recomputed bit-identically in any process from ``view_seed(seed, index, view)`` alone.

As run by the authors (docs/METHOD.md "Training as released", params extract.augment.*): bilinear
resize (torchvision's default), a Cutout rectangle inclusive of its far edge (PIL's ImageDraw.rectangle), and the
`randaugment` PyPI package's RandAugment with its defaults (two ops, each applied with p 0.5 at a
random magnitude 1-9: num_ops/magnitude do not apply to it). The paper recipe: bicubic, half-open
box, torchvision's RandAugment(num_ops, magnitude).
"""
from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

CLIP_MEAN = OPENAI_DATASET_MEAN  # the backbone's own normalisation (open_clip's), one source
CLIP_STD = OPENAI_DATASET_STD

# The eval view: the paper only says "Resize"; bicubic is what CLIP's own preprocessing uses.
INTERPOLATION = InterpolationMode.BICUBIC
INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
RANDAUGMENTS = ("package", "torchvision")

# torchvision's RandAugment draws from the global torch RNG, the `randaugment` package from Python's
# `random` and NumPy's global RNG; this lock keeps two train_view calls in threads of one process
# from interleaving while a view's seed is installed (processes each have their own RNGs).
_GLOBAL_RNG_LOCK = threading.Lock()
_View = TypeVar("_View", Image.Image, torch.Tensor)
_PACKAGE_RANDAUGMENT = None  # built once: its constructor lists 18,225 op pairs

# uint8 (..., 3, S, S) -> CLIP-normalised float32. Extraction runs it on the backbone's device, so
# decode workers hand over uint8 (4x fewer bytes to copy); the same ops on CPU give the same bits.
normalise_pixels = v2.Compose([
    v2.ToDtype(torch.float32, scale=True),
    v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
])
_to_normalised_tensor = v2.Compose([v2.PILToTensor(), normalise_pixels])


def view_seed(seed: int, index: int, view: int) -> int:
    """Stable 63-bit seed of view ``view`` of image ``index``, the same in every process."""
    words = np.random.SeedSequence([seed, index, view]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def interpolation_mode(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def _resize(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    return v2.functional.resize(image, [size, size], interpolation=interpolation_mode(interpolation))


def cutout_box(width: int, height: int, rng: np.random.Generator, inclusive: bool = False
               ) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """Cutout's draws, as in ASL/DualCoOp: a (w/2, h/2) box around a uniform random centre,
    clipped at the borders, and one random RGB colour. `inclusive`: the far edge (x1, y1) is
    painted too, as PIL's ImageDraw.rectangle([x0, y0, x1, y1]) in the authors' code does (one
    more row and column unless clipped at the border). The PIL and the device views both paint
    what this returns: box (x0, y0, x1, y1) half-open, i.e. the painted pixels, and the colour."""
    box_w, box_h = int(0.5 * width + 0.5), int(0.5 * height + 0.5)
    cx, cy = int(rng.integers(width)), int(rng.integers(height))
    far = 1 if inclusive else 0
    x0, x1 = max(cx - box_w // 2, 0), min(cx + box_w // 2 + far, width)
    y0, y1 = max(cy - box_h // 2, 0), min(cy + box_h // 2 + far, height)
    r, g, b = (int(c) for c in rng.integers(0, 256, size=3))
    return (x0, y0, x1, y1), (r, g, b)


def _paint(image: Image.Image, box: tuple[int, int, int, int], colour: tuple[int, int, int]
           ) -> Image.Image:
    x0, y0, x1, y1 = box
    pixels = np.array(image.convert("RGB"))  # (H, W, 3) uint8, a copy
    pixels[y0:y1, x0:x1] = colour
    return Image.fromarray(pixels, "RGB")


def apply_cutout(image: Image.Image, rng: np.random.Generator, inclusive: bool = False
                 ) -> tuple[Image.Image, tuple[int, int, int, int], tuple[int, int, int]]:
    """Cutout (cutout_box's draws) painted on a PIL image -> (image, box, colour)."""
    box, colour = cutout_box(*image.size, rng, inclusive)
    return _paint(image, box, colour), box, colour


def view_draws(seed: int, size: int, cutout: bool = True, inclusive: bool = False
               ) -> tuple[tuple[tuple[int, int, int, int], tuple[int, int, int]] | None, int]:
    """Every draw of one (S, S) train view from its seed, in order: the Cutout box and colour
    (None without Cutout), then the seed of the RandAugment ops. One function, so the PIL and the
    device views (pipeline/extraction/device_views.py) cannot drift apart."""
    rng = np.random.default_rng(seed)
    cut = cutout_box(size, size, rng, inclusive) if cutout else None
    return cut, int(rng.integers(2**63 - 1))


def check_randaugment(randaugment: str) -> None:
    if randaugment not in RANDAUGMENTS:
        raise ValueError(f"randaugment must be one of {RANDAUGMENTS}, got {randaugment!r}")


def torchvision_randaugment(view: _View, op_seed: int, num_ops: int = 2, magnitude: int = 9) -> _View:
    """torchvision's RandAugment on a PIL image or a (3, H, W) uint8 tensor on any device; its op
    and magnitude draws come from the CPU generator seeded with ``op_seed`` (so the same ops on
    both), global RNG state untouched."""
    rand_augment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)  # torchvision defaults
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(op_seed)  # CPU only: CUDA RNG state untouched
        return rand_augment(view)


def eval_pil_view(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """The test-time view before normalisation: Resize(S, S), bicubic unless told. On a PIL image
    torchvision's resize is PIL's own Image.resize, so "bilinear" is bit-identical to the authors'
    MLR evaluation view (torchvision Resize((S, S)) with its default interpolation on PIL images)."""
    return _resize(image.convert("RGB"), size, interpolation)


def eval_view(image: Image.Image, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Test-time view: Resize(S, S) and CLIP normalisation -> (3, S, S) float32. Deterministic.
    `interpolation` (bicubic | bilinear): the ZS3 evaluation's evaluate.seg.interpolation, and the
    MLR evaluation view's (bilinear in the authors' COCO loader)."""
    return _to_normalised_tensor(eval_pil_view(image, size, interpolation))


@contextlib.contextmanager
def _package_rng(seed: int) -> Iterator[None]:
    """Python's and NumPy's global RNGs seeded for one call of the `randaugment` package, then
    restored (caller holds _GLOBAL_RNG_LOCK). The package still writes `np.int`, removed in NumPy
    1.24: the alias is installed for the call only."""
    py_state, np_state = random.getstate(), np.random.get_state()
    had_alias = "int" in np.__dict__
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if not had_alias:
        np.int = int  # type: ignore[attr-defined]  # the package's `np.round(...).astype(np.int)`
    try:
        yield
    finally:
        if not had_alias:
            del np.int  # type: ignore[attr-defined]  # (numpy >= 1.24 has no such alias)
        random.setstate(py_state)
        np.random.set_state(np_state)


def _randaugment_package(view: Image.Image, seed: int) -> Image.Image:
    global _PACKAGE_RANDAUGMENT
    if _PACKAGE_RANDAUGMENT is None:
        from randaugment import RandAugment
        _PACKAGE_RANDAUGMENT = RandAugment()
    with _package_rng(seed):
        return _PACKAGE_RANDAUGMENT(view).convert("RGB")


def train_pil_view(image: Image.Image, size: int, seed: int, cutout: bool = True,
                   num_ops: int = 2, magnitude: int = 9, cutout_inclusive: bool = False,
                   randaugment: str = "torchvision", interpolation: str = "bicubic") -> Image.Image:
    """The augmented train view before normalisation (for inspection and figures)."""
    check_randaugment(randaugment)
    cut, op_seed = view_draws(seed, size, cutout, cutout_inclusive)
    view = _resize(image.convert("RGB"), size, interpolation)
    if cut is not None:
        view = _paint(view, *cut)
    if randaugment == "package":
        with _GLOBAL_RNG_LOCK:
            return _randaugment_package(view, op_seed)
    return torchvision_randaugment(view, op_seed, num_ops, magnitude)


def train_view(image: Image.Image, size: int, seed: int, cutout: bool = True,
               num_ops: int = 2, magnitude: int = 9, cutout_inclusive: bool = False,
               randaugment: str = "torchvision", interpolation: str = "bicubic") -> torch.Tensor:
    """Seeded train view -> (3, S, S) float32; same seed, same bits, in any process."""
    return _to_normalised_tensor(train_pil_view(image, size, seed, cutout, num_ops, magnitude,
                                                cutout_inclusive, randaugment, interpolation))
