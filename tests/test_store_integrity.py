"""No silent wrong result: each kind of damage to a feature store is named (store, array, shard) by
the loader and by `pipeline verify`; `verify --repair` + `extract-features` restores the exact bytes;
a lost shard file is redone by `extract-features` alone; a v2 store is refused with how to re-extract."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from pipeline.cli.app import main
from pipeline.data.synthetic import make_planted_coco
from pipeline.store.cache import CacheError, FeatureCache
from pipeline.store.create import create_or_open
from pipeline.store.integrity import unsound_shards
from pipeline.store.loader import TokenLoader

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def sets(tmp: Path, data: Path) -> list[str]:
    values = {"paths.data": data, "paths.cache": tmp / "cache", "paths.results": tmp / "results",
              "data.dataset": "synthetic", "backbone.name": "tiny-RN", "backbone.pretrained": "null",
              "backbone.image_size": SIZE, "backbone.device": "cpu", "backbone.channels_last": "false",
              "extract.num_workers": 0, "extract.shard_size": 4, "extract.views": 2,
              "extract.batch_size": 4}
    return ["--params", str(ROOT / "configs" / "params.yaml"),
            *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]]


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, an extracted val store: 10 images in shards of 4, 4, 2). The val split (one
    plain view) keeps this test independent of the augmentation code."""
    tmp = tmp_path_factory.mktemp("integrity")
    make_planted_coco(tmp / "data" / "synthetic", 2, 10, num_classes=4, image_size=SIZE)
    result = cli("extract-features", "--split", "val", *sets(tmp / "ref", tmp / "data"))
    assert result.exit_code == 0, result.output
    return tmp / "data", tmp / "ref" / "cache" / "features" / "val.zarr"


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def zero_tokens(c: FeatureCache) -> None:
    """Zero a token shard's data, its index kept."""
    f = c.shard_file(1)
    raw = f.read_bytes()
    index = 16 * c.shard_size * c.views + 4
    f.write_bytes(bytes(len(raw) - index) + raw[-index:])


