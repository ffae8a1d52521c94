"""Reading a projectors file's own record (meta["use"], pipeline/training/usage.py): where its
project root is, where the files it names are, and the defaults `UnmixCLIP.from_files`,
`pipeline segment` and `pipeline query` take from it.

Precedence, the same for the CLI and the API: an explicit argument (CLI flag, API keyword) > the
record > the library's defaults (files written before the record).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# meta["use"] key -> UnmixCLIP constructor keyword
OPTIONS = {"image_size": "image_size", "interpolation": "interpolation", "pos_interpolation": "pos_interpolation",
           "templates": "templates", "text_input": "text_input", "background": "background",
           "threshold": "threshold", "batch_size": "batch_size"}


def use_of(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The record, or None for files written before it."""
    use = meta.get("use")
    return use if isinstance(use, dict) else None


def project_root(path: str | os.PathLike, use: dict[str, Any]) -> Path | None:
    """The directory the recorded relative paths start from: the file's absolute path (links not
    followed: DVC may link the file into its cache) less the recorded path, when it ends with it
    (the file is where the run wrote it); None when it was moved or copied elsewhere."""
    recorded = Path(use.get("projectors") or "")
    if not recorded.parts or recorded.is_absolute():
        return None
    here = Path(os.path.abspath(path)).parts
    n = len(recorded.parts)
    if len(here) > n and here[-n:] == recorded.parts:
        return Path(*here[:-n])
    return None


def locate(recorded: str, root: Path | None) -> Path:
    """A recorded path on this machine: absolute as recorded, else under the project root (the
    working directory when the root is unknown)."""
    p = Path(recorded)
    return p if p.is_absolute() or root is None else root / p


def record_options(meta: dict[str, Any]) -> dict[str, Any]:
    """UnmixCLIP constructor keywords the record sets; the image-level scores use the evaluation's
    text BatchNorm statistics (evaluate.text_bn.mlr), the maps always the running ones (open
    vocabulary: one class works, a class's map does not depend on the others asked)."""
    use = use_of(meta)
    if use is None:
        return {}
    options = {kw: use[key] for key, kw in OPTIONS.items() if use.get(key) is not None}
    mlr = (use.get("text_bn") or {}).get("mlr")
    if mlr is not None:
        options["score_text_bn"] = mlr
    return options


def describe_backbone(use: dict[str, Any], root: Path | None) -> str:
    """The weights a record expects, for messages: file and sha256, tag, or seed (+ BN file)."""
    b = use["backbone"]
    if b.get("checkpoint"):
        return f"checkpoint {locate(b['checkpoint'], root)} (sha256 {b.get('sha256')})"
    if b.get("pretrained"):
        return f"open_clip weights {b['name']}:{b['pretrained']}"
    bn = b.get("bn_file")
    stats = f" with the BatchNorm statistics {locate(bn['path'], root)} (sha256 {bn['sha256']})" if bn else ""
    return f"random {b['name']} weights, seed {b.get('init_seed', 0)}{stats}"
