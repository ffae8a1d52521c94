"""A store answers for its inputs: an image file replaced after extraction, images added to or
removed from a split, and edited annotations are seen (`verify --inputs`, the readers) and
brought up to date by `extract-features` (also with --restart-on-change, as dvc.yaml runs it),
re-extracting exactly the shards they touch, and the store ends byte-identical to a fresh
extraction of the new files. Through the CLI, on a copy of a small run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from store_world import (
    annotations,
    clear_error,
    cli,
    copy,
    edit_json,
    extracted,
    files,
    ok,
    sets,
    store,
)

from pipeline.data.classes import COCO_CATEGORY_IDS
from pipeline.data.synthetic import planted_sample


def val_image(run: Path, index: int) -> Path:
    return run / "data" / "synthetic" / "val2017" / f"{9 + index:012d}.jpg"  # val ids 9..16


def fresh(run: Path, tmp_path: Path, role: str) -> dict[str, bytes]:
    """The files of a fresh extraction of `role` from the run's data as it is now."""
    ok(cli("extract-features", "--split", role, *sets(run, paths__cache=tmp_path / "fresh")))
    return files(tmp_path / "fresh" / "features" / f"{role}.zarr")


def test_a_replaced_image_re_extracts_exactly_its_shard_byte_identical(store_world: Path,
                                                                       tmp_path: Path) -> None:
    run = copy(store_world, tmp_path / "run")
    image = val_image(run, 5)  # shard 1 (images 4..7)
    pixels = np.asarray(Image.open(image))[::-1].copy()  # other pixels, as a new download would be
    Image.fromarray(pixels).save(image, quality=95)
    listed = cli("verify", "--split", "val", "--inputs", *sets(run))
    clear_error(listed, "extract-features --split val")
    assert f"val image changed: {image}" in listed.output, listed.output
    redone = ok(cli("extract-features", "--split", "val", "--restart-on-change", *sets(run)))
    assert extracted(redone.output) == [4] and "shard 1 is extracted again" in redone.output, redone.output
    assert "image 5" in redone.output
    assert files(store(run, "val")) == fresh(run, tmp_path, "val")  # byte for byte
    assert "inputs: unchanged" in ok(cli("verify", "--split", "val", "--inputs", *sets(run))).output
    # a file whose bytes did not change (touched, or copied without its times) is read, not redone
    os.utime(val_image(run, 1), ns=(10**18, 10**18))
    again = ok(cli("extract-features", "--split", "val", *sets(run)))
    assert extracted(again.output) == [0], again.output


def _drop(data: dict, image_id: int) -> None:
    data["images"] = [i for i in data["images"] if i["id"] != image_id]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != image_id]


def _add(run: Path, data: dict) -> None:
    pixels, objects = planted_sample(7, "val", 99, 64, 4)
    Image.fromarray(pixels).save(val_image(run, 8), quality=95)  # id 17: after every other image
    data["images"].append({"id": 17, "file_name": val_image(run, 8).name, "height": 64, "width": 64})
    data["annotations"] += [{"id": 10_000 + k, "image_id": 17, "category_id": COCO_CATEGORY_IDS[o.cls],
                             "segmentation": [o.polygon], "area": float(o.side ** 2),
                             "bbox": [o.x0, o.y0, o.side, o.side], "iscrowd": 0}
                            for k, o in enumerate(objects)]


@pytest.mark.parametrize("change, redone", [("removed", 3), ("added", 1)])
def test_images_added_or_removed_re_extract_from_the_first_changed_shard(
        store_world: Path, tmp_path: Path, change: str, redone: int) -> None:
    run = copy(store_world, tmp_path / "run")
    if change == "removed":
        edit_json(annotations(run, "val"), lambda d: _drop(d, 14))  # image 5, in shard 1
    else:
        edit_json(annotations(run, "val"), lambda d: _add(run, d))  # image 8: a new shard 2
    listed = cli("verify", "--split", "val", "--inputs", *sets(run))
    clear_error(listed)
    assert f"val image {change}: id {14 if change == 'removed' else 17}" in listed.output, listed.output
    result = ok(cli("extract-features", "--split", "val", "--restart-on-change", *sets(run)))
    assert extracted(result.output) == [redone], result.output
    assert files(store(run, "val")) == fresh(run, tmp_path, "val")


