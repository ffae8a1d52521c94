"""Stage `evaluate`: every table of the paper's experiments, beside the baselines.

  mlr     mAP on the val feature cache: trained projectors vs zero-shot CLIP without projectors
          (the same DualCoOp region aggregation on the raw cached tokens and raw pos/neg prompts).
  mfi     MFI figure of merit of "A photo of a {class}." before (CLIP) and after (text projector,
          eval mode) per class set (paper Table 4), plus similarity heat-maps (paper Fig. 2).
  seg     zero-shot segmentation, CLIP / CLIP-VV / ours, both mIoU protocols (paper Table 2).
  zs-mlr  segment-driven zero-shot MLR vs CLIP global alone (paper Table 3).
Each writes results/metrics/<what>.json and results/tables/<what>.md atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import paths
from pipeline.backbone import FrozenCLIP
from pipeline.build import backbone_from_params, resolve_device
from pipeline.cache import FeatureCache
from pipeline.classes import CONTEXT_UNSEEN_IN_COCO, classnames
from pipeline.datacheck import for_evaluation
from pipeline.datasets import DatasetError, load_multilabel, load_segmentation
from pipeline.heads import UnmixHead, positive_scores, region_logits
from pipeline.loader import TokenLoader
from pipeline.metrics import average_precision, mfi_figure_of_merit
from pipeline.plots import similarity_heatmaps
from pipeline.results import write_results
from pipeline.segmentation import METHOD_LABELS, PROMPTS, evaluate_segmentation, plain_text
from pipeline.training import TrainingError, evaluate_head, load_projectors
from pipeline.zsmlr import zero_shot_mlr

WHATS = ("mlr", "mfi", "seg", "zs-mlr")
PROTOCOLS = {  # the two mIoU protocols of REFERENCE.md, as named in every table
    "miou_dataset": "dataset-level mIoU (%): intersections and unions summed over the dataset "
                    "(mmseg IoUMetric)",
    "miou_per_image": "per-image mIoU (%): the authors' scripts, IoU over the classes predicted "
                      "in each image, averaged over images",
}
SEG_SPLIT = "val"
MFI_CLASS_SETS = {"voc": "voc2007", "coco": "coco2014", "context59": "context59",
                  "context_unseen": "context59-unseen"}  # other names: classes.classnames(name)
CONTEXT59_HELP = (
    "PASCAL Context 59 cannot be downloaded automatically: fetch VOC2010 trainval "
    "(http://host.robots.ox.ac.uk/pascal/VOC/voc2010/) and the Detail annotations "
    "trainval_merged.json (https://cs.stanford.edu/~roozbeh/pascal-context/), convert them with "
    "mmsegmentation's tools/dataset_converters/pascal_context.py into "
    "{root}/VOCdevkit/VOC2010/{{SegmentationClassContext,ImageSets/SegmentationContext}}, or drop it "
    "with --set 'evaluate.seg.datasets=[voc2012,coco2017]'")


# -- shared ------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """numpy -> Python, NaN/inf -> None (strict JSON for DVC and other readers)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"


def load_head(params: dict, device: torch.device, embed_dim: int | None = None) -> tuple[UnmixHead, dict]:
    """Trained projectors; refuses a head trained for another backbone width."""
    path = paths.projectors(params)
    head, meta = load_projectors(path, device)
    if embed_dim is not None and meta["embed_dim"] != embed_dim:
        raise TrainingError(f"projectors at {path} were trained on {meta['embed_dim']}-d tokens but "
                            f"backbone {params['backbone']['name']} gives {embed_dim}-d: retrain them")
    return head, meta


def backbone_and_head(params: dict) -> tuple[FrozenCLIP, UnmixHead]:
    device = resolve_device(params["backbone"]["device"])
    backbone = backbone_from_params(params, device)
    head, _ = load_head(params, device, backbone.embed_dim)
    return backbone, head


def dataset_root(params: dict, name: str) -> Path:
    """The dataset's root, or a DatasetError naming it and how to get the data."""
    root = paths.dataset_root(params, name)
    if not root.exists():
        how = CONTEXT59_HELP.format(root=root) if name == "context59" else \
            f"run `pipeline download --dataset {name}`"
        raise DatasetError(f"dataset {name}: {root} not found; {how}")
    return root


