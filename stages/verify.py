"""Stage `verify`: read every complete shard of the feature stores and check it; `--repair`
un-marks the damaged shards so the next `extract-features` recomputes exactly those.

Checked: every token chunk's and shard index's crc32c, tokens finite, every image view present;
labels in {-1, 0, 1}; ids non-empty; status 0/1 in complete shards; the completion marks
readable; text features present and finite. Labels, ids and text features are rewritten by
`extract-features` itself (from the dataset and the backbone), byte for byte as at creation.
Parameters read: paths.cache.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from pipeline.config import paths
from pipeline.config.schema import Params
from pipeline.store.cache import RAW_TEXT_NAMES, TEXT_NAMES, CacheError, FeatureCache
from pipeline.store.integrity import unsound_shards
from pipeline.store.lock import StoreLock, check_not_written


def check_store(cache: FeatureCache) -> dict[str, Any]:
    """{"complete": [...], "damaged": {shard: why}, "metadata": {array: why}} of one store."""
    complete, damaged = unsound_shards(cache, thorough=True)
    metadata: dict[str, str] = {}
    for name, read in (("labels", lambda: cache.labels), ("ids", lambda: cache.ids),
                       *((f"text/{n}", lambda n=n: cache.text_features(n))
                         for n in TEXT_NAMES + RAW_TEXT_NAMES)):
        try:
            read()
        except CacheError as err:
            metadata[name] = str(err)
    return {"complete": complete, "damaged": damaged, "metadata": metadata}


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


def run(params: Params, split: str = "all", repair: bool = False) -> dict[str, Any]:
    """Check the train and/or val stores; raise CacheError (exit 1) when any is damaged."""
    roles = ["train", "val"] if split == "all" else [split]
    rows: list[str] = []
    details: list[str] = []
    summary: dict[str, dict[str, Any]] = {}
    for role in roles:
        store = paths.feature_store(params.paths, role)
        check_not_written(store)
        with StoreLock(store) if repair else nullcontext():
            cache = FeatureCache.open(store, mode="r+" if repair else "r")
            report = check_store(cache)
            if repair:
                unmark_damaged(cache, report)
        rows.append(_row(role, cache, report))
        details += [f"  {role} shard {s}: {why}" for s, why in sorted(report["damaged"].items())]
        details += [f"  {role} {name}: {why}" for name, why in report["metadata"].items()]
        summary[role] = {"store": str(store), "shards": cache.num_shards,
                         "complete": int(report["complete"].sum()),
                         "damaged": sorted(report["damaged"]), "metadata": sorted(report["metadata"])}
    print(f"{'split':<6} {'store':<40} {'shards':>6} {'ok':>6} {'damaged':>8} {'incomplete':>10}  "
          f"{'damaged shards':<16} damaged arrays")
    print("\n".join(rows + details))
    bad = sum(len(s["damaged"]) + len(s["metadata"]) for s in summary.values())
    if bad:
        stores = ", ".join(s["store"] for s in summary.values() if s["damaged"] or s["metadata"])
        if repair:
            raise CacheError(f"{stores}: damage un-marked for re-extraction; run `pipeline "
                             "extract-features` to recompute exactly those shards and rewrite "
                             "damaged labels/ids/text features")
        raise CacheError(f"{stores}: {bad} damaged shards or arrays (listed above); run "
                         "`pipeline verify --repair`, then `pipeline extract-features`")
    return summary

