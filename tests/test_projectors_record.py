"""A projectors file's own record (meta["use"]) makes it usable anywhere: `pipeline segment` /
`query` with --projectors (or --run) from any directory with no params file, and
`UnmixCLIP.from_files(path)`, take the same defaults from it; the maps are open-vocabulary by
default (running text BatchNorm statistics), and missing or wrong weights name the expected file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from segment_world import CLASSES, TEMPLATE, world  # noqa: F401  (session fixture)

from pipeline.api.unmix import UnmixCLIP
from pipeline.cli.app import main
from pipeline.config.params import ParamError
from pipeline.errors import TrainingError
from pipeline.model.backbone import load_backbone
from pipeline.model.projectors import load_projectors, read_state
from pipeline.model.weights import WeightsError, sha256_file
from stages.segment import model_from_params, read_label_png

QUERIED = ["person", "car", "bus"]


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """A working directory with no params file and nothing of the run's."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_the_record_holds_what_training_used(world):
    use = read_state(world["recorded"])["meta"]["use"]
    assert use["projectors"] == "cache/models/projectors-best.pt"  # relative to the project root
    assert use["backbone"]["checkpoint"] == "backbone.pt" and use["backbone"]["sha256"] == world["digest"]
    assert use["templates"] == [TEMPLATE] and use["image_size"] == world["params"].evaluate.seg.image_size
    assert use["background"] == world["params"].evaluate.seg.background == "softmax"
    assert use["tokens"] == {"train": "vproj", "seg": "vv"} and use["recipe"] == "paper"
    bn = read_state(world["recorded_bn"])["meta"]["use"]["backbone"]
    assert bn["checkpoint"] is None and bn["weights_digest"].startswith("random:0+bn:")
    bn_file = world["recorded_bn"].parents[2] / bn["bn_file"]["path"]
    assert bn["bn_file"]["sha256"] == sha256_file(bn_file)


