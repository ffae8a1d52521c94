"""Which backbone a projectors file was trained on, and loading exactly that one.

A projectors file records the backbone's name and weights digest (meta["provenance"] when the
file has provenance, else the train store's fingerprint in meta["fingerprint"]). Digests are
"<name>:<tag>" for open_clip tags, "random:<seed>" for a seeded random init and the sha256 of a
local checkpoint, with a "+bn:<hash>" suffix where BatchNorm statistics were recalibrated at run
time: such a backbone can only be reproduced from a checkpoint saved after the recalibration.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from pipeline.model.backbone import FrozenTowers
from pipeline.model.vit import load_any_backbone
from pipeline.model.weights import WeightsError, weights_digest_of

FIX = "set backbone.checkpoint (a local file) or backbone.pretrained (a tag) to those weights"


def recorded_backbone(meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """(backbone name, weights digest) the projectors record; None where they record nothing."""
    prov = meta.get("provenance") or {}
    if prov.get("weights_digest"):
        return prov.get("backbone"), prov["weights_digest"]
    backbone = (meta.get("fingerprint") or {}).get("backbone") or {}
    return backbone.get("name"), backbone.get("weights_digest")


def recorded_image_size(meta: dict[str, Any]) -> int | None:
    """The input size of the images the projectors were trained on, if recorded."""
    prov = meta.get("provenance") or {}
    fingerprint = ((prov.get("train_store") or {}).get("fingerprint")) or meta.get("fingerprint") or {}
    size = fingerprint.get("image_size")
    return int(size) if size else None


def recorded_tokens(meta: dict[str, Any]) -> dict[str, str]:
    """{"train": the token method the projectors were trained on, "seg": the one `ours` scores}:
    meta["use"]["tokens"] where recorded, else the train store's fingerprint (backbone.tokens, absent
    for the ResNet's vproj), else the ResNet names "vproj" / "vv", which a ViT reads as its own
    defaults (MaskCLIP's value path, CLIP Surgery's v-v path)."""
    use = (meta.get("use") or {}).get("tokens") or {}
    prov = meta.get("provenance") or {}
    fingerprint = ((prov.get("train_store") or {}).get("fingerprint")) or meta.get("fingerprint") or {}
    stored = (fingerprint.get("backbone") or {}).get("tokens")
    return {"train": use.get("train") or stored or "vproj", "seg": use.get("seg") or "vv"}


def recorded_train_text_input(meta: dict[str, Any]) -> str:
    """The text the projectors were trained on (train.text_input): their image-level scores need it.
    Projectors from before the recipes record none and were trained on normalised features."""
    train = ((meta.get("provenance") or {}).get("params") or {}).get("train") or meta.get("train") or {}
    return train.get("text_input", "normalised")


def _base(digest: str) -> str:
    return digest.strip().lower()


def require_declared_digest(name: str, checkpoint: str | os.PathLike | None, pretrained: str | None,
                            sha256: str | None, init_seed: int) -> str:
    """The digest load_backbone gives these weights, without loading them (model.weights'
    weights_digest_of, which says None for a missing file: here that is an error naming it)."""
    digest = weights_digest_of(name, checkpoint, pretrained, sha256, init_seed)
    if digest is None:
        raise WeightsError(f"weights file not found: {checkpoint}")
    return digest


def _from_record(digest: str, name: str, path: str | os.PathLike) -> tuple[str, int]:
    """(pretrained, init_seed) that reproduce a recorded digest; a local file cannot be named."""
    base = _base(digest)
    if "+bn:" not in base and base.startswith("random:"):
        return "random", int(base.split(":", 1)[1])
    if "+bn:" not in base and base.startswith(f"{name.lower()}:"):
        return digest.strip().split(":", 1)[1], 0
    raise WeightsError(f"{path} was trained on backbone weights {base} (a local file): pass that file "
                       f"(API checkpoint=..., CLI --set backbone.checkpoint=PATH)")


def resolve_backbone(meta: dict[str, Any], path: str | os.PathLike, *, checkpoint: str | os.PathLike | None,
                     pretrained: str | None, sha256: str | None, init_seed: int, name: str | None,
                     device: torch.device, precision: str = "fp32",
                     channels_last: bool = False) -> FrozenTowers:
    """The frozen backbone the projectors at `path` were trained on, with the given weights
    (checked against the recorded digest before loading) or the recorded ones."""
    recorded_name, recorded = recorded_backbone(meta)
    name = recorded_name or name
    if name is None:
        raise WeightsError(f"{path} records no backbone: pass its name (API name=..., CLI backbone.name)")
    if checkpoint is None and pretrained is None:
        if recorded is None:
            raise WeightsError(f"{path} records no backbone weights: pass checkpoint=... or pretrained=...")
        pretrained, init_seed = _from_record(recorded, name, path)
    declared = require_declared_digest(name, checkpoint, pretrained, sha256, init_seed)
    if recorded is not None and _base(declared) != _base(recorded):
        raise WeightsError(f"backbone weights {declared} differ from {recorded} that {path} "
                           f"was trained on: {FIX}")
    backbone = load_any_backbone(name, pretrained=None if checkpoint else pretrained,
                             checkpoint=None if checkpoint is None else os.fspath(checkpoint),
                             sha256=sha256, device=str(device), precision=precision,
                             channels_last=channels_last, init_seed=init_seed)
    if recorded is not None and _base(backbone.weights_digest) != _base(recorded):  # e.g. a sha256 param
        raise WeightsError(f"backbone weights {backbone.weights_digest} differ from "
                           f"{recorded} that {path} was trained on: {FIX}")
    embed_dim = meta.get("embed_dim")
    if embed_dim is not None and backbone.embed_dim != embed_dim:
        raise WeightsError(f"{path} was trained on {embed_dim}-d tokens but backbone {name} gives "
                           f"{backbone.embed_dim}-d: use the backbone it was trained on")
    return backbone
