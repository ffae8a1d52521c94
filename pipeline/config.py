"""Parameters: one YAML file (configs/params.yaml), optional profile overlay, dotted CLI overrides.

The same file is read by `dvc.yaml`, so every stage sees exactly what DVC tracks. Validation
happens here, at the boundary, so the core code can assume valid inputs.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("configs/params.yaml")
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


class ParamError(ValueError):
    """A bad parameter; the message names the dotted key."""


def _deep_merge(base: dict, overlay: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if key not in out:
            raise ParamError(f"unknown parameter '{dotted}'")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _deep_merge(out[key], value, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> dict:
    """'train.mfi.lambda=0.5' -> {'train': {'mfi': {'lambda': 0.5}}} (value parsed as YAML)."""
    if "=" not in item:
        raise ParamError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_profile(name: str) -> dict:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ParamError(f"unknown profile '{name}' (known: {', '.join(known)})")
    return yaml.safe_load(path.read_text()) or {}


def load_params(
    path: str | Path = DEFAULT_PARAMS,
    overrides: Iterable[str] = (),
    profile: str | None = None,
) -> dict[str, Any]:
    """Read params, overlay a profile and `key=value` overrides, validate, return a nested dict."""
    path = Path(path)
    if not path.exists():
        raise ParamError(f"parameter file not found: {path} (run from the project root or pass --params)")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamError(f"{path}: not valid YAML: {err}") from err
    if profile:
        params = _deep_merge(params, load_profile(profile))
    for item in overrides:
        params = _deep_merge(params, parse_override(item))
    validate(params)
    return params


def get(params: dict, dotted: str) -> Any:
    cursor: Any = params
    for part in dotted.split("."):
        if not isinstance(cursor, dict) or part not in cursor:
            raise ParamError(f"missing parameter '{dotted}'")
        cursor = cursor[part]
    return cursor


# (dotted key, predicate, what it must be)
_RULES: list[tuple[str, Any, str]] = [
    ("data.dataset", lambda v: v in {"coco2014", "coco2017", "voc2007", "synthetic"},
     "one of coco2014, coco2017, voc2007, synthetic"),
    ("backbone.image_size", lambda v: isinstance(v, int) and v >= 32 and v % 32 == 0,
     "a positive multiple of 32"),
    ("backbone.precision", lambda v: v in {"fp32", "fp16", "bf16"}, "fp32, fp16 or bf16"),
    ("extract.views", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("extract.shard_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("extract.batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("extract.dtype", lambda v: v in {"float16", "float32"}, "float16 or float32"),
    ("extract.compressor", lambda v: v in {"none", "zstd", None}, "none or zstd"),
    ("extract.workers", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("extract.num_workers", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("extract.on_bad_image", lambda v: v in {"error", "skip"}, "error or skip"),
    ("model.image_projector", lambda v: v in {"linear", "mlp"}, "linear or mlp"),
    ("model.softmax", lambda v: v in {"per_prompt", "positive"}, "per_prompt or positive"),
    ("train.objective", lambda v: v in {"unmix", "infoclip", "unmix+infoclip"},
     "unmix, infoclip or unmix+infoclip"),
    ("train.epochs", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("train.batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("train.optimizer", lambda v: v in {"sgd", "adam"}, "sgd or adam"),
    ("train.lr", lambda v: _num(v) and v > 0, "a number > 0"),
    ("train.momentum", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("train.weight_decay", lambda v: _num(v) and v >= 0, "a number >= 0"),
    ("train.warmup_epochs", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("train.warmup_lr", lambda v: _num(v) and v > 0, "a number > 0"),
    ("train.view_policy", lambda v: v in {"random", "cycle"}, "random or cycle"),
    ("train.alpha", lambda v: _num(v) and v >= 0, "a number >= 0"),
    ("train.asl_weight", lambda v: _num(v) and v > 0, "a number > 0"),
    ("train.precision", lambda v: v in {"auto", "fp32", "bf16", "fp16"}, "auto, fp32, bf16 or fp16"),
    ("train.device", lambda v: _device(v), "auto, cpu, cuda or cuda:N"),
    ("backbone.device", lambda v: _device(v), "auto, cpu, cuda or cuda:N"),
    ("ablate.epochs", lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1"),
    ("evaluate.seg.image_size", lambda v: isinstance(v, int) and v >= 32 and v % 32 == 0,
     "a positive multiple of 32"),
    ("evaluate.zs_mlr.image_size", lambda v: isinstance(v, int) and v >= 32 and v % 32 == 0,
     "a positive multiple of 32"),
    ("evaluate.zs_mlr.region_mode", lambda v: v in {"mask", "crop"}, "mask or crop"),
    ("train.mfi.form", lambda v: v in {"paper", "authors"}, "paper or authors"),
    ("train.mfi.lambda", lambda v: _num(v) and v >= 0, "a number >= 0"),
    ("train.infoclip.lambda1", lambda v: _num(v) and v >= 0, "a number >= 0"),
    ("train.infoclip.lambda2", lambda v: _num(v) and v >= 0, "a number >= 0"),
    ("train.infoclip.num_tokens", lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
    ("train.infoclip.alpha", lambda v: _num(v) and v > 0, "a number > 0"),
    ("train.infoclip.kernel", lambda v: v in {"gaussian", "linear"}, "gaussian or linear"),
    ("train.infoclip.temperature", lambda v: _num(v) and v > 0, "a number > 0"),
    ("train.infoclip.student_temperature", lambda v: _num(v) and v > 0, "a number > 0"),
    ("train.infoclip.mode", lambda v: v in {"softmax", "cosine"}, "softmax or cosine"),
    ("evaluate.prompt", lambda v: v in {"plain", "positive"}, "plain or positive"),
    ("evaluate.seg.threshold", lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
]


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _device(v: Any) -> bool:
    return v in {"auto", "cpu", "cuda"} or (isinstance(v, str) and re.fullmatch(r"cuda:\d+", v) is not None)


def known_backbones() -> set[str]:
    """ModifiedResNet CLIP configs of open_clip plus ours, found without importing torch."""
    dirs = [Path(__file__).resolve().parent / "model_configs"]
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.origin:
        dirs.append(Path(spec.origin).parent / "model_configs")
    return {p.stem for d in dirs for p in d.glob("RN*.json")} | {p.stem for p in dirs[0].glob("*.json")}


def validate(params: dict) -> None:
    """Raise ParamError naming the first bad key."""
    name = get(params, "backbone.name")
    known = known_backbones()
    if name not in known:
        raise ParamError(f"parameter 'backbone.name' must be a ModifiedResNet CLIP ({', '.join(sorted(known))}), got {name!r}")
    for key, ok, must in _RULES:
        value = get(params, key)
        if not ok(value):
            raise ParamError(f"parameter '{key}' must be {must}, got {value!r}")
    if get(params, "train.warmup_epochs") >= get(params, "train.epochs"):
        raise ParamError("parameter 'train.warmup_epochs' must be smaller than 'train.epochs', got "
                         f"{get(params, 'train.warmup_epochs')} >= {get(params, 'train.epochs')}")
    for key in ("ablate.lambdas", "ablate.alphas"):
        values = get(params, key)
        if not isinstance(values, list) or not values or not all(_num(v) and v >= 0 for v in values):
            raise ParamError(f"parameter '{key}' must be a non-empty list of numbers >= 0, got {values!r}")
    for key in ("ablate.lambda1s", "ablate.lambda2s"):  # InfoCLIP sweeps; [] = not swept
        values = get(params, key)
        if not isinstance(values, list) or not all(_num(v) and v >= 0 for v in values):
            raise ParamError(f"parameter '{key}' must be a list of numbers >= 0 ([] = not swept), "
                             f"got {values!r}")