def flip_chunk(c: FeatureCache) -> None:
    from pipeline.store.shards import ShardReader

    offset, nbytes = ShardReader(c).index(1)[3]  # image 7
    _flip(c.shard_file(1), int(offset + nbytes // 3))


DAMAGE: dict[str, tuple[Callable[[FeatureCache], None], str]] = {  # how, what the error names
    "zeroed token shard": (zero_tokens, "array tokens, shard 1"),
    "flipped token byte": (flip_chunk, "array tokens, shard 1"),
    "flipped index byte": (lambda c: _flip(c.shard_file(1), c.shard_file(1).stat().st_size - 9),
                           "array tokens, shard 1"),
    "deleted token shard": (lambda c: c.shard_file(1).unlink(), "array tokens, shard 1"),
    "truncated token shard": (lambda c: c.shard_file(1).write_bytes(c.shard_file(1).read_bytes()[:999]),
                              "array tokens, shard 1"),
    "deleted labels": (lambda c: c.chunk_file("labels").unlink(), "array labels"),
    "flipped labels byte": (lambda c: _flip(c.chunk_file("labels"), 3), "array labels"),
    "deleted ids": (lambda c: c.chunk_file("ids").unlink(), "array ids"),
    "deleted status chunk": (lambda c: c.chunk_file("status", 1).unlink(), "array status, shard 1"),
    "deleted text/positive": (lambda c: c.chunk_file("text/positive").unlink(), "text/positive"),
    "deleted text/raw_plain": (lambda c: c.chunk_file("text/raw_plain").unlink(), "text/raw_plain"),
}


def read_everything(store: Path, in_memory: bool) -> None:
    """What training reads: labels, valid images, every batch of an epoch, the text features."""
    cache = FeatureCache.open(store)
    loader = TokenLoader(cache, 3, seed=0, in_memory=in_memory)
    for _ in loader.epoch(0):
        pass
    for name in ("positive", "negative", "plain", "raw_positive", "raw_negative", "raw_plain"):
        cache.text_features(name)
    assert len(cache.ids) == cache.num_images


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_named_by_loader_and_verify_and_repaired_to_the_same_bytes(
        reference: tuple[Path, Path], tmp_path: Path, kind: str) -> None:
    data, ref = reference
    run = tmp_path / "run"
    store = run / "cache" / "features" / "val.zarr"
    shutil.copytree(ref, store)
    read_everything(store, in_memory=True)  # undamaged: reads
    damage, names = DAMAGE[kind]
    damage(FeatureCache.open(store))

    for in_memory in (True, False):
        with pytest.raises(CacheError) as err:
            read_everything(store, in_memory)
        assert str(store) in str(err.value) and names in str(err.value), str(err.value)

    args = sets(run, data)
    checked = cli("verify", "--split", "val", *args)
    assert checked.exit_code == 1 and "Traceback" not in checked.output, checked.output
    assert names in checked.output and str(store) in checked.output, checked.output
    repaired = cli("verify", "--split", "val", "--repair", *args)
    assert repaired.exit_code == 1 and "extract-features" in repaired.output, repaired.output
    redone = cli("extract-features", "--split", "val", *args)
    assert redone.exit_code == 0, redone.output
    extracted = int(redone.output.split("extracted ")[1].split()[0])
    assert extracted == (4 if "shard" in names else 0), redone.output  # exactly the damaged shard
    fa, fb = files(ref), files(store)
    assert fa.keys() == fb.keys() and [k for k in fa if fa[k] != fb[k]] == []
    ok = cli("verify", "--split", "val", *args)
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("kind", ["deleted token shard", "truncated token shard", "deleted status chunk"])
def test_extract_features_alone_redoes_a_lost_shard(reference, tmp_path: Path, kind: str) -> None:
    """A store marked complete is re-checked cheaply before "nothing to do" (was: extracted 0)."""
    data, ref = reference
    store = tmp_path / "run" / "cache" / "features" / "val.zarr"
    shutil.copytree(ref, store)
    DAMAGE[kind][0](FeatureCache.open(store))
    redone = cli("extract-features", "--split", "val", "--restart-on-change", *sets(tmp_path / "run", data))
    assert redone.exit_code == 0 and "extracted 4 images" in redone.output, redone.output
    assert "un-marking shard 1" in redone.output
    assert files(ref) == files(store)


def test_a_lost_status_chunk_is_named_alike_by_every_check(reference, tmp_path: Path) -> None:
    """verify (thorough), the resume recheck (cheap) and FeatureCache.status share one check."""
    _, ref = reference
    store = tmp_path / "val.zarr"
    shutil.copytree(ref, store)
    FeatureCache.open(store).chunk_file("status", 1).unlink()
    cache = FeatureCache.open(store)
    (_, cheap), (_, thorough) = unsound_shards(cache), unsound_shards(cache, thorough=True)
    with pytest.raises(CacheError) as err:
        _ = cache.status
    assert list(cheap) == list(thorough) == [1] and cheap[1] == thorough[1]
    assert f"{store}: array status, shard 1: image 4 " in cheap[1] and str(err.value).startswith(cheap[1])


def test_the_cheap_check_reads_one_chunk_per_shard_and_a_damaged_mark_counts_as_incomplete(reference, tmp_path) -> None:
    _, ref = reference
    store = tmp_path / "val.zarr"
    shutil.copytree(ref, store)
    flip_chunk(FeatureCache.open(store))  # a token chunk's crc32c fails, the shard index is intact
    _flip(FeatureCache.open(store).chunk_file("complete", 2), 0)
    complete, cheap = unsound_shards(FeatureCache.open(store))
    _, thorough = unsound_shards(FeatureCache.open(store), thorough=True)
    assert complete.tolist() == [True, True, False] and list(cheap) == [2]
    assert "array complete, shard 2" in cheap[2] and str(store) in cheap[2]
    assert sorted(thorough) == [1, 2] and "array tokens, shard 1" in thorough[1]


def test_version_2_store_is_refused_with_how_to_re_extract(reference, tmp_path: Path) -> None:
    _, ref = reference
    store = tmp_path / "old.zarr"
    shutil.copytree(ref, store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 2
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError) as err:
        FeatureCache.open(store)
    msg = str(err.value)
    assert "\n" not in msg and str(store) in msg and "version 2" in msg
    assert f"rm -r {store}" in msg and "--restart-on-change" in msg


def test_status_and_fill_values_cannot_pass_validation(tmp_path: Path) -> None:
    """Lost chunks read as values validation refuses, not as plausible data."""
    cache = create_or_open(tmp_path / "c.zarr", ids=["a", "b"], labels=np.zeros((2, 2)),
                                        classnames=["x", "y"], views=1, num_tokens=2, dim=2,
                                        fingerprint={}, shard_size=2)
    cache.write_shard(0, np.ones((2, 1, 2, 2)), np.zeros(2))
    cache.write_text_features({"positive": np.ones((2, 2))})
    for name in ("labels", "ids", "text/positive"):
        cache.chunk_file(name).unlink()
    cache.chunk_file("status", 0).unlink()
    cache.shard_file(0).unlink()
    with pytest.raises(CacheError, match="array ids"):
        FeatureCache.open(tmp_path / "c.zarr")  # opened for reading, ids and labels are checked
    c = FeatureCache(tmp_path / "c.zarr", "r", check=False)  # each array's own check, one by one
    assert c._labels[:].min() == -128 and c._ids[:].tolist() == ["", ""]
    assert np.isnan(c.tokens[:]).all() and np.isnan(c._group["text/positive"][:]).all()
    for read, array in ((lambda: c.labels, "labels"), (lambda: c.ids, "ids"), (lambda: c.valid, "status"),
                        (lambda: c.text_features("positive"), "text/positive"),
                        (lambda: c.read_shard(0), "tokens")):
        with pytest.raises(CacheError, match=f"array {array}"):
            read()
