"""Figures: activation-map grids and similarity heat-maps are valid PNGs with the panels asked for."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import paths
from pipeline.config.params import as_dict, load_params, updated
from pipeline.data.datasets import load_segmentation
from pipeline.data.synthetic import make_planted_coco
from pipeline.model.heads import UnmixHead
from pipeline.results.plots import activation_grid, similarity_heatmaps
from pipeline.training import provenance
from pipeline.training.loop import save_projectors
from stages import figures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    """Smoke params on a generated dataset, a random tiny backbone and untrained projectors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("figures")
    p = updated(load_params(REPO / "configs" / "params.yaml", profile="smoke"), {
        "paths": {"data": str(base / "data"), "cache": str(base / "cache"), "results": str(base / "results")},
        "backbone.checkpoint": None, "backbone.pretrained": None, "backbone.device": "cpu",
        "evaluate.seg.image_size": 96})
    make_planted_coco(paths.dataset_root(p.paths, "synthetic"), 1, 6, image_size=64)
    torch.manual_seed(0)
    p = updated(p, {"evaluate.projectors": "best"})
    save_projectors(paths.projectors(p.paths, "best"), UnmixHead(64), {
        "model": as_dict(p.model), "embed_dim": 64, "classnames": [], "fingerprint": {}, "epoch": 0,
        "provenance": provenance.record(p, None, None, provenance.declared_digest(p.backbone))})
    yield p
    torch.set_num_threads(threads)


def _png(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
        return img.size


def test_activation_maps_one_png_per_class_with_image_and_one_column_per_method(params, monkeypatch):
    panels, titles = [], []

    def counting(*args, **kwargs):
        panels.append(activation_grid(*args, **kwargs))
        titles.append(kwargs["title"])
        return panels[-1]

    monkeypatch.setattr(figures, "activation_grid", counting)
    out = figures.run(params)
    assert out["classes"] == ["person", "car"]  # the smoke profile's query, both synthetic classes
    rows, methods = params.figures.images, params.evaluate.seg.methods
    assert out["methods"] == methods and len(methods) == 6
    assert panels == [rows * (1 + len(methods))] * 2  # the image, then one column per method
    assert all("projectors best (epoch 0), recipe authors" in t for t in titles)
    for path in out["figures"]:
        width, height = _png(path)
        assert width > height > 100  # 7 columns side by side, `rows` rows


def test_unknown_query_classes_fall_back_to_the_datasets_first_classes():
    assert figures.query_classes(["zebra", "car"], ["person", "car"]) == ["car"]
    assert figures.query_classes(["zebra", "dog"], ["person", "bicycle", "car"]) == ["person", "bicycle"]


def test_images_containing_the_class_are_picked_first(params):
    data = load_segmentation("synthetic", paths.dataset_root(params.paths, "synthetic"), "val")
    value = 1 + data.classnames[1:].index("car")
    has = [i for i in range(len(data)) if (data.mask(i) == value).any()]
    picked = figures.pick_images(data, value, 3)
    assert has and len(picked) == 3 and picked[:len(has)] == has[:3]


def test_similarity_heatmaps_and_activation_grid_report_their_panels(tmp_path):
    rng = np.random.default_rng(0)
    before, after = rng.normal(size=(5, 8)), rng.normal(size=(5, 4))
    assert similarity_heatmaps({"CLIP": before, "ours": after}, list("abcde"), tmp_path / "h.png") == 2
    width, height = _png(tmp_path / "h.png")
    assert width > height
    pictures = [rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8) for _ in range(3)]
    maps = {m: [rng.random((20, 30)) for _ in range(3)] for m in ("a", "b")}
    assert activation_grid(pictures, maps, tmp_path / "g.png") == 3 * 3
    _png(tmp_path / "g.png")
