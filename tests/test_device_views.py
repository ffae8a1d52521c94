"""extract.transforms "device": views decoded and augmented on the backbone's device (here the
CPU) match the PIL views within a grey level with the identical Cutout box, repeat bit for bit
from their seeds, report bad files as load_image does, and make a store of their own fingerprint."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from pipeline.config.params import ParamError, load_params
from pipeline.config.schema import Backbone
from pipeline.data.augment import eval_pil_view, view_draws, view_seed
from pipeline.data.datasets import load_multilabel
from pipeline.data.images import BadImageError, load_image, read_for_device
from pipeline.data.synthetic import (
    CONVERTIBLE_IMAGE_KINDS,
    CORRUPT_IMAGE_KINDS,
    make_bad_images,
    make_planted_coco,
    planted_sample,
)
from pipeline.extraction.device_views import eval_device_view, file_view, train_device_views
from pipeline.extraction.engine import extract
from pipeline.extraction.views import DEFAULT_AUGMENT, ViewSpec, view_batches
from pipeline.store.cache import FeatureCache, FingerprintMismatch
from pipeline.store.identity import store_id
from pipeline.training.loop import TrainingError
from stages.download import write_random_backbone

ROOT = Path(__file__).resolve().parents[1]
SIZE, CPU = 64, torch.device("cpu")
SIDES = [(96, 96), (130, 97), (40, 50), (200, 150)]  # larger and smaller than S, odd shapes
AUTHORS_LIKE = dict(DEFAULT_AUGMENT, interpolation="bilinear", cutout_inclusive=True)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    d = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i, (w, h) in enumerate(SIDES):
        pixels = planted_sample(0, "train", i, max(w, h), 8)[0][:h, :w]  # (h, w, 3) uint8
        Image.fromarray(np.ascontiguousarray(pixels)).save(d / f"{i}.jpg", quality=90)
        paths.append(str(d / f"{i}.jpg"))
    return tuple(paths)


def both_paths(paths: tuple[str, ...], **spec: object) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """(b, K, 3, S, S) views of the PIL (workers) path and of the device path, and their reasons."""
    batch = [list(range(len(paths)))]
    out = []
    for transforms in ("workers", "device"):
        (_, pixels, reasons), = view_batches(ViewSpec(paths, **spec, transforms=transforms), batch, CPU)
        out.append((pixels, reasons))
    return out[0][0], out[1][0], out[0][1], out[1][1]


@pytest.mark.parametrize("augment", [DEFAULT_AUGMENT, AUTHORS_LIKE], ids=["bicubic", "bilinear"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_device_views_are_the_pil_views_within_a_grey_level(jpegs, train, augment) -> None:
    views = 3 if train else 1
    pil, dev, _, _ = both_paths(jpegs, views=views, train_augment=train, seed=5, image_size=SIZE,
                                augment=dict(augment, randaugment="torchvision"))
    assert dev.shape == pil.shape == (len(jpegs), views, 3, SIZE, SIZE) and dev.dtype == torch.uint8
    diff = (dev.int() - pil.int()).abs().float().mean(dim=(2, 3, 4))  # (b, K) grey levels
    assert diff.max() < 1.5, diff
    assert not torch.equal(dev, pil)  # two implementations, not one called twice


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_device_view_follows_the_pil_eval_view_interpolation(jpegs, interpolation) -> None:
    for path in jpegs:
        image = load_image(path)
        pil = pil_to_tensor(eval_pil_view(image, SIZE, interpolation)).int()
        dev = eval_device_view(pil_to_tensor(image), SIZE, interpolation).int()  # same decoded pixels
        other = eval_device_view(pil_to_tensor(image), SIZE,
                                 {"bicubic": "bilinear", "bilinear": "bicubic"}[interpolation]).int()
        assert (dev - pil).abs().float().mean() < 1.0
        assert (dev - pil).abs().float().mean() < (other - pil).abs().float().mean()


@pytest.mark.parametrize("inclusive", [False, True])
def test_device_cutout_paints_exactly_the_pil_box_and_colour(jpegs, inclusive) -> None:
    augment = dict(DEFAULT_AUGMENT, num_ops=0, cutout_inclusive=inclusive)  # RandAugment off
    pil, dev, _, _ = both_paths(jpegs, views=4, train_augment=True, seed=3, image_size=SIZE,
                                augment=augment)
    for i in range(len(jpegs)):
        for k in range(4):
            ((x0, y0, x1, y1), colour), _ = view_draws(view_seed(3, i, k), SIZE, True, inclusive)
            box = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            box[y0:y1, x0:x1] = True
            fill = torch.tensor(colour, dtype=torch.uint8)[:, None]  # (3, 1)
            for views in (pil, dev):
                assert torch.equal(views[i, k][:, box], fill.expand(3, int(box.sum())))
            outside = (dev[i, k][:, ~box].int() - pil[i, k][:, ~box].int()).abs()
            assert outside.float().mean() < 1.5  # the resized image around it: a grey level


def test_device_views_repeat_from_their_seed_and_differ_between_seeds(jpegs) -> None:
    image = load_image(jpegs[1])
    tensor = pil_to_tensor(image)  # (3, H, W) uint8
    seeds = [view_seed(0, 1, k) for k in range(4)] + [view_seed(1, 1, 0)]
    torch.manual_seed(123)  # the global RNG state does not matter ...
    first = train_device_views(tensor, SIZE, seeds)
    before = torch.get_rng_state()
    again = train_device_views(tensor, SIZE, seeds)
    assert torch.equal(first, again)
    assert torch.equal(before, torch.get_rng_state())  # ... nor is it disturbed
    assert len({first[k].numpy().tobytes() for k in range(len(seeds))}) == len(seeds)
    with pytest.raises(ValueError, match="randaugment"):
        train_device_views(tensor, SIZE, seeds, randaugment="package")


def test_bad_files_are_reported_with_load_images_reason(tmp_path: Path) -> None:
    files = make_bad_images(tmp_path)
    data = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 90)).save(data, "JPEG")
    raw = bytearray(data.getvalue())
    table = raw.index(b"\xff\xc4")  # a complete JPEG whose header parses, but a bogus Huffman
    raw[table + 5:table + 21] = b"\xff" * 16  # table: it fails in the device decoder, then in PIL
    (tmp_path / "bogus_huffman.jpg").write_bytes(bytes(raw))
    assert isinstance(read_for_device(tmp_path / "bogus_huffman.jpg"), bytes)  # to the decoder
    kinds = [*CORRUPT_IMAGE_KINDS, "bogus_huffman", *CONVERTIBLE_IMAGE_KINDS]
    files["bogus_huffman"] = tmp_path / "bogus_huffman.jpg"
    paths = tuple(str(files[k]) for k in kinds)
    pil, dev, pil_reasons, dev_reasons = both_paths(paths, views=1, train_augment=False, seed=0,
                                                    image_size=SIZE)
    expected = []
    for path in paths:
        try:
            load_image(path)
            expected.append("")
        except BadImageError as err:
            expected.append(err.reason)
    assert dev_reasons == pil_reasons == expected
    bad = [bool(r) for r in expected]
    assert sum(bad) == len(CORRUPT_IMAGE_KINDS) + 1 and "truncated" in " ".join(expected).lower()
    assert not dev[bad].any()  # zero views for bad files
    good = [not b for b in bad]
    assert (dev[good].int() - pil[good].int()).abs().float().mean() < 1.5  # CMYK, 16-bit, ...
    with pytest.raises(BadImageError, match="truncated"):
        file_view(str(files["truncated_jpeg"]), SIZE, None, DEFAULT_AUGMENT, CPU)


# -- end to end ----------------------------------------------------------------------------------
BACKBONE = {"name": "tiny-RN", "pretrained": None, "sha256": None, "init_seed": 0,
            "image_size": SIZE, "precision": "fp32", "channels_last": False, "compile": False,
            "device": "cpu", "recalibrate_bn": False}
KW = {"views": 2, "train_augment": True, "seed": 0, "image_size": SIZE, "shard_size": 4,
      "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Backbone]:
    """Planted COCO train images and a tiny CLIP with BatchNorm recalibrated on them (a fresh
    one maps every image to nearly the same tokens: closeness would then prove nothing)."""
    root = make_planted_coco(tmp_path_factory.mktemp("coco") / "synthetic", 10, 2, num_classes=4,
                             image_size=96)
    dataset = load_multilabel("synthetic", root, "train")
    ckpt = write_random_backbone(root / "backbone.pt", "tiny-RN", 0, SIZE,
                                 [r.path for r in dataset.records])
    return dataset, Backbone.model_validate(dict(BACKBONE, checkpoint=str(ckpt)))


def test_device_store_is_complete_close_to_the_workers_store_and_fingerprinted(coco, tmp_path) -> None:
    dataset, backbone = coco
    workers = extract(dataset, tmp_path / "w.zarr", backbone, **KW)
    device = extract(dataset, tmp_path / "d.zarr", backbone, **KW, transforms="device")
    assert device.complete.all() and (device.status == 0).all()
    a, b = workers.tokens[:].astype(np.float32), device.tokens[:].astype(np.float32)  # (N, K, T, D)
    assert a.shape == b.shape and not np.array_equal(a, b)
    between_images = np.abs(a - np.roll(a, 1, axis=0)).mean()  # what tells images apart
    assert np.abs(a - b).mean() < 0.05 * between_images  # measured: 0.0035x
    assert device.fingerprint["transforms"] == "device" and "transforms" not in workers.fingerprint

    # train --online recomputes the stored views on the device too: image 4 and 5, both views,
    # in the extraction's batch (4 views per forward), give the stored bytes.
    from pipeline.store.loader import Batch
    from stages.train import online_tokens
    params = load_params(ROOT / "params.yaml", [
        f"paths.data={dataset.records[0].path.parents[1].parent}", "data.dataset=synthetic",
        "backbone.name=tiny-RN", "backbone.pretrained=null", f"backbone.checkpoint={backbone.checkpoint}",
        f"backbone.image_size={SIZE}", "backbone.device=cpu", "backbone.channels_last=false"])
    batch = Batch(torch.empty(0), torch.empty(0), np.array([4, 4, 5, 5]), np.array([0, 1, 0, 1]))
    tokens = online_tokens(params, device, CPU)(batch).numpy().astype(np.float16)  # (4, T, D)
    assert tokens.reshape(2, 2, *tokens.shape[1:]).tobytes() == device.tokens[4:6].tobytes()
    group = zarr.open_group(str(device.path), mode="r+")  # as if its views had been made on a GPU
    made_on_cuda = {**device.fingerprint, "backbone": {**device.fingerprint["backbone"], "device": "cuda"}}
    group.attrs.update({"fingerprint": made_on_cuda, "store_id": store_id(made_on_cuda)})
    with pytest.raises(TrainingError, match=r"views made on cuda.*train\.device: cuda"):
        online_tokens(params, FeatureCache.open(device.path), CPU)

    for store, other in (("w.zarr", "device"), ("d.zarr", "workers")):  # stale either way
        with pytest.raises(FingerprintMismatch, match="fingerprint.transforms"):
            extract(dataset, tmp_path / store, backbone, **KW, transforms=other)


def test_package_randaugment_on_the_device_is_refused_naming_both_keys(coco, tmp_path) -> None:
    with pytest.raises(ParamError, match=r"'extract\.transforms'.*'extract\.augment\.randaugment'"):
        load_params(ROOT / "params.yaml", ["extract.transforms=device", "recipe=authors"])
    params = load_params(ROOT / "params.yaml", ["extract.transforms=device", "recipe=paper"])
    assert params.extract.transforms == "device"
    assert load_params(ROOT / "params.yaml").extract.transforms == "workers"  # the default

    dataset, backbone = coco
    package = dict(DEFAULT_AUGMENT, randaugment="package")
    with pytest.raises(ValueError, match="extract.transforms.*extract.augment.randaugment"):
        extract(dataset, tmp_path / "t.zarr", backbone, **KW, augment=package, transforms="device")
    assert not (tmp_path / "t.zarr").exists()
    # an eval store has no RandAugment: any recipe may make it on the device
    plain = extract(dataset, tmp_path / "e.zarr", backbone, **{**KW, "views": 1, "train_augment": False},
                    augment=package, transforms="device")
    assert plain.complete.all()
    assert plain.fingerprint["augment"] == {"enabled": False, "interpolation": "bicubic"}
