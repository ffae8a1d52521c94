"""A chunk answers for its place and its store: swapped or foreign token shards, an edited
fingerprint, a store copied under the other role's name, a labels chunk of another store and a
damaged `zarr.json` are each one clear error (never a number from the wrong images), and the
repairs end byte-identical to the store as extracted. Through the CLI, on a copy of a small run."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from store_world import (
    clear_error,
    cli,
    copy,
    extracted,
    files,
    ok,
    sets,
    store,
)


def test_swapped_token_shard_files_are_refused_then_redone(store_world: Path, tmp_path: Path) -> None:
    run = copy(store_world, tmp_path)
    train = store(run, "train")
    before = files(train)
    a, b = (train / "tokens" / "c" / str(s) / "0" / "0" / "0" for s in (0, 1))
    a.rename(tmp_path / "shard0")
    b.rename(a)
    (tmp_path / "shard0").rename(b)  # same size: both full shards; each passes its own crc32c
    clear_error(cli("verify", "--split", "train", *sets(run)), train, "array tokens, shard 0",
                "image 0 view 0", "not this store's chunk")
    clear_error(cli("train", *sets(run)), train, "array tokens, shard", "not this store's chunk")
    redone = ok(cli("extract-features", "--split", "train", *sets(run)))  # the cheap recheck sees it
    assert "un-marking shard 0" in redone.output and extracted(redone.output) == [8], redone.output
    assert files(train) == before


def test_a_shard_of_a_store_extracted_with_another_seed_is_refused(store_world: Path, tmp_path: Path) -> None:
    run = copy(store_world, tmp_path / "run")
    other = copy(store_world, tmp_path / "other")
    shutil.rmtree(store(other, "train"))
    ok(cli("extract-features", "--split", "train", *sets(other, extract__seed=1)))
    foreign = store(other, "train") / "tokens" / "c" / "1" / "0" / "0" / "0"
    mine = store(run, "train") / "tokens" / "c" / "1" / "0" / "0" / "0"
    assert foreign.stat().st_size == mine.stat().st_size and foreign.read_bytes() != mine.read_bytes()
    shutil.copyfile(foreign, mine)
    clear_error(cli("verify", "--split", "train", *sets(run)), "array tokens, shard 1", "image 4 view 0",
                "not this store's chunk", "verify --repair")
    clear_error(cli("train", *sets(run)), store(run, "train"), "array tokens, shard 1")
    # the shard's keys chunk copied too: still another store's (another store id)
    shutil.copyfile(store(other, "train") / "keys" / "c" / "1" / "0", store(run, "train") / "keys" / "c" / "1" / "0")
    clear_error(cli("verify", "--split", "train", *sets(run)), "array tokens, shard 1", "image 4 view 0")


def _edit_fingerprint(path: Path, seed: int, store_id: bool) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    attrs = meta["attributes"]
    attrs["fingerprint"]["seed"] = seed
    if attrs["fingerprint"].get("params"):
        attrs["fingerprint"]["params"]["extract.seed"] = seed
    if store_id:  # a forger who also recomputes the recorded store id
        settings = {k: v for k, v in attrs["fingerprint"].items() if k != "inputs"}
        text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        attrs["store_id"] = hashlib.sha256(text.encode()).hexdigest()
    (path / "zarr.json").write_text(json.dumps(meta, indent=2))


def test_an_edited_fingerprint_is_refused_by_extract_features_verify_and_train(
        store_world: Path, tmp_path: Path) -> None:
    run = copy(store_world, tmp_path)
    train = store(run, "train")
    _edit_fingerprint(train, 1, store_id=False)  # as if extracted with seed 1
    seed1 = sets(run, extract__seed=1)
    clear_error(cli("extract-features", "--split", "train", *seed1), train / "zarr.json",
                "does not give the store id", "rm -r")
    clear_error(cli("verify", "--split", "train", *seed1), train / "zarr.json")
    clear_error(cli("train", *seed1), train / "zarr.json")
    # store id recomputed as well: every chunk's key then fails, naming array and image view
    _edit_fingerprint(train, 1, store_id=True)
    clear_error(cli("verify", "--split", "train", *seed1), "array tokens, shard 0", "image 0 view 0",
                "not this store's chunk")
    clear_error(cli("train", *seed1), "array tokens, shard", "not this store's chunk")
    redone = ok(cli("extract-features", "--split", "train", *seed1))  # every shard: not "0 images"
    assert extracted(redone.output) == [8], redone.output
    ok(cli("verify", "--split", "train", *seed1))


def test_a_train_store_copied_as_the_val_store_is_refused(store_world: Path, tmp_path: Path) -> None:
    run = copy(store_world, tmp_path)
    shutil.rmtree(store(run, "val"))
    shutil.copytree(store(run, "train"), store(run, "val"))  # cp -a train.zarr val.zarr
    for args in (["train"], ["evaluate", "mlr"], ["verify", "--split", "val"]):
        clear_error(cli(*args, *sets(run)), store(run, "val"), "role: store 'train', params 'val'",
                    "extract-features --split val")


def test_a_val_labels_chunk_copied_over_the_train_store_is_refused_and_repaired(
        store_world: Path, tmp_path: Path) -> None:
    run = copy(store_world, tmp_path)
    train, val = store(run, "train"), store(run, "val")
    before = files(train)
    chunk = Path("labels") / "c" / "0" / "0"
    assert (val / chunk).read_bytes() != (train / chunk).read_bytes()  # same shape, other labels
    shutil.copyfile(val / chunk, train / chunk)
    clear_error(cli("verify", "--split", "train", *sets(run)), train, "array labels", "digest")
    clear_error(cli("train", *sets(run)), train, "array labels", "digest")
    clear_error(cli("verify", "--split", "train", "--repair", *sets(run)), "extract-features")
    redone = ok(cli("extract-features", "--split", "train", *sets(run)))  # labels from the dataset
    assert extracted(redone.output) == [0], redone.output
    assert files(train) == before


@pytest.mark.parametrize("meta", ["zarr.json", "tokens/zarr.json", "labels/zarr.json", "ids/zarr.json",
                                  "status/zarr.json", "complete/zarr.json", "text/positive/zarr.json"])
def test_a_truncated_zarr_json_is_one_line_naming_the_file(store_world: Path, tmp_path: Path,
                                                         meta: str) -> None:
    run = copy(store_world, tmp_path)
    path = store(run, "train") / meta
    path.write_bytes(path.read_bytes()[:40])
    for args in (["verify", "--split", "train"], ["train"]):
        clear_error(cli(*args, *sets(run)), path, "rm -r", "extract-features")
