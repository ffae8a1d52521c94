"""`segment` / `query` outputs read at a glance: names that never collide, overlays with a
label-map legend in the label PNG's colours and a colourbar, titles clear of the column titles on
portrait and landscape photos, and figures at most MAX_WIDTH_PX wide with readable tick labels."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.colors import to_rgb
from PIL import Image
from segment_world import TEMPLATE, world  # noqa: F401  (session fixture)

from pipeline.cli.app import main
from pipeline.data.classes import COCO_CLASSES
from pipeline.data.synthetic import voc_palette
from pipeline.results.names import image_digest, output_names
from pipeline.results.overlays import label_colours, legend_colours
from pipeline.results import plots
from pipeline.results.plots import (
    MAX_WIDTH_PX,
    MIN_TICK_POINTS,
    SCORE_LABEL,
    activation_figure,
    activation_grid,
    similarity_figure,
)
from stages.segment import read_label_png


def _invoke(world, *args: str):
    return CliRunner().invoke(main, [*args, "--params", str(world["params_file"]),
                                     "--projectors", str(world["projectors"]), "--template", TEMPLATE])


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as png:
        assert png.format == "PNG"
        return png.size


# ---- names ----------------------------------------------------------------------------------

def test_output_names_never_collide_within_a_call_or_with_an_earlier_one(tmp_path):
    files = []
    for folder, content in (("a", b"one"), ("b", b"two"), ("c", b"three")):
        (tmp_path / folder).mkdir()
        files.append(tmp_path / folder / "photo.jpg")
        files[-1].write_bytes(content)
    (tmp_path / "c" / "dog.png").write_bytes(b"four")
    files.append(tmp_path / "c" / "dog.png")
    out = tmp_path / "out"
    out.mkdir()
    digests = [image_digest(f) for f in files]
    assert output_names(files, out, digests) == ["a_photo", "b_photo", "c_photo", "dog"]
    # an earlier call wrote dog.json for another image: this dog.png takes dog_2; its own rerun keeps dog
    (out / "dog.json").write_text(json.dumps({"image_sha256": "another image"}))
    assert output_names(files[3:], out, digests[3:]) == ["dog_2"]
    (out / "dog.json").write_text(json.dumps({"image_sha256": digests[3]}))
    assert output_names(files[3:], out, digests[3:]) == ["dog"]


def test_two_folders_and_two_images_with_one_query_text_write_apart(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(world["files"][0], a / "x.png")
    shutil.copy(world["files"][1], b / "x.png")
    out = tmp_path / "out"
    run = _invoke(world, "segment", str(a), str(b), "--classes", "person,car", "--out", str(out))
    assert run.exit_code == 0, run.output
    for folder, source in (("a", world["files"][0]), ("b", world["files"][1])):
        record = json.loads((out / f"{folder}_x.json").read_text())
        assert record["image_sha256"] == image_digest(source)
        assert record["resize"] == "keep" and record["model"]["resize"] == "keep"
        assert read_label_png(out / f"{folder}_x_labels.png").shape == (96, 96)
    # query: the image's stem in the name, and another image of the same name never overwrites it
    for image in (a / "x.png", b / "x.png", world["files"][2], a / "x.png"):
        run = _invoke(world, "query", str(image), "--text", "person", "--out", str(out), "--resize", "square")
        assert run.exit_code == 0, run.output
    written = sorted(p.name for p in out.glob("*_query_*.json"))
    assert written == ["planted_02_query_person.json", "x_query_person.json", "x_query_person_2.json"]
    assert json.loads((out / "x_query_person.json").read_text())["image_sha256"] == image_digest(a / "x.png")
    assert json.loads((out / "x_query_person_2.json").read_text())["resize"] == "square"


# ---- overlays -------------------------------------------------------------------------------

def _overlay(shape: tuple[int, int], rows: int, labelled: bool):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    maps = {m: [rng.random(shape) for _ in range(rows)] for m in ("CLIP", "CLIP-VV", "ours")}
    labels = rng.integers(0, 4, shape, dtype=np.uint8)
    legend = legend_colours({0: "background", 1: "person", 2: "dog", 3: "horse"})
    panel = ("labels (ours)", label_colours(labels, shape), legend) if labelled else None
    title = "a_rather_long_photo_name_from_a_phone_camera_20240101_120000.jpg: person, dog, horse"
    return activation_figure([picture] * rows, maps, title=title, row_labels=["person", "dog", "horse"][:rows],
                             label_panel=panel), legend


@pytest.mark.parametrize("shape", [(400, 150), (150, 400), (200, 200)])
@pytest.mark.parametrize("rows, labelled", [(3, True), (1, False), (1, True)])
def test_the_title_never_overlaps_the_column_titles(shape, rows, labelled):
    fig, _ = _overlay(shape, rows, labelled)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    title = fig.get_suptitle() and fig._suptitle.get_window_extent(renderer)
    columns = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert title and len(columns) == 4 + labelled
    assert not any(title.overlaps(box) for box in columns), (title, columns)
    assert all(title.y0 >= box.y1 for box in columns)  # above them, not beside
    width, _ = fig.get_size_inches() * fig.dpi
    assert title.x0 >= 0 and title.x1 <= width  # wrapped to the figure's width


def test_the_label_panel_shows_the_label_pngs_colours_with_a_legend_and_a_colourbar():
    fig, legend = _overlay((150, 400), 3, True)
    assert legend == {"background": (0, 0, 0), "person": (128, 0, 0), "dog": (0, 128, 0), "horse": (128, 128, 0)}
    palette = np.asarray(voc_palette()).reshape(256, 3)
    entries = fig.legends[0]
    shown = {t.get_text(): to_rgb(h.get_facecolor()) for t, h in zip(entries.get_texts(), entries.legend_handles)}
    assert shown == {name: tuple(palette[v] / 255) for v, name in enumerate(legend)}
    labelled = [ax for ax in fig.axes if ax.get_title() == "labels (ours)"]
    assert len(labelled) == 1
    drawn = labelled[0].images[0].get_array()
    labels = np.random.default_rng(0)  # the same draws as _overlay: picture, maps, then labels
    labels.integers(0, 256, (150, 400, 3), dtype=np.uint8)
    [labels.random((150, 400)) for _ in range(9)]
    expected = palette[labels.integers(0, 4, (150, 400), dtype=np.uint8)]
    np.testing.assert_array_equal(np.asarray(drawn), expected)
    assert [ax.get_xlabel() for ax in fig.axes if ax.get_label() == "<colorbar>"] == [SCORE_LABEL]


# ---- widths and ticks -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(480, 160), (160, 480)])
def test_overlays_with_many_columns_are_at_most_max_width(tmp_path, shape):
    rng = np.random.default_rng(1)
    picture = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    maps = {f"method {k}": [rng.random(shape)] * 2 for k in range(7)}  # the figures stage: 6 methods
    path = tmp_path / "wide.png"
    assert activation_grid([picture] * 2, maps, path, title="activation maps",
                           label_panel=("labels", label_colours(np.zeros(shape, np.uint8), shape),
                                        legend_colours({0: "background"}))) == 2 * 8 + 1
    width, height = _png_size(path)
    assert 9 * 60 < width <= MAX_WIDTH_PX and height > 0  # 9 columns: shrunk, not cropped


@pytest.mark.parametrize("num", [20, 80, 250])
def test_mfi_heatmaps_fit_max_width_with_readable_tick_labels(tmp_path, num):
    """The MFI figure as evaluate_mfi draws it (four rows of features, the class set's names):
    at most MAX_WIDTH_PX wide; the tick labels at least MIN_TICK_POINTS and never on top of
    each other (every k-th class named where all would not fit)."""
    rng = np.random.default_rng(2)
    names = [f"{COCO_CLASSES[k % 80]} {k // 80}" if num > 80 else COCO_CLASSES[k] for k in range(num)]
    panels = {k: rng.normal(size=(num, 16)) for k in ("CLIP", "untrained projector", "alpha = 0", "trained")}
    fig = similarity_figure(panels, names, title="class text similarity: coco")
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    heatmaps = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(heatmaps) == 4
    for ax in heatmaps:
        for labels, axis in ((ax.get_yticklabels(), 1), (ax.get_xticklabels(), 0)):
            assert len(labels) >= min(num, 40) and all(t.get_text() in names for t in labels)
            assert min(t.get_fontsize() for t in labels) >= MIN_TICK_POINTS
            boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.get_points()[0][axis])
            for first, second in zip(boxes, boxes[1:]):
                low, high = (first.y1, second.y0) if axis == 1 else (first.x1, second.x0)
                assert high >= low - 0.5, (num, axis)  # neighbours do not overlap (0.5 px anti-aliasing)
    path = tmp_path / "mfi_coco.png"
    plots._save(fig, path, 100)  # what similarity_heatmaps writes (evaluate_mfi's dpi)
    width, _ = _png_size(path)
    assert width <= MAX_WIDTH_PX
