"""Which backbone a projectors file was trained on, and loading exactly that one.

Files with a record (meta["use"], pipeline/training/usage.py) name their weights: a checkpoint path
and sha256, an open_clip tag, or a seed and, for a recalibrated random backbone, the BatchNorm
statistics file; `backbone_from_use` loads them from where the record says (or the `checkpoint`
given instead) and names the expected file when they are not there or do not match. Older files:

A projectors file records the backbone's name and weights digest (meta["provenance"] when the
file has provenance, else the train store's fingerprint in meta["fingerprint"]). Digests are
"<name>:<tag>" for open_clip tags, "random:<seed>" for a seeded random init and the sha256 of a
local checkpoint, with a "+bn:<hash>" suffix where BatchNorm statistics were recalibrated at run
time: such a backbone can only be reproduced from a checkpoint saved after the recalibration.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.api.record import describe_backbone, locate, project_root
from pipeline.model.backbone import FrozenCLIP, FrozenTowers
from pipeline.model.recalibrate import apply_bn_state, is_bn_state
from pipeline.model.vit import load_any_backbone
from pipeline.model.weights import WeightsError, sha256_file, weights_digest_of

FIX = "set backbone.checkpoint (a local file) or backbone.pretrained (a tag) to those weights"
SUPPLY = "pass them with --checkpoint PATH (API: checkpoint=PATH)"


def recorded_backbone(meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """(backbone name, weights digest) the projectors record; None where they record nothing."""
    use = (meta.get("use") or {}).get("backbone") or {}
    if use.get("weights_digest"):
        return use.get("name"), use["weights_digest"]
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


def _load(name: str, checkpoint: str | os.PathLike | None, pretrained: str | None, sha256: str | None,
          init_seed: int, device: torch.device, precision: str, channels_last: bool) -> FrozenTowers:
    """Either tower with these weights (a checkpoint wins over a tag)."""
    return load_any_backbone(name, pretrained=None if checkpoint else pretrained,
                             checkpoint=None if checkpoint is None else os.fspath(checkpoint),
                             sha256=sha256, device=str(device), precision=precision,
                             channels_last=channels_last, init_seed=init_seed)


def _same_width(backbone: FrozenTowers, meta: dict[str, Any], path: str | os.PathLike) -> FrozenTowers:
    """`backbone`, refused when its tokens are not as wide as those the projectors were trained on."""
    embed_dim = meta.get("embed_dim")
    if embed_dim is not None and backbone.embed_dim != embed_dim:
        raise WeightsError(f"{path} was trained on {embed_dim}-d tokens but backbone {backbone.name} gives "
                           f"{backbone.embed_dim}-d: use the backbone it was trained on")
    return backbone


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
    backbone = _load(name, checkpoint, pretrained, sha256, init_seed, device, precision, channels_last)
    if recorded is not None and _base(backbone.weights_digest) != _base(recorded):  # e.g. a sha256 param
        raise WeightsError(f"backbone weights {backbone.weights_digest} differ from "
                           f"{recorded} that {path} was trained on: {FIX}")
    return _same_width(backbone, meta, path)


def _bn_file(use: dict[str, Any], root: Path | None, path: str | os.PathLike, given: Path | None) -> Path:
    """The recorded BatchNorm statistics file (or the one `given`), there and with its sha256."""
    bn = use["backbone"]["bn_file"]
    where = given or locate(bn["path"], root)
    if not where.is_file():
        raise WeightsError(f"{path} was trained on a random {use['backbone']['name']} with the BatchNorm "
                           f"statistics {where} (sha256 {bn['sha256']}), not there: {SUPPLY}")
    found = None if given is not None else sha256_file(where)
    if found is not None and found != bn["sha256"]:
        raise WeightsError(f"{where} is not the BatchNorm statistics file {path} was trained with (sha256 "
                           f"{found}, recorded {bn['sha256']}): {SUPPLY}")
    return where


def backbone_from_use(meta: dict[str, Any], path: str | os.PathLike, *, checkpoint: str | os.PathLike | None,
                      pretrained: str | None, sha256: str | None, init_seed: int | None, device: torch.device,
                      precision: str = "fp32", channels_last: bool = False) -> FrozenTowers:
    """The backbone a recorded projectors file was trained on: the weights given (`checkpoint`,
    which may also be the recorded BatchNorm statistics file; `pretrained`), else the recorded ones
    from where the record says. Weights that are not there, or give another digest, are one
    WeightsError naming the file (and sha256) the record expects and the option that supplies it."""
    use = meta["use"]
    b, root = use["backbone"], project_root(path, use)
    name, recorded, bn = b["name"], b.get("weights_digest"), b.get("bn_file")
    given_bn = None
    if checkpoint is not None and bn and Path(checkpoint).is_file() and sha256_file(Path(checkpoint)) == bn["sha256"]:
        given_bn, checkpoint, pretrained = Path(checkpoint), None, "random"  # the statistics file itself
    if checkpoint is None and pretrained is None:
        if b.get("checkpoint"):
            checkpoint = locate(b["checkpoint"], root)
            if not Path(checkpoint).is_file():
                raise WeightsError(f"{path} was trained on the backbone weights {checkpoint} (sha256 "
                                   f"{b.get('sha256')}), not there: {SUPPLY}")
            sha256 = sha256 or b.get("sha256")
        else:
            pretrained = b.get("pretrained") or "random"
    if init_seed is None or (pretrained == "random" and checkpoint is None and given_bn is not None):
        init_seed = int(b.get("init_seed") or 0)
    declared = require_declared_digest(name, checkpoint, pretrained, sha256, init_seed)
    mismatch = (f"backbone weights {{}} differ from {recorded} that {path} was trained on: it expects "
                f"{describe_backbone(use, root)}; {SUPPLY}")
    if recorded is not None and _base(declared) != _base(recorded).split("+bn:")[0]:
        raise WeightsError(mismatch.format(declared))
    stats = None
    if recorded is not None and "+bn:" in recorded and checkpoint is None and bn:
        stats = torch.load(_bn_file(use, root, path, given_bn), map_location="cpu", weights_only=True)
        if not is_bn_state(stats):
            raise WeightsError(f"{given_bn or bn['path']} is not a BatchNorm statistics file: {SUPPLY}")
    backbone = _load(name, checkpoint, pretrained, sha256, init_seed, device, precision, channels_last)
    if stats is not None and isinstance(backbone, FrozenCLIP):  # a ViT has no BatchNorm (no file)
        apply_bn_state(backbone, stats)
    if recorded is not None and _base(backbone.weights_digest) != _base(recorded):
        raise WeightsError(mismatch.format(backbone.weights_digest))
    return _same_width(backbone, meta, path)
