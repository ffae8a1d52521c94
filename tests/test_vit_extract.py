"""Feature stores of a ViT: (N, K, 1 + h*w, D) with the class token first, the token method the
params name (recorded, and a reader asking for another is refused), the disk checked first."""
from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config.schema import Backbone
from pipeline.data.augment import train_view, view_seed
from pipeline.data.datasets import load_multilabel
from pipeline.data.images import load_image
from pipeline.data.synthetic import make_planted_coco
from pipeline.errors import CacheError, ParamError
from pipeline.extraction.engine import extract
from pipeline.model.build import backbone_from_params
from pipeline.model.vit import TINY_VIT, load_vit
from pipeline.store.cache import FeatureCache, FingerprintMismatch
from tests.store_world import clear_error, cli, ok, sets

SIZE, PATCH, N, K, D = 64, 8, 6, 2, 64  # tiny-ViT: 8 px patches, 64-d joint space; native 64 px, 8 x 8 grid
KW = {"views": K, "train_augment": True, "seed": 0, "image_size": SIZE, "shard_size": 4,
      "batch_size": 4, "progress": False}


def vit_params(**change: object) -> Backbone:
    values = {"name": TINY_VIT, "pretrained": None, "sha256": None, "init_seed": 0, "checkpoint": None,
              "image_size": SIZE, "precision": "fp32", "channels_last": False, "compile": False,
              "device": "cpu", "recalibrate_bn": False, **change}
    return Backbone.model_validate(values)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_planted_coco(tmp_path_factory.mktemp("vit") / "synthetic", N, 2, num_classes=3,
                             image_size=SIZE)


def views_of(dataset, images: range) -> torch.Tensor:
    """The stored train views recomputed from their seeds: (len(images) * K, 3, S, S)."""
    return torch.stack([train_view(load_image(dataset.records[i].path), SIZE, view_seed(0, i, k))
                        for i in images for k in range(K)])


@pytest.mark.parametrize("method", ["maskclip", "clearclip", "qk"])
def test_a_vit_store_holds_the_named_method_class_token_first(data: Path, tmp_path: Path, method: str):
    dataset = load_multilabel("synthetic", data, "train")
    cache = extract(dataset, tmp_path / "train.zarr", vit_params(), tokens=method, **KW)
    grid = SIZE // PATCH
    assert cache.tokens.shape == (N, K, 1 + grid * grid, D)
    assert cache.fingerprint["backbone"]["tokens"] == method
    backbone = load_vit(TINY_VIT, pretrained=None)
    views = views_of(dataset, range(4))  # shard 0, the same batch layout (4 views per forward)
    expected = torch.cat([backbone.token_paths(views[j:j + 4], (method,))[method] for j in (0, 4)])
    stored = np.asarray(cache.tokens[0:4])  # (4, K, T, D)
    assert stored.tobytes() == expected.numpy().astype(np.float16).reshape(stored.shape).tobytes()
    assert np.abs(stored[:, 0] - stored[:, 1]).max() > 1e-2  # views differ: the check has teeth
    if method == "qk":  # token 0 is the class token: CLIP's own image embedding of the view
        embedding = backbone.model.encode_image(views[:4]).float()  # (4, D)
        np.testing.assert_allclose(stored[:2].reshape(4, -1, D)[:, 0], embedding.numpy(), rtol=0, atol=2e-3)


def test_another_token_method_is_refused_by_the_store_naming_it(data: Path, tmp_path: Path):
    dataset = load_multilabel("synthetic", data, "val")
    kw = dict(KW, views=1, train_augment=False)
    extract(dataset, tmp_path / "val.zarr", vit_params(), **kw)  # default: maskclip
    with pytest.raises(FingerprintMismatch, match="backbone.tokens: stored 'maskclip', requested 'clearclip'"):
        extract(dataset, tmp_path / "val.zarr", vit_params(), tokens="clearclip", **kw)


def test_a_reader_asking_for_another_token_method_is_refused(tmp_path: Path):
    """Through the CLI: extract-features with MaskCLIP tokens, then train asking for ClearCLIP's."""
    make_planted_coco(tmp_path / "data" / "synthetic", 4, 4, num_classes=3, image_size=SIZE)
    run = sets(tmp_path, backbone__name=TINY_VIT, backbone__image_size=SIZE,
               evaluate__seg__image_size=SIZE, evaluate__zs_mlr__image_size=SIZE)
    ok(cli("extract-features", *run))
    line = clear_error(cli("train", *run, "--set", "extract.tokens=clearclip"),
                       "extract.tokens", "'maskclip'", "'clearclip'")
    assert "train.zarr" in line
    ok(cli("train", *run))  # the tokens it was extracted with are accepted
    ok(cli("train", *run, "--set", "train.objective=unmix+infoclip"))  # InfoCLIP on ViT tokens too


def test_extraction_prints_the_size_and_refuses_a_disk_too_small(data: Path, tmp_path: Path, capsys,
                                                                 monkeypatch):
    dataset = load_multilabel("synthetic", data, "train")
    need = N * K * (1 + (SIZE // PATCH) ** 2) * D * 2  # float16 tokens
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - need + 1, need - 1))
    with pytest.raises(CacheError, match=rf"needs {need} bytes .* but its disk has {need - 1} bytes") as err:
        extract(dataset, tmp_path / "train.zarr", vit_params(), **KW)
    assert "\n" not in str(err.value)
    assert not FeatureCache.open(tmp_path / "train.zarr").complete.any()  # nothing encoded
    printed = capsys.readouterr().out
    assert f"{N} images x {K} views x 65 tokens x {D} float16" in printed
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - need, need))
    assert extract(dataset, tmp_path / "train.zarr", vit_params(), **KW).complete.all()


def test_recalibrating_a_vit_is_refused_by_the_builder():
    with pytest.raises(ParamError, match="tiny-ViT is a ViT, whose LayerNorms"):
        backbone_from_params(vit_params(recalibrate_bn=True))
