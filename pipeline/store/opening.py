"""Opening a store's Zarr metadata: a damaged, truncated or missing `zarr.json` (of the group or of
any array) is one CacheError naming the file and the fix, never a JSON traceback."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import zarr

from pipeline.errors import CacheError
from pipeline.store.format import FORMAT, FORMAT_VERSION, rebuild


def _damaged(meta: Path, err: BaseException, store: Path) -> CacheError:
    why = f"{type(err).__name__}: {err}".splitlines()[0]
    return CacheError(f"{meta} is damaged ({why}): {rebuild(store)}")


def _json(meta: Path, store: Path) -> dict[str, Any]:
    try:
        value = json.loads(meta.read_bytes())
    except (OSError, ValueError) as err:
        raise _damaged(meta, err, store) from None
    if not isinstance(value, dict):
        raise _damaged(meta, TypeError("not a JSON object"), store)
    return value


def open_group(path: Path, mode: str) -> tuple[zarr.Group, dict[str, Any]]:
    """The store's group and its attributes, format and version checked."""
    meta = path / "zarr.json"
    attrs = _json(meta, path).get("attributes", {})
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        got = attrs.get("format") if isinstance(attrs, dict) else None
        raise CacheError(f"{path} is a zarr group but not a feature cache (attrs.format is {got!r}, "
                         f"expected {FORMAT!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has feature store format version {attrs.get('format_version')}, "
                         f"this code reads {FORMAT_VERSION}: re-extract it (`rm -r {path}` and "
                         "`pipeline extract-features`, or `pipeline extract-features --restart-on-change`)")
    try:
        group = zarr.open_group(str(path), mode=mode)
        return group, dict(group.attrs)
    except Exception as err:  # zarr raises several types for a damaged group
        raise _damaged(meta, err, path) from err


def open_array(group: zarr.Group, path: Path, name: str) -> zarr.Array:
    """Array `name` of the store at `path`; its zarr.json missing or damaged is a CacheError."""
    meta = path / name / "zarr.json"
    if not meta.is_file():
        raise CacheError(f"feature cache {path} lacks array {name} ({meta} is missing): {rebuild(path)}")
    _json(meta, path)
    try:
        array = group[name]
    except Exception as err:  # a JSON object zarr cannot use (fields missing or wrong)
        raise _damaged(meta, err, path) from None
    if not isinstance(array, zarr.Array):
        raise _damaged(meta, TypeError("not an array"), path)
    return array
