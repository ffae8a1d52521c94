"""Image files -> batches of uint8 views for extraction, in DataLoader worker processes.

``extract.transforms`` decides where the views are made. "workers": each worker decodes its
files with PIL and builds the K views (pipeline/data/augment.py); the main process only copies uint8
to the backbone's device. "device": workers only read each file's bytes (PIL still decodes what
is not a plain JPEG), the main process decodes and builds the views on the backbone's device
(pipeline/extraction/device_views.py), so a GPU is not held back by a few CPU decode workers.
Either way a batch is (image indices, (b, K, 3, S, S) uint8 views, reasons), reason "" or why
the file is bad, and a bad image is reported, not raised: workers cannot re-raise BadImageError
faithfully.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from pipeline.data.augment import eval_pil_view, train_pil_view, view_seed
from pipeline.data.images import BadImageError, load_image
from pipeline.extraction.device_views import batch_views, read_payload

# Every key reaches train_view and the store fingerprint (extract.augment.* params override all).
DEFAULT_AUGMENT = {"cutout": True, "num_ops": 2, "magnitude": 9, "cutout_inclusive": False,
                   "randaugment": "torchvision", "interpolation": "bicubic"}
TRANSFORMS = ("workers", "device")


@dataclass(frozen=True)
class ViewSpec:
    """How image i becomes its K views; picklable, so it travels to DataLoader and Dask workers.

    ``paths[j]`` is image ``first + j`` of the dataset (Dask tasks carry only their shard's paths).
    """
    paths: tuple[str, ...]
    views: int
    train_augment: bool
    seed: int
    image_size: int
    augment: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_AUGMENT))
    first: int = 0
    transforms: str = "workers"
    eval_interpolation: str = "bicubic"  # the un-augmented view's resize (extract.eval_interpolation)

    def path(self, index: int) -> str:
        return self.paths[index - self.first]

    def subset(self, start: int, stop: int) -> ViewSpec:
        """The spec restricted to images [start, stop) (what one shard task needs)."""
        return ViewSpec(self.paths[start - self.first:stop - self.first], self.views,
                        self.train_augment, self.seed, self.image_size, self.augment, start,
                        self.transforms, self.eval_interpolation)


class _Images(Dataset):
    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec

    def __len__(self) -> int:
        return self.spec.first + len(self.spec.paths)


class ImageViews(_Images):
    """Item i -> (i, views (K, 3, S, S) uint8, reason): decoded and augmented here (PIL).

    One item per image (not per view) so each file is decoded once for its K views.
    """

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        s = self.spec
        try:
            image = load_image(s.path(index))
        except BadImageError as err:
            return index, torch.zeros(s.views, 3, s.image_size, s.image_size, dtype=torch.uint8), err.reason
        if s.train_augment:
            views = [train_pil_view(image, s.image_size, view_seed(s.seed, index, k), **s.augment)
                     for k in range(s.views)]
        else:
            views = [eval_pil_view(image, s.image_size, s.eval_interpolation)] * s.views
        return index, torch.stack([pil_to_tensor(v) for v in views]), ""  # (K, 3, S, S) uint8


class ImageFiles(_Images):
    """Item i -> (i, payload uint8, reason): a JPEG's bytes (1-D) or PIL's pixels (3, H, W)."""

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            return index, read_payload(self.spec.path(index)), ""
        except BadImageError as err:
            return index, torch.zeros(0, dtype=torch.uint8), err.reason


def _collate(items: list[tuple[int, torch.Tensor, str]]
             ) -> tuple[list[int], torch.Tensor, list[str]]:
    index, pixels, reasons = zip(*items)
    return list(index), torch.stack(pixels), list(reasons)  # pixels (b, K, 3, S, S)


def _collate_files(items: list[tuple[int, torch.Tensor, str]]
                   ) -> tuple[list[int], list[torch.Tensor], list[str]]:
    index, payloads, reasons = zip(*items)
    return list(index), list(payloads), list(reasons)  # payloads differ in size: a list


def view_batches(spec: ViewSpec, batches: Sequence[Sequence[int]], device: torch.device,
                 num_workers: int = 0) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """(indices, (b, K, 3, S, S) uint8 views, reasons) for each batch of image indices, in order.

    With spec.transforms "device" the views are already on ``device``; with "workers" they are
    on the CPU (pinned when ``device`` is CUDA), the caller copies them.
    """
    on_device = spec.transforms == "device"
    loader = DataLoader(
        ImageFiles(spec) if on_device else ImageViews(spec), batch_sampler=batches,  # type: ignore[arg-type]  # torch: any iterable of index lists
        num_workers=num_workers, collate_fn=_collate_files if on_device else _collate,
        pin_memory=device.type == "cuda", prefetch_factor=2 if num_workers else None)
    for index, items, reasons in loader:
        if on_device:
            pixels, reasons = batch_views(spec, index, items, reasons, device)
            yield index, pixels, reasons
        else:
            yield index, items, reasons
