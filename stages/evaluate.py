"""Stage `evaluate`: every table of the paper's experiments, beside the baselines.

  mlr     mAP on the val feature cache: trained projectors vs zero-shot CLIP without projectors
          (the same DualCoOp region aggregation on the raw cached tokens and raw pos/neg prompts).
  mfi     MFI figure of merit per class set: CLIP, untrained projector, alpha = 0 control, trained
          (stages/evaluate_mfi.py), plus similarity heat-maps (paper Table 4, Fig. 2).
  seg     zero-shot segmentation, every method / background rule / mIoU protocol, named
          (stages/evaluate_seg.py, paper Table 2); `methods` "baselines" / "projectors" splits it
          into the projector-free methods (results/*/seg-baselines.*) and the rest (DVC's two stages).
  zs-mlr  segment-driven zero-shot MLR vs CLIP global alone (paper Table 3).
Each writes results/metrics/<what>.json and results/tables/<what>.md atomically, naming the
projectors file (evaluate.projectors: best | last, its epoch) and the recipe. Per-class values sit
under one "per_class" key per JSON.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config.params import ParamError
from pipeline.config.schema import Params
from pipeline.data.datasets import load_multilabel
from pipeline.evaluation.metrics import average_precision
from pipeline.evaluation.sources import (
    backbone_and_head,
    dataset_root,
    fmt,
    load_head,
    source_line,
)
from pipeline.evaluation.variants import method_variant, resolve
from pipeline.evaluation.zsmlr import zero_shot_mlr
from pipeline.extraction.expected import open_checked
from pipeline.model.build import resolve_device
from pipeline.model.heads import positive_scores, region_logits
from pipeline.model.projectors import recorded_model
from pipeline.results.outputs import PROJECTOR_FREE, write_results
from pipeline.results.skips import for_evaluation
from pipeline.store.cache import FeatureCache
from pipeline.store.loader import TokenLoader
from pipeline.training import provenance
from pipeline.training.loop import TrainingError, evaluate_head, projector_text

WHATS = ("mlr", "mfi", "seg", "zs-mlr")


# -- mlr ---------------------------------------------------------------------------------------
@torch.no_grad()
def zero_shot_scores(loader: TokenLoader, text: dict[str, torch.Tensor], softmax_mode: str) -> np.ndarray:
    """Baseline without projectors: region_logits on L2-normalised raw tokens and raw prompts."""
    prompts = F.normalize(torch.cat([text["negative"], text["positive"]]), dim=-1)  # (2C, D)
    scores = [positive_scores(region_logits(F.normalize(b.tokens_on(prompts.device), dim=-1), prompts,
                                            softmax_mode)).cpu().numpy() for b in loader.epoch(0)]
    return np.concatenate(scores)  # (N, C)


def evaluate_mlr(params: Params, checked: FeatureCache | None = None) -> tuple[dict, str]:
    """mAP of the projectors and of CLIP's zero-shot scores on the val store; `checked`: that store
    as require_current opened and checked it (else it is opened and checked here)."""
    device = resolve_device(params.backbone.device)
    cache = checked or open_checked(params, "val")  # the store the current params would extract
    provenance.require_images(cache, "val", "evaluate")
    head, meta, src = load_head(params, device, cache.dim)
    if list(meta["classnames"]) != list(cache.classnames):
        raise TrainingError(f"projectors at {src['projectors']['path']} were trained on other classes "
                            f"than those of {cache.path}")
    # The projectors see the text they were trained on (train.text_input): the published mAP is the
    # training loop's validation; CLIP's zero-shot region scores compare normalised features.
    text_input = params.train.text_input
    text = {k: v.to(device) for k, v in projector_text(cache, text_input).items()}
    unit = {k: v.to(device) for k, v in projector_text(cache, "normalised").items()}
    loader = TokenLoader(cache, params.evaluate.batch_size, "cycle", shuffle=False)
    stats = params.evaluate.text_bn.mlr
    ours, labels = evaluate_head(head, loader, text, stats=stats)  # non-finite scores: named, not scored
    clip = zero_shot_scores(loader, unit, recorded_model(meta["model"]).softmax)
    aps = {"clip": average_precision(clip, labels), "ours": average_precision(ours, labels)}
    # the val view's resize as the store records it (extract.eval_interpolation)
    view = (cache.fingerprint.get("augment") or {}).get("interpolation", "not recorded")
    metrics: dict[str, Any] = {"source": src, "text_input": text_input, "text_bn": stats,
               "eval_interpolation": view,
               "num_images": len(labels), **{m: {"map": float(np.nanmean(ap))} for m, ap in aps.items()},
               "per_class": {m: {"ap": dict(zip(cache.classnames, ap))} for m, ap in aps.items()}}
    labels_ = {"clip": "CLIP", "ours": "ours (Unmix-CLIP)"}
    rows = [f"| {labels_[m]} | {fmt(metrics[m]['map'])} |" for m in aps]
    table = "\n".join([f"## Multi-label recognition, {cache.path.name} ({len(labels)} images)", "",
                       source_line(src), "",
                       (f"CLIP = region aggregation on the raw tokens and prompts, no projectors. Text "
                       f"into the projector: {text_input} (train.text_input), BatchNorm {stats} "
                       f"statistics. Val view resize: {view} (extract.eval_interpolation, as the store "
                       "records it)."), "", "| method | mAP (%) |", "|---|---|", *rows])
    return metrics, table


# -- zs-mlr ------------------------------------------------------------------------------------
def evaluate_zs_mlr(params: Params) -> tuple[dict, str]:
    cfg, seg = params.evaluate.zs_mlr, params.evaluate.seg
    dataset = load_multilabel(cfg.dataset, dataset_root(params.paths, cfg.dataset), cfg.split)
    backbone, head, _, src = backbone_and_head(params)
    ev = params.evaluate
    variant = resolve(seg, cfg.dataset)  # the seg rules on this dataset (variants.py: by its family)
    res = zero_shot_mlr(backbone, head, dataset, image_size=cfg.image_size,
                        batch_size=ev.batch_size, region_weight=cfg.region_weight,
                        threshold=seg.threshold, pos_interpolation=seg.pos_interpolation,
                        min_area=cfg.min_area, region_mode=cfg.region_mode,
                        prompt=ev.prompt, interpolation=variant.interpolation,
                        text_input=ev.text_input, text_bn=ev.text_bn.seg,
                        voc_names=ev.voc_names, ours_norm=variant.ours_norm, ours_tokens=seg.tokens)
    print(f"zs-mlr {cfg.dataset}: {res['num_images']} images, {res['seconds_per_image']:.3f} s/image")
    metrics = {"source": src, **{k: res[k] for k in ("map", "num_images", "seconds_per_image")},
               "region_weight": cfg.region_weight, "interpolation": variant.interpolation,
               "ours_norm": variant.ours_norm, "per_class": {"ap": res["per_class_ap"]}}
    labels = {"clip": "CLIP (global)", "regions": "CLIP on segmented regions (ours)",
              "combined": f"global + regions, w = {cfg.region_weight} (ours)"}
    table = "\n".join([(f"## Segment-driven zero-shot MLR (paper Table 3), {cfg.dataset} {cfg.split} "
                       f"({res['num_images']} images)"), "", source_line(src), "",
                       (f"Regions from {method_variant('ours', {cfg.dataset: variant.ours_norm}, seg.cs_ours_norm)}"
                        f"; {variant.interpolation} resize."), "", "| method | mAP (%) |", "|---|---|",
                       *[f"| {labels[k]} | {fmt(v)} |" for k, v in res["map"].items()]])
    return metrics, table


def _evaluations(methods: str) -> dict[str, Callable[[Params], tuple[dict, str]]]:
    from stages.evaluate_mfi import evaluate_mfi
    from stages.evaluate_seg import evaluate_seg

    return {"mlr": evaluate_mlr, "mfi": evaluate_mfi, "seg": lambda p: evaluate_seg(p, methods),
            "zs-mlr": evaluate_zs_mlr}


def run(params: Params, what: str = "all", methods: str = "all") -> dict[str, dict]:
    """Run one evaluation (or "all" in order), write its JSON and Markdown table, return the metrics.
    `methods` (seg only): "all", "baselines" (no projectors read or required) or "projectors"."""
    from stages.evaluate_seg import BASELINES

    if methods != "all" and what != "seg":
        raise ParamError(f"--methods {methods} is for `pipeline evaluate seg`, not {what}")
    free = methods == "baselines"
    val = None
    if not free:
        val = provenance.require_current(params, val=what in ("mlr", "all"))  # same run as the projectors
    out = {}
    params, whats = for_evaluation(params, WHATS if what == "all" else (what,))
    evaluations: dict[str, Callable[[Params], tuple[dict, str]]] = {
        **_evaluations(methods), "mlr": partial(evaluate_mlr, checked=val)}  # the val store checked once
    for name in whats:
        metrics, table = evaluations[name](params)
        if free:
            name = BASELINES
        write_results(params, name, metrics, table=table, scope=PROJECTOR_FREE if free else "projectors")
        print(table, flush=True)
        out[name] = metrics
    return out
