"""Stage `verify`: read every complete shard of the feature stores and check it; `--repair`
un-marks the damaged shards so the next `extract-features` recomputes exactly those.

Checked: every token chunk's and shard index's crc32c and every chunk's key (this store's chunk
for its image and view), tokens finite, every image view present; labels in {-1, 0, 1} and ids
non-empty, both with their recorded digests; status 0/1 in complete shards; the completion marks
and input records readable; text features present and finite; the fingerprint against the
current params and annotation files (pipeline/extraction/expected.py). `--inputs` also lists the
images added, removed or changed since extraction (pipeline/extraction/inputs.py). Labels, ids
and text features are rewritten by `extract-features` itself (from the dataset and the
backbone), byte for byte as at creation.
Parameters read: paths.cache, and what expected_fingerprint and (--inputs) the dataset need.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from pipeline.config.schema import Params
from pipeline.extraction.expected import Expected, expected_fingerprint, mismatch
from pipeline.extraction.inputs import input_report
from pipeline.store.cache import RAW_TEXT_NAMES, REPAIR, TEXT_NAMES, CacheError, FeatureCache
from pipeline.store.identity import digest
from pipeline.store.integrity import unsound_shards
from pipeline.store.lock import StoreLock, check_not_written


def _digest_checked(cache: FeatureCache, name: str) -> None:
    if digest(name, getattr(cache, name)) != cache.digests.get(name):
        cache.check_digests()  # raises, naming the array


def check_store(cache: FeatureCache, expected: Expected | None = None) -> dict[str, Any]:
    """{"complete": [...], "damaged": {shard: why}, "metadata": {array: why}, "params": what
    differs from `expected` (the current params and annotation files) or None} of one store."""
    complete, damaged = unsound_shards(cache, thorough=True)
    metadata: dict[str, str] = {}
    readers: list[tuple[str, Callable[[], Any]]] = [
        ("labels", lambda: _digest_checked(cache, "labels")),
        ("ids", lambda: _digest_checked(cache, "ids")),
        *((f"text/{n}", lambda n=n: cache.text_features(n)) for n in TEXT_NAMES + RAW_TEXT_NAMES)]
    for name, read in readers:
        try:
            read()
        except CacheError as err:
            metadata[name] = str(err)
    problem = mismatch(cache.fingerprint, cache.annotation_files, expected, str(cache.path)) \
        if expected is not None else None
    return {"complete": complete, "damaged": damaged, "metadata": metadata, "params": problem}


def input_lines(role: str, cache: FeatureCache, report: dict[str, Any]) -> list[str]:
    """One line per change of a store's inputs (verify --inputs)."""
    lines = [f"  {role} image changed: {p}" for p in report["changed"]]
    lines += [f"  {role} image {what}: id {i}" for what in ("added", "removed") for i in report[what]]
    lines += [f"  {role} annotation file changed: {n} (under the dataset root)" for n in report["annotations"]]
    if report["moved_from"] is not None:
        lines.append(f"  {role}: the image list differs from position {report['moved_from']} on "
                     f"(shards {report['moved_from'] // cache.shard_size}.. are extracted again)")
    return lines


def unmark_damaged(cache: FeatureCache, report: dict[str, Any]) -> None:
    """Un-mark each damaged shard (the next extract-features redoes it, and only it)."""
    for s in report["damaged"]:
        cache.unmark(s)


def _row(role: str, cache: FeatureCache, report: dict[str, Any]) -> str:
    done, bad = int(report["complete"].sum()), report["damaged"]
    which = ", ".join(str(s) for s in sorted(bad)) or "-"
    meta = ", ".join(report["metadata"]) or "-"
    return (f"{role:<6} {cache.path!s:<40} {cache.num_shards:>6} {done - len(bad):>6} "
            f"{len(bad):>8} {cache.num_shards - done:>10}  {which:<16} {meta}")


def run(params: Params, split: str = "all", repair: bool = False, inputs: bool = False) -> dict[str, Any]:
    """Check the train and/or val stores; raise CacheError (exit 1) when any is damaged (or, with
    `inputs`, when an input changed since extraction)."""
    roles = ["train", "val"] if split == "all" else [split]
    rows: list[str] = []
    details: list[str] = []
    summary: dict[str, dict[str, Any]] = {}
    changes: list[str] = []
    mismatched: list[str] = []
    reports: list[dict[str, Any]] = []
    for role in roles:
        expected = expected_fingerprint(params, role)
        store = expected.store
        check_not_written(store)
        with StoreLock(store) if repair else nullcontext():
            cache = FeatureCache(store, mode="r+" if repair else "r", check=False)  # reported below
            report = check_store(cache, expected)
            reports.append(report)
            if repair:
                unmark_damaged(cache, report)
        if inputs:
            from stages.extract_features import load_split

            changes += input_lines(role, cache, input_report(cache, load_split(params, role)))
        rows.append(_row(role, cache, report))
        details += [f"  {role} shard {s}: {why}" for s, why in sorted(report["damaged"].items())]
        details += [f"  {role} {name}: {why}" for name, why in report["metadata"].items()]
        details += [f"  {role} params: {report['params']}"] if report["params"] else []
        mismatched += [report["params"]] if report["params"] else []
        summary[role] = {"store": str(store), "shards": cache.num_shards,
                         "complete": int(report["complete"].sum()),
                         "damaged": sorted(report["damaged"]), "metadata": sorted(report["metadata"])}
    print(f"{'split':<6} {'store':<40} {'shards':>6} {'ok':>6} {'damaged':>8} {'incomplete':>10}  "
          f"{'damaged shards':<16} damaged arrays")
    print("\n".join(rows + details))
    if inputs:
        print("\n".join(["inputs: changed since extraction:", *changes]) if changes
              else "inputs: unchanged since extraction")
    bad = sum(len(s["damaged"]) + len(s["metadata"]) for s in summary.values())
    if mismatched and not bad:
        raise CacheError(mismatched[0])
    if changes and not bad:
        raise CacheError(f"{len(changes)} input changes since extraction (listed above): run "
                         f"`pipeline extract-features --split {split}` to bring the stores up to date "
                         "(it re-extracts exactly the shards of changed images)")
    if bad:
        stores = ", ".join(s["store"] for s in summary.values() if s["damaged"] or s["metadata"])
        if repair:
            raise CacheError(f"{stores}: damage un-marked for re-extraction; run `pipeline "
                             "extract-features` to recompute exactly those shards and rewrite "
                             "damaged labels/ids/text features")
        first = next(w for r in reports for w in (*r["damaged"].values(), *r["metadata"].values()))
        fix = "" if "`pipeline " in first else f"; {REPAIR}"
        raise CacheError(f"{bad} damaged shards or arrays (listed above), the first: {first}{fix}")
    return summary