# -- mlr ---------------------------------------------------------------------------------------
@torch.no_grad()
def zero_shot_scores(loader: TokenLoader, text: dict[str, torch.Tensor], softmax_mode: str) -> np.ndarray:
    """Baseline without projectors: region_logits on L2-normalised raw tokens and raw prompts."""
    prompts = F.normalize(torch.cat([text["negative"], text["positive"]]), dim=-1)  # (2C, D)
    scores = [positive_scores(region_logits(F.normalize(b.tokens.to(prompts.device), dim=-1), prompts,
                                            softmax_mode)).cpu().numpy() for b in loader.epoch(0)]
    return np.concatenate(scores)  # (N, C)


def evaluate_mlr(params: dict) -> tuple[dict, str]:
    device = resolve_device(params["backbone"]["device"])
    cache = FeatureCache.open(paths.feature_store(params, "val"))
    head, meta = load_head(params, device, cache.dim)
    if list(meta["classnames"]) != list(cache.classnames):
        raise TrainingError(f"projectors at {paths.projectors(params)} were trained on other classes "
                            f"than those of {cache.path}")
    text = {n: torch.from_numpy(cache.text_features(n)).to(device) for n in ("positive", "negative")}
    loader = TokenLoader(cache, params["evaluate"]["batch_size"], "cycle", shuffle=False)
    ours, labels = evaluate_head(head, loader, text)
    clip = zero_shot_scores(loader, text, meta["model"]["softmax"])
    aps = {"clip": average_precision(clip, labels), "ours": average_precision(ours, labels)}
    metrics = {m: {"map": float(np.nanmean(ap)), "per_class_ap": dict(zip(cache.classnames, ap))}
               for m, ap in aps.items()}
    metrics["num_images"] = len(labels)
    rows = [f"| {METHOD_LABELS[m]} | {_fmt(metrics[m]['map'])} |" for m in aps]
    table = "\n".join([f"## Multi-label recognition, {cache.path.name} ({len(labels)} images)", "",
                       "CLIP = region aggregation on the raw tokens and prompts, no projectors.", "",
                       "| method | mAP (%) |", "|---|---|", *rows])
    return metrics, table


# -- mfi ---------------------------------------------------------------------------------------
def class_set(name: str) -> list[str]:
    return classnames(MFI_CLASS_SETS.get(name, name))


@torch.no_grad()
def evaluate_mfi(params: dict) -> tuple[dict, str]:
    backbone, head = backbone_and_head(params)
    metrics, rows = {}, []
    for name in params["evaluate"]["mfi"]["class_sets"]:
        names = class_set(name)
        before = plain_text(backbone, names, params["evaluate"]["prompt"])  # (C, D)
        after = head.eval().project_text(before.to(next(head.parameters()).device)).cpu()  # (C, D')
        metrics[name] = {**mfi_figure_of_merit(before.cpu(), after), "num_classes": len(names)}
        figure = paths.results_dir(params, "heatmaps", f"mfi_{name}.png")
        similarity_heatmaps({"CLIP": before.cpu().numpy(), "ours (projected)": after.numpy()}, names,
                            figure, title=f"class text similarity: {name}")
        metrics[name]["figure"] = str(figure)
        m = metrics[name]
        rows.append(f"| {name} | {len(names)} | {m['before']:.2f} | {m['after']:.2f} | {m['reduction_pct']:.1f} |")
    table = "\n".join(["## MFI figure of merit (paper Table 4)", "",
                       f"Mean off-diagonal cosine similarity of \"{PROMPTS[params['evaluate']['prompt']].format('{class}')}\" features.", "",
                       "| class set | classes | CLIP | ours | reduction (%) |", "|---|---|---|---|---|", *rows])
    return metrics, table


# -- seg ---------------------------------------------------------------------------------------
def _seg_columns(name: str, result: dict) -> list[tuple[str, dict, str]]:
    """(column header, method -> variant results, key) for the Table 2 layout."""
    cols = []
    for variant in next(iter(result["methods"].values())):
        header = name if variant == "all" else f"{name} ({variant.replace('_', ' ')})"
        cols.append((header, {m: r[variant] for m, r in result["methods"].items()}, ""))
        if name == "context59":
            for subset in ("unseen", "seen"):
                cols.append((f"{name} {subset} in COCO", {m: r[variant] for m, r in result["methods"].items()},
                             f"_{subset}"))
    return cols


