"""extract.eval_interpolation: the MLR evaluation view (the val store's un-augmented view) is PIL's
bilinear resize under the `authors` recipe and bicubic under `paper`, bit for bit; the store records
it, so a store made with one is refused for the other (or rebuilt with restart_on_change), and
`train --online` recomputes the stored tokens with the store's own resize."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import paths
from pipeline.config.params import load_params, updated
from pipeline.config.schema import Params
from pipeline.data.augment import eval_view
from pipeline.data.datasets import load_multilabel
from pipeline.data.images import load_image
from pipeline.data.synthetic import make_planted_coco
from pipeline.extraction.engine import extract
from pipeline.extraction.expected import expected_fingerprint
from pipeline.extraction.views import ImageViews, ViewSpec
from pipeline.model.backbone import load_backbone
from pipeline.store.cache import FeatureCache, FingerprintMismatch
from pipeline.store.loader import Batch
from stages import extract_features
from stages.download import write_random_backbone
from stages.train import online_tokens

REPO = Path(__file__).resolve().parents[1]
SIZE, N_VAL = 64, 3
PIL_FILTER = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _params(base: Path, recipe: str) -> Params:
    p = load_params(REPO / "configs" / "params.yaml", [f"recipe={recipe}"], profile="smoke")
    return updated(p, {
        "paths": {"data": str(base / "data"), "cache": str(base / recipe), "results": str(base / "results")},
        "backbone.checkpoint": str(base / "backbone.pt"), "backbone.image_size": SIZE,
        "backbone.device": "cpu", "extract.num_workers": 0})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A planted COCO-layout dataset (odd-sized images, so a resize happens) and a tiny random
    CLIP recalibrated on it (a fresh one maps every image to nearly the same tokens)."""
    base = tmp_path_factory.mktemp("evalview")
    root = make_planted_coco(base / "data" / "synthetic", 4, N_VAL, num_classes=3, image_size=90)
    images = [r.path for r in load_multilabel("synthetic", root, "train").records]
    write_random_backbone(base / "backbone.pt", "tiny-RN", 0, SIZE, images)
    return base


@pytest.mark.parametrize("recipe, kernel", [("authors", "bilinear"), ("paper", "bicubic")])
def test_mlr_eval_view_of_each_recipe_is_pils_resize_bit_for_bit(base, recipe, kernel):
    params = _params(base, recipe)
    assert params.extract.eval_interpolation == kernel
    val = load_multilabel("synthetic", paths.dataset_root(params.paths, "synthetic"), "val")
    spec = ViewSpec(tuple(str(r.path) for r in val.records), 1, False, 0, SIZE,
                    eval_interpolation=params.extract.eval_interpolation)
    for i, record in enumerate(val.records):
        _, views, reason = ImageViews(spec)[i]  # what the extraction workers make: (1, 3, S, S) uint8
        image = Image.open(record.path).convert("RGB")
        assert image.size != (SIZE, SIZE) and reason == ""
        expected = np.asarray(image.resize((SIZE, SIZE), PIL_FILTER[kernel]))  # (S, S, 3)
        np.testing.assert_array_equal(views[0].permute(1, 2, 0).numpy(), expected)
    other = "bicubic" if kernel == "bilinear" else "bilinear"  # and the two kernels differ here
    other_views = ImageViews(ViewSpec(spec.paths, 1, False, 0, SIZE, eval_interpolation=other))[0][1]
    assert not torch.equal(other_views, ImageViews(spec)[0][1])


