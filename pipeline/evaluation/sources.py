"""What every evaluation shares: which projectors it read, strict JSON + Markdown output.

Every results JSON carries "source": the projectors file (best or last, its epoch) and the
recipe, and every table says the same in its first line, so a number never travels without
what produced it.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.config import paths
from pipeline.config.params import recipe_summary
from pipeline.model.heads import UnmixHead
from pipeline.training.loop import TrainingError, load_projectors


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def load_head(params: dict, device: torch.device, embed_dim: int | None = None
              ) -> tuple[UnmixHead, dict, dict]:
    """(head in eval mode, its meta, its source) for evaluate.projectors (best | last).
    Refuses a head trained for another backbone width."""
    path = paths.projectors(params, params["evaluate"]["projectors"])
    head, meta = load_projectors(path, device)
    if embed_dim is not None and meta["embed_dim"] != embed_dim:
        raise TrainingError(f"projectors at {path} were trained on {meta['embed_dim']}-d tokens but "
                            f"backbone {params['backbone']['name']} gives {embed_dim}-d: retrain them")
    return head, meta, source(params, path, meta)


def source(params: dict, path: Path, meta: dict) -> dict:
    """What produced a result: the projectors file, which one and its epoch, and the recipe."""
    return {"projectors": {"which": params["evaluate"]["projectors"], "path": str(path),
                           "epoch": meta.get("epoch")},
            "recipe": recipe_summary(params)["recipe"]}


def source_line(src: dict) -> str:
    """The provenance sentence every table starts with."""
    p = src["projectors"]
    return (f"Projectors: {p['which']} ({p['path']}, epoch {p['epoch']}); "
            f"recipe: {src['recipe']}.")