def _relabel(data: dict) -> None:
    """Give the first image's first object a class that image does not have."""
    first = data["images"][0]["id"]
    have = {a["category_id"] for a in data["annotations"] if a["image_id"] == first}
    ann = next(a for a in data["annotations"] if a["image_id"] == first)
    ann["category_id"] = next(c for c in COCO_CATEGORY_IDS[:4] if c not in have)


def test_edited_annotations_are_refused_by_readers_and_refresh_the_labels_only(
        store_world: Path, tmp_path: Path) -> None:
    run = copy(store_world, tmp_path / "run")
    for role in ("train", "val"):
        edit_json(annotations(run, role), _relabel)
    clear_error(cli("train", *sets(run)), annotations(run, "train"), "changed since",
                "extract-features --split train")
    clear_error(cli("evaluate", "mlr", *sets(run)), annotations(run, "val"), "changed since",
                "extract-features --split val")
    listed = cli("verify", "--inputs", *sets(run))
    clear_error(listed)
    assert "annotation file changed: annotations/instances_val2017.json" in listed.output, listed.output
    result = ok(cli("extract-features", "--restart-on-change", *sets(run)))
    assert extracted(result.output) == [0, 0] and "refreshing the labels" in result.output, result.output
    assert files(store(run, "train")) == fresh(run, tmp_path, "train")
    labels = json.loads((store(run, "train") / "zarr.json").read_text())["attributes"]["digests"]
    assert labels != json.loads((store(store_world, "train") / "zarr.json").read_text())["attributes"]["digests"]
    ok(cli("train", *sets(run)))


def train_image(run: Path, index: int) -> Path:
    return run / "data" / "synthetic" / "train2017" / f"{1 + index:012d}.jpg"  # train ids 1..8


def test_readers_refuse_a_changed_image_and_pass_a_touched_one(store_world: Path, tmp_path: Path) -> None:
    """train and evaluate check the image files (a stat each, the bytes where it differs): one
    changed since extraction is refused, naming it and the command; the same bytes with a new
    mtime pass; without the dataset folder (stores copied to a machine without the images) they
    read the stores as they are."""
    run = copy(store_world, tmp_path / "run")
    for image in (train_image(run, 2), val_image(run, 1)):
        os.utime(image, ns=(10**18, 10**18))  # touched (or copied without times): same bytes
    ok(cli("evaluate", "mlr", *sets(run)))
    for image in (train_image(run, 6), val_image(run, 5)):
        pixels = np.asarray(Image.open(image))[::-1].copy()
        Image.fromarray(pixels).save(image, quality=95)
    clear_error(cli("train", *sets(run)), train_image(run, 6), "changed since",
                "extract-features --split train")
    clear_error(cli("evaluate", "mlr", *sets(run)), val_image(run, 5), "changed since",
                "extract-features --split val")
    (run / "data" / "synthetic").rename(run / "elsewhere")
    for command in (("evaluate", "mlr"), ("train",)):
        result = ok(cli(*command, *sets(run)))
        assert "changed since" not in result.output, result.output


def test_evaluate_mlr_checks_the_val_store_once(store_world: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Its params record and annotation files once, its image files once: require_current hands
    the store it checked to the evaluation."""
    from pipeline.extraction import expected

    run = copy(store_world, tmp_path / "run")
    seen: list[tuple[str, str]] = []
    params_check, images_check = expected.mismatch, expected.changed_images
    monkeypatch.setattr(expected, "mismatch", lambda fp, annotations, exp, where: seen.append(
        ("params", where)) or params_check(fp, annotations, exp, where))
    monkeypatch.setattr(expected, "changed_images", lambda cache, exp: seen.append(
        ("images", str(cache.path))) or images_check(cache, exp))
    ok(cli("evaluate", "mlr", *sets(run)))
    val = str(store(run, "val"))
    assert seen.count(("params", val)) == 1 and seen.count(("images", val)) == 1, seen