def test_val_stores_of_the_two_recipes_differ_and_refuse_each_other(base):
    stores = {}
    for recipe in ("authors", "paper"):
        params = _params(base, recipe)
        extract_features.run(params, split="val")
        stores[recipe] = FeatureCache.open(paths.feature_store(params.paths, "val"))
    a, b = stores["authors"], stores["paper"]
    assert a.fingerprint["augment"] == {"enabled": False, "interpolation": "bilinear"}
    assert b.fingerprint["augment"] == {"enabled": False, "interpolation": "bicubic"}
    assert {k: v for k, v in a.fingerprint.items() if k not in ("augment", "params")} == \
        {k: v for k, v in b.fingerprint.items() if k not in ("augment", "params")}  # nothing else
    record = {k for k in a.fingerprint["params"].keys() | b.fingerprint["params"].keys()
              if a.fingerprint["params"].get(k) != b.fingerprint["params"].get(k)}
    assert record <= {"extract.eval_interpolation", "data.coco_val_images"}  # the recipes' val keys
    assert "extract.eval_interpolation" in record
    tokens = {r: s.tokens[:].astype(np.float32) for r, s in stores.items()}  # (N, 1, T, D)
    between_images = np.abs(tokens["authors"] - np.roll(tokens["authors"], 1, axis=0)).mean()
    assert np.abs(tokens["authors"] - tokens["paper"]).mean() > 0.01 * between_images

    # the store asked for with the other resize is refused, naming the key, and left untouched
    paper_params = _params(base, "paper")
    dataset = load_multilabel("synthetic", paths.dataset_root(paper_params.paths, "synthetic"), "val")
    kw = {"views": 1, "train_augment": False, "image_size": SIZE, "shard_size": paper_params.extract.shard_size,
              "batch_size": paper_params.extract.batch_size, "progress": False,
          "record": expected_fingerprint(paper_params, "val").record}  # as the stage records it
    copy = shutil.copytree(a.path, base / "authors-copy.zarr")
    with pytest.raises(FingerprintMismatch, match=r"fingerprint\.augment\.interpolation: stored "
                                                  r"'bilinear', requested 'bicubic'"):
        extract(dataset, copy, paper_params.backbone, eval_interpolation="bicubic", **kw)
    assert np.array_equal(FeatureCache.open(copy).tokens[:].astype(np.float32), tokens["authors"])
    # ... or rebuilt with restart_on_change (dvc.yaml's extract stage), then holding bicubic views
    rebuilt = extract(dataset, copy, paper_params.backbone, eval_interpolation="bicubic",
                      restart_on_change=True, **kw)
    assert rebuilt.fingerprint == b.fingerprint and rebuilt.tokens[:].tobytes() == b.tokens[:].tobytes()


def test_train_store_fingerprint_does_not_record_the_eval_resize(base):
    params = _params(base, "authors")
    dataset = load_multilabel("synthetic", paths.dataset_root(params.paths, "synthetic"), "train")
    kw = {"views": 2, "train_augment": True, "image_size": SIZE, "shard_size": 8, "batch_size": 8, "progress": False}
    one = extract(dataset, base / "t1.zarr", params.backbone, eval_interpolation="bilinear", **kw)
    two = extract(dataset, base / "t2.zarr", params.backbone, eval_interpolation="bicubic", **kw)
    assert one.fingerprint == two.fingerprint and "eval_interpolation" not in str(one.fingerprint)
    assert one.tokens[:].tobytes() == two.tokens[:].tobytes()


@pytest.mark.parametrize("recipe", ["authors", "paper"])
def test_online_recomputation_uses_the_stores_own_resize(base, recipe):
    params = _params(base, recipe)
    store = paths.feature_store(params.paths, "val")
    if not store.exists():
        extract_features.run(params, split="val")
    cache = FeatureCache.open(store)
    assert cache.fingerprint["augment"]["interpolation"] == params.extract.eval_interpolation
    batch = Batch(torch.empty(0), torch.empty(0), np.arange(N_VAL), np.zeros(N_VAL, np.int64))
    online = online_tokens(params, cache, torch.device("cpu"))(batch).numpy().astype(np.float16)
    assert online.tobytes() == cache.tokens[:, 0].tobytes()  # the extraction's batch: all N_VAL
    backbone = load_backbone("tiny-RN", pretrained=None, checkpoint=params.backbone.checkpoint)
    val = load_multilabel("synthetic", paths.dataset_root(params.paths, "synthetic"), "val")
    other = {"authors": "bicubic", "paper": "bilinear"}[recipe]
    wrong = backbone.spatial_tokens(torch.stack([eval_view(load_image(r.path), SIZE, other)
                                                 for r in val.records])).numpy().astype(np.float16)
    assert wrong.tobytes() != online.tobytes()