def test_cli_and_api_give_identical_maps_and_scores_with_defaults(world, elsewhere):
    """No argument but the file on either side: the record's defaults (softmax background, the
    training prompt, image size), which differ from the constructor's own, on both."""
    files = world["files"][:6]
    run = cli("segment", *map(str, files), "--classes", ",".join(QUERIED), "--projectors",
              str(world["recorded"]), "--out", "out")
    assert run.exit_code == 0, run.output
    api = UnmixCLIP.from_files(world["recorded"])
    assert api.background == "softmax" and api.templates == [TEMPLATE]
    result = api.segment(files, QUERIED, methods=("clip", "clip-vv"))
    for i, path in enumerate(files):
        np.testing.assert_array_equal(read_label_png(elsewhere / "out" / f"{path.stem}_labels.png"),
                                      result.label_maps[i])
        record = json.loads((elsewhere / "out" / f"{path.stem}.json").read_text())
        assert record["background"] == "softmax" and record["templates"] == [TEMPLATE]
        assert record["text_bn"] == "running"
        np.testing.assert_allclose([record["image_scores"][c] for c in QUERIED], result.image_scores[i],
                                   rtol=0, atol=1e-6)
    cli_model = model_from_params(None, world["recorded"])  # the model `segment` computes with
    again = cli_model.segment(files, QUERIED, methods=("clip", "clip-vv"))
    for m in ("clip", "clip-vv", "ours"):
        for a, b in zip(again.method_score_maps[m], result.method_score_maps[m]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_one_class_segment_and_query_work(world, elsewhere):
    image = str(world["files"][0])
    seg = cli("segment", image, "--classes", "person", "--projectors", str(world["recorded"]), "--out", "s")
    assert seg.exit_code == 0, seg.output
    assert json.loads((elsewhere / "s" / f"{world['files'][0].stem}.json").read_text())["classes"] == ["person"]
    query = cli("query", image, "--text", "person", "--projectors", str(world["recorded"]), "--out", "q")
    assert query.exit_code == 0, query.output
    stem = world["files"][0].stem
    assert json.loads((elsewhere / "q" / f"{stem}_query_person.json").read_text())["against"] == []


def test_adding_a_name_does_not_change_a_class_map_with_defaults(world, elsewhere):
    model = UnmixCLIP.from_files(world["recorded"])
    methods = ("clip", "clip-vv", "ours")
    alone = model.segment(world["files"][:3], ["person"], methods=methods)
    more = model.segment(world["files"][:3], ["person", "car", "zebra"], methods=methods)
    for m in methods:  # the same numbers up to float32 order (other matrix shapes): ~1e-6 of [0, 1]
        for a, b in zip(alone.method_score_maps[m], more.method_score_maps[m]):
            np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(alone.image_scores[:, 0], more.image_scores[:, 0], rtol=0, atol=1e-5)
    scores = []
    for against in ("car", "car,zebra"):
        run = cli("query", str(world["files"][1]), "--text", "person", "--against", against,
                  "--projectors", str(world["recorded"]), "--out", against)
        assert run.exit_code == 0, run.output
        written = elsewhere / against / f"{world['files'][1].stem}_query_person.json"
        scores.append(json.loads(written.read_text())["image_score"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)
    batch = UnmixCLIP.from_files(world["recorded"], text_bn="batch")  # the released scripts' view
    two = batch.segment(world["files"][:3], ["person", "car"], methods=methods)
    three = batch.segment(world["files"][:3], ["person", "car", "zebra"], methods=methods)
    moved = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(two.score_maps, three.score_maps))
    assert moved > 1e-3  # 100x the tolerance above: with batch statistics the other names matter


def test_a_random_backbone_is_rebuilt_from_the_recorded_batchnorm_file(world, elsewhere):
    """The README's CPU trial: random init + recalibrated BatchNorm; the record names the
    statistics file, and the maps are those of the checkpoint holding the same weights."""
    model = UnmixCLIP.from_files(world["recorded_bn"])
    assert model.backbone.weights_digest == world["backbone"].weights_digest
    reference = UnmixCLIP.from_files(world["recorded"])
    a = model.segment(world["files"][:2], QUERIED)
    b = reference.segment(world["files"][:2], QUERIED)
    for x, y in zip(a.score_maps, b.score_maps):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    run = cli("segment", str(world["files"][0]), "--classes", "person,car", "--projectors",
              str(world["recorded_bn"]), "--out", "out")
    assert run.exit_code == 0, run.output


def _copy_run(world, tmp_path: Path, which: str) -> tuple[Path, dict]:
    """The run's projectors copied to a project of their own (as recorded), without the weights."""
    source = world[which]
    use = read_state(source)["meta"]["use"]
    root = tmp_path / "moved"
    target = root / use["projectors"]
    target.parent.mkdir(parents=True)
    shutil.copy(source, target)
    return target, use


def test_weights_not_where_recorded_are_named_with_their_sha256_and_option(world, tmp_path, elsewhere):
    path, use = _copy_run(world, tmp_path, "recorded")
    expected = path.parents[2] / "backbone.pt"
    with pytest.raises(WeightsError) as err:
        UnmixCLIP.from_files(path)
    assert str(expected) in str(err.value) and world["digest"] in str(err.value)
    run = cli("segment", str(world["files"][0]), "--classes", "person", "--projectors", str(path))
    assert run.exit_code == 1 and "--checkpoint PATH" in run.output and world["digest"] in run.output
    ok = cli("segment", str(world["files"][0]), "--classes", "person", "--projectors", str(path),
             "--checkpoint", str(world["checkpoint"]), "--out", "out")
    assert ok.exit_code == 0, ok.output

    path, use = _copy_run(world, tmp_path / "bn", "recorded_bn")
    bn = use["backbone"]["bn_file"]
    with pytest.raises(WeightsError) as err:
        UnmixCLIP.from_files(path)
    assert str(path.parents[2] / bn["path"]) in str(err.value) and bn["sha256"] in str(err.value)
    given = UnmixCLIP.from_files(path, checkpoint=world["recorded_bn"].parents[2] / bn["path"])
    assert given.backbone.weights_digest == world["backbone"].weights_digest


def test_a_backbone_that_does_not_match_names_the_file_expected(world, tmp_path, elsewhere):
    other = tmp_path / "other.pt"
    torch.save(load_backbone("tiny-RN", pretrained=None, init_seed=3).model.state_dict(), other)
    run = cli("segment", str(world["files"][0]), "--classes", "person,car", "--projectors",
              str(world["recorded"]), "--checkpoint", str(other), "--out", "out")
    assert run.exit_code == 1
    line = run.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and world["digest"] in line and sha256_file(other) in line
    assert str(world["checkpoint"]) in line and "--checkpoint" in line


def test_a_run_directory_gives_its_projectors(world, tmp_path, elsewhere):
    """--run DIR: DIR/configs/params.yaml with paths relative to DIR (as `pipeline demo` writes)."""
    run_dir = tmp_path / "run"
    (run_dir / "configs").mkdir(parents=True)
    models = run_dir / "cache" / "models"
    models.mkdir(parents=True)
    shutil.copy(world["recorded"], models / "projectors.pt")  # the recipe (paper) reads the last epoch
    text = world["params_file"].read_text()
    for key, value in world["params"].paths.model_dump().items():
        text = text.replace(value, key)  # relative paths, as demo/configs/params.yaml
    (run_dir / "configs" / "params.yaml").write_text(text)
    result = cli("segment", str(world["files"][0]), "--classes", "person,car", "--run", str(run_dir),
                 "--checkpoint", str(world["checkpoint"]))
    assert result.exit_code == 0, result.output
    assert f"projectors: {models / 'projectors.pt'}" in result.output
    assert (run_dir / "results" / "segment" / f"{world['files'][0].stem}.json").is_file()
    missing = cli("segment", str(world["files"][0]), "--classes", "person", "--run", str(tmp_path))
    assert missing.exit_code == 1 and "configs/params.yaml" in missing.output


def test_no_projectors_and_no_params_is_one_line(world, elsewhere):
    run = cli("segment", str(world["files"][0]), "--classes", "person")
    assert run.exit_code == 1 and "--projectors" in run.output and "Traceback" not in run.output


def test_a_file_that_is_not_a_projectors_file_says_so(world, tmp_path):
    readme = Path(__file__).resolve().parents[1] / "README.md"
    with pytest.raises(TrainingError, match="is not a projectors file") as err:
        load_projectors(readme)
    assert "damaged" not in str(err.value)
    run = cli("segment", str(world["files"][0]), "--classes", "person", "--projectors", str(readme))
    assert run.exit_code == 1 and "not a projectors file" in run.output and "damaged" not in run.output
    cut = tmp_path / "projectors.pt"  # what torch.save wrote, cut short: damaged
    cut.write_bytes(world["recorded"].read_bytes()[:-100])
    with pytest.raises(TrainingError, match="damaged"):
        load_projectors(cut)
    # bytes torch's weights-only unpickler meets with a KeyError ("hi": a memo read) or other errors
    for name, data in (("hi.pt", b"hi\n"), ("noise.pt", bytes(range(256)) * 4), ("text.pt", b"{}")):
        other = tmp_path / name
        other.write_bytes(data)
        with pytest.raises(TrainingError, match="is not a projectors file"):
            load_projectors(other)
        run = cli("segment", str(world["files"][0]), "--classes", "person", "--projectors", str(other))
        assert run.exit_code == 1 and "not a projectors file" in run.output, run.output
        assert "Traceback" not in run.output
    legacy = tmp_path / "legacy.pt"  # a pickle stream (torch.save's pre-1.6 format) cut short: damaged
    torch.save({"head": {}, "meta": {}}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-20])
    with pytest.raises(TrainingError, match="damaged"):
        load_projectors(legacy)


