"""Stage `export-cache`: one feature store -> one HDF5 file, for tools that do not read Zarr."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import paths
from pipeline.config.schema import Params
from pipeline.extraction.expected import open_checked
from pipeline.store.export import export_hdf5


def run(params: Params, split: str = "train", fmt: str = "hdf5",
        out: str | None = None) -> dict[str, Any]:
    """split "train"/"val"; ``out`` defaults to the store's path with a .h5 suffix."""
    if fmt != "hdf5":
        raise ValueError(f"unknown export format {fmt!r} (known: hdf5)")
    store = paths.feature_store(params.paths, split)
    target = Path(out) if out else store.with_suffix(".h5")
    written = export_hdf5(open_checked(params, split), target)  # as the current params say
    print(f"exported {store} -> {written} ({written.stat().st_size / 2**20:.1f} MiB)")
    return {"store": str(store), "out": str(written)}
