"""Every configured dataset is checked before any work; a missing evaluation dataset fails in the
data stage naming its parameter, or is skipped and recorded under `evaluate.missing: skip`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config.params import DEFAULT_PARAMS, load_params
from pipeline.config.schema import Params
from pipeline.data import datacheck
from pipeline.data.datasets import DatasetError, load_multilabel
from pipeline.data.synthetic import make_planted_coco
from pipeline.results import skips

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, *overrides: str) -> Params:
    return load_params(ROOT / DEFAULT_PARAMS, [f"paths.data={tmp_path / 'data'}",
                                               f"paths.results={tmp_path / 'results'}",
                                               f"paths.cache={tmp_path / 'cache'}", *overrides])


@pytest.fixture(scope="module")
def placed(tmp_path_factory) -> Path:
    """A COCO-2017-layout dataset placed by hand under <tmp>/data/coco2017."""
    root = tmp_path_factory.mktemp("placed")
    make_planted_coco(root / "data" / "coco2017", n_train=4, n_val=4, num_classes=80, image_size=32)
    return root


def test_layout_check_agrees_with_the_reader(placed):
    root = placed / "data" / "coco2017"
    assert datacheck.layout_problem("coco2017", root, "val") is None
    assert len(load_multilabel("coco2017", root, "val")) == 4  # the reader accepts what the check does
    problem = datacheck.layout_problem("coco2017", root, "train2")
    assert "instances_train22017.json" in problem
    with pytest.raises(DatasetError):
        load_multilabel("coco2017", root, "train2")
    voc = placed / "voc"
    (voc / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation").mkdir(parents=True)
    assert "val.txt" in datacheck.layout_problem("voc2012", voc, "val")


def test_every_configured_dataset_is_named_with_its_parameter(placed):
    params = _params(placed, "data.dataset=coco2017", "evaluate.seg.datasets=[coco2017,voc2012]",
                     "evaluate.zs_mlr.dataset=voc2007")
    problems = datacheck.check_datasets(params)
    assert {(p.need.dataset, p.need.param) for p in problems} == {
        ("voc2012", "evaluate.seg.datasets"), ("voc2007", "evaluate.zs_mlr.dataset")}
    assert all("evaluate.missing: skip" in str(p) for p in problems)


def test_missing_evaluation_dataset_fails_the_data_stage_before_any_work(tmp_path, monkeypatch):
    from stages import download

    def no_download(*args, **kwargs):
        raise AssertionError("the data stage fetched before checking the evaluation datasets")

    monkeypatch.setattr(download, "download_dataset", no_download)
    params = _params(tmp_path, "data.dataset=coco2014", "evaluate.seg.datasets=[voc2012]",
                     "evaluate.zs_mlr.dataset=coco2014")
    with pytest.raises(DatasetError, match="evaluate.seg.datasets") as err:
        download.run(params)
    assert "voc2012" in str(err.value) and "evaluate.zs_mlr.dataset" in str(err.value)
    assert not (tmp_path / "data").exists()  # nothing was written, nothing fetched


def test_placed_dataset_is_used_as_is(placed, monkeypatch, capsys):
    from stages import download

    monkeypatch.setattr(download, "download_dataset",
                        lambda *a, **k: pytest.fail("downloaded a dataset that was in place"))
    params = _params(placed, "data.dataset=coco2017", "evaluate.seg.datasets=[coco2017]",
                     "evaluate.zs_mlr.dataset=coco2017", "evaluate.zs_mlr.split=val")
    assert download.run(params)["skipped"] == []
    assert "in place" in capsys.readouterr().out


def test_skip_evaluates_what_is_present_and_records_the_rest(placed, capsys):
    params = _params(placed, "data.dataset=coco2017", "evaluate.missing=skip",
                     "evaluate.seg.datasets=[voc2012,coco2017]", "evaluate.zs_mlr.dataset=voc2007")
    kept_params, kept = skips.for_evaluation(params, ["mlr", "seg", "zs-mlr", "figures"])
    assert kept == ["mlr", "seg", "figures"]  # seg skips voc2012 itself; zs-mlr has nothing left
    assert kept_params.evaluate.seg.datasets == ["coco2017"]  # figures: first on disk
    assert params.evaluate.seg.datasets == ["voc2012", "coco2017"]  # caller's params untouched
    out = capsys.readouterr().out
    assert "skipping voc2012 for seg" in out and "skipping voc2007 for zs-mlr" in out
    details = json.loads((placed / "results" / "details" / "zs-mlr.json").read_text())
    assert details["skipped"] == ["voc2007"]
    assert json.loads((placed / "results" / "metrics" / "zs-mlr.json").read_text()) == {}
    assert "Skipped: voc2007" in (placed / "results" / "tables" / "zs-mlr.md").read_text()


def test_error_mode_leaves_the_evaluation_to_name_what_went_missing(placed):
    params = _params(placed, "data.dataset=coco2017", "evaluate.seg.datasets=[context59]")
    assert skips.for_evaluation(params, ["seg", "mlr"]) == (params, ["seg", "mlr"])
    with pytest.raises(DatasetError, match="context59.*evaluate.seg.datasets"):
        datacheck.require_datasets(params, whats=["seg"], training=False)