def test_the_api_takes_a_list_of_names_and_refuses_a_comma_string(world):
    model = UnmixCLIP.from_files(world["recorded"])
    with pytest.raises(ParamError, match="one string with commas"):
        model.segment(world["files"][:1], "person,dog")
    assert model.segment(world["files"][:1], "person").classes == ["person"]


@pytest.mark.slow
def test_after_the_demo_its_projectors_segment_a_photo_from_anywhere(tmp_path, monkeypatch):
    """`pipeline demo`, then from another directory `segment --projectors
    demo/cache/models/projectors-best.pt` alone (no params file, no --checkpoint), and `--run demo`."""
    from PIL import Image

    from pipeline.data.synthetic import planted_sample
    from stages import demo

    demo.run(tmp_path / "demo")
    photo = tmp_path / "photo.jpg"
    Image.fromarray(planted_sample(7, "val", 0, 120, 8)[0]).resize((160, 120)).save(photo, quality=90)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    projectors = Path("..") / "demo" / "cache" / "models" / "projectors-best.pt"
    run = cli("segment", "../photo.jpg", "--classes", "person,car", "--projectors", str(projectors),
              "--out", "out")
    assert run.exit_code == 0, run.output
    record = json.loads((elsewhere / "out" / "photo.json").read_text())
    assert (record["height"], record["width"]) == (120, 160) and record["classes"] == ["person", "car"]
    query = cli("query", "../photo.jpg", "--text", "person", "--run", "../demo")
    assert query.exit_code == 0, query.output
    assert (tmp_path / "demo" / "results" / "query" / "photo_query_person.json").is_file()
