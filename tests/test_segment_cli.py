"""`pipeline segment` and `pipeline query` write what the API computes, expand folders and globs,
and turn wrong inputs into one line naming what to fix."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from segment_world import CLASSES, TEMPLATE, world  # noqa: F401  (session fixture)

from pipeline.api.unmix import UnmixCLIP
from pipeline.cli.app import main
from pipeline.config.params import ParamError
from pipeline.data.images import BadImageError
from pipeline.data.synthetic import make_bad_images
from pipeline.model.backbone import load_backbone
from stages.segment import expand_images, read_label_png

QUERIED = ["person", "car", "bus"]
PARAMS = Path(__file__).resolve().parents[1] / "configs" / "params.yaml"


def _invoke(world, *args: str) -> object:
    result = CliRunner().invoke(main, [*args, "--params", str(world["params_file"]),
                                       "--projectors", str(world["projectors"])])
    return result


def test_cli_writes_exactly_what_the_api_computes(world, tmp_path):
    out = tmp_path / "out"
    files = world["files"][:6]  # batches of 5 and 1
    run = _invoke(world, "segment", str(world["images_dir"] / "planted_0[0-5].png"), "--classes", ",".join(QUERIED),
                  "--background", "max-score", "--threshold", "0.7", "--template", TEMPLATE,
                  "--out", str(out))
    assert run.exit_code == 0, run.output
    model = UnmixCLIP.from_files(world["projectors"], checkpoint=world["checkpoint"], device="cpu",
                                 image_size=world["params"].evaluate.seg.image_size,
                                 batch_size=world["params"].evaluate.batch_size)
    api = model.segment(files, QUERIED, background="max-score", threshold=0.7, template=TEMPLATE)
    for i, path in enumerate(files):
        np.testing.assert_array_equal(read_label_png(out / f"{path.stem}_labels.png"), api.label_maps[i])
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert record["image_scores"] == {c: float(s) for c, s in zip(QUERIED, api.image_scores[i])}
        assert record["pixel_fractions"] == api.pixel_fractions(i)
        assert record["labels"] == {"0": "background", "1": "person", "2": "car", "3": "bus"}
        with Image.open(out / f"{path.stem}_overlay.png") as png:
            assert png.format == "PNG" and png.width > png.height > 300  # 4 columns, 3 class rows
    with Image.open(out / f"{world['files'][0].stem}_labels.png") as png:
        assert png.mode == "P"


def test_batch_statistics_print_that_scores_depend_on_the_class_list(world, tmp_path):
    args = ("segment", str(world["files"][0]), "--template", TEMPLATE, "--out", str(tmp_path),
            "--text-bn", "batch")
    one = _invoke(world, *args, "--classes", "person")
    assert one.exit_code == 1 and "at least 2" in one.output
    two = _invoke(world, *args, "--classes", "person", "--classes", "car")
    assert two.exit_code == 0, two.output
    assert "depends on the whole class list" in two.output


def test_query_reports_text_cosines_before_and_after_projection(world, tmp_path):
    run = _invoke(world, "query", str(world["files"][1]), "--text", "person", "--against", "car,zebra",
                  "--template", TEMPLATE, "--out", str(tmp_path))
    assert run.exit_code == 0, run.output
    stem = world["files"][1].stem  # <image stem>_query_<text>: another image's query never overwrites it
    record = json.loads((tmp_path / f"{stem}_query_person.json").read_text())
    raw = F.normalize(world["backbone"].text_features([TEMPLATE.format(c) for c in
                                                      ("person", "car", "zebra")]), dim=-1)
    with torch.no_grad():
        projected = world["head"].project_text(raw, stats="running")
    for k, c in enumerate(("car", "zebra"), start=1):
        assert record["cosine"][c]["clip"] == pytest.approx(float(raw[0] @ raw[k]), abs=1e-5)
        assert record["cosine"][c]["ours"] == pytest.approx(float(projected[0] @ projected[k]), abs=1e-5)
        assert c in run.output
    with Image.open(tmp_path / f"{stem}_query_person.png") as png:
        assert png.format == "PNG" and png.width > png.height  # image | CLIP | ours


def test_a_backbone_with_other_weights_is_one_line_naming_both_digests(world, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(load_backbone("tiny-RN", pretrained=None, init_seed=3).model.state_dict(), other)
    run = _invoke(world, "segment", str(world["files"][0]), "--classes", "person,car",
                  "--set", f"backbone.checkpoint={other}", "--out", str(tmp_path))
    assert run.exit_code == 1
    line = run.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and world["digest"] in line and "backbone.checkpoint" in line


@pytest.mark.parametrize("classes, message", [(",", "no classes"), ("dog,,cat", "empty class name")])
def test_bad_class_lists_are_one_line_errors(world, tmp_path, classes, message):
    run = _invoke(world, "segment", str(world["files"][0]), "--classes", classes, "--out", str(tmp_path))
    assert run.exit_code == 1 and message in run.output and "Traceback" not in run.output


def test_a_corrupt_image_is_named(world, tmp_path):
    bad = make_bad_images(tmp_path / "bad")["corrupt_png"]
    run = _invoke(world, "segment", str(bad), "--classes", "person,car", "--out", str(tmp_path))
    assert run.exit_code == 1 and str(bad) in run.output


def test_folders_globs_and_files_expand_in_order(world, tmp_path):
    folder = world["images_dir"]
    assert expand_images([str(folder)]) == world["files"]
    assert expand_images([str(folder / "planted_0[12].png"), str(world["files"][0])]) == \
        [world["files"][1], world["files"][2], world["files"][0]]
    with pytest.raises(ParamError, match="no image matches"):
        expand_images([str(tmp_path / "*.jpg")])
    with pytest.raises(BadImageError, match="no such file"):
        expand_images([str(folder), str(tmp_path / "missing.jpg")])


def test_chunks_shrink_when_many_classes_would_not_fit_in_memory():
    from stages.segment import MAP_BUDGET_BYTES, TYPICAL_PIXELS, chunk_size

    assert chunk_size(16, 3) == 16
    per_image = 4 * 80 * 3 * TYPICAL_PIXELS
    assert chunk_size(16, 80) == MAP_BUDGET_BYTES // per_image and 1 <= chunk_size(16, 80) < 16
    assert chunk_size(16, 254) >= 1


@pytest.mark.parametrize("args", [
    ["segment", "x.png", "--classes", "person, Person"],
    ["segment", "x.png", "--classes", "dog", "--classes", "traffic light,Traffic  Light"],
    ["query", "x.png", "--text", "person", "--against", "car,PERSON"]])
def test_class_names_the_tokenizer_reads_alike_are_refused_before_any_model(args, tmp_path):
    """`segment --classes "person, Person"` exited 0 with label 2 never assigned: both names are
    one prompt to open_clip's tokenizer (lower case, whitespace collapsed)."""
    result = CliRunner().invoke(main, [*args, "--params", str(PARAMS), "--out", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "the same text to CLIP's tokenizer" in errors[0] and "keep one" in errors[0]
    assert not list(tmp_path.iterdir())