def seg_table(results: dict, params: dict) -> str:
    cfg = params["evaluate"]["seg"]
    cols = [c for name, r in results.items() for c in _seg_columns(name, r)]
    methods = next(iter(results.values()))["methods"].keys() if results else []
    lines = ["## Zero-shot semantic segmentation (paper Table 2)", "",
             f"Backbone {params['backbone']['name']}, input {cfg['image_size']} px, background threshold "
             f"{cfg['threshold']} on the per-class min-max normalised score; images: "
             + ", ".join(f"{n} {r['num_images']}" for n, r in results.items()) + "."]
    for key, title in PROTOCOLS.items():
        lines += ["", f"### {title}", "", "| method | " + " | ".join(c[0] for c in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for m in methods:
            cells = [_fmt(res[m].get(key + sub)) if key == "miou_dataset" or not sub else "-"
                     for _, res, sub in cols]
            lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per image (all three methods): "
              + ", ".join(f"{n} {r['seconds_per_image']:.3f}" for n, r in results.items()) + "."]
    return "\n".join(lines)


def evaluate_seg(params: dict) -> tuple[dict, str]:
    cfg = params["evaluate"]["seg"]
    roots = {name: dataset_root(params, name) for name in cfg["datasets"]}  # fail before any work
    backbone, head = backbone_and_head(params)
    results = {}
    for name, root in roots.items():
        dataset = load_segmentation(name, root, SEG_SPLIT)
        results[name] = evaluate_segmentation(
            backbone, head, dataset, image_size=cfg["image_size"], batch_size=params["evaluate"]["batch_size"],
            threshold=cfg["threshold"], pos_interpolation=cfg["pos_interpolation"],
            prompt=params["evaluate"]["prompt"])
        print(f"seg {name}: {results[name]['num_images']} images, "
              f"{results[name]['seconds_per_image']:.3f} s/image", flush=True)
    if "context59" in results:
        results["context59"]["unseen_in_coco"] = list(CONTEXT_UNSEEN_IN_COCO)
    return results, seg_table(results, params)


# -- zs-mlr ------------------------------------------------------------------------------------
def evaluate_zs_mlr(params: dict) -> tuple[dict, str]:
    cfg, seg = params["evaluate"]["zs_mlr"], params["evaluate"]["seg"]
    dataset = load_multilabel(cfg["dataset"], dataset_root(params, cfg["dataset"]), cfg["split"])
    backbone, head = backbone_and_head(params)
    res = zero_shot_mlr(backbone, head, dataset, image_size=cfg["image_size"],
                        batch_size=params["evaluate"]["batch_size"], region_weight=cfg["region_weight"],
                        threshold=seg["threshold"], pos_interpolation=seg["pos_interpolation"],
                        min_area=cfg["min_area"], region_mode=cfg["region_mode"],
                        prompt=params["evaluate"]["prompt"])
    print(f"zs-mlr {cfg['dataset']}: {res['num_images']} images, {res['seconds_per_image']:.3f} s/image")
    metrics = {k: res[k] for k in ("map", "per_class_ap", "num_images", "seconds_per_image")}
    metrics["region_weight"] = cfg["region_weight"]
    labels = {"clip": "CLIP (global)", "regions": "CLIP on segmented regions (ours)",
              "combined": f"global + regions, w = {cfg['region_weight']} (ours)"}
    table = "\n".join([(f"## Segment-driven zero-shot MLR (paper Table 3), {cfg['dataset']} {cfg['split']} "
                       f"({res['num_images']} images)"), "", "| method | mAP (%) |", "|---|---|",
                       *[f"| {labels[k]} | {_fmt(v)} |" for k, v in res["map"].items()]])
    return metrics, table


_EVALUATIONS = {"mlr": evaluate_mlr, "mfi": evaluate_mfi, "seg": evaluate_seg, "zs-mlr": evaluate_zs_mlr}


def run(params: dict, what: str = "all") -> dict:
    """Run one evaluation (or "all" in order), write its JSON and Markdown table, return the metrics."""
    out = {}
    params, whats = for_evaluation(params, WHATS if what == "all" else (what,))
    for name in whats:
        metrics, table = _EVALUATIONS[name](params)
        write_results(params, name, metrics, table=table)
        print(table, flush=True)
        out[name] = metrics
    return out
