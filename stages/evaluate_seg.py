"""`pipeline evaluate seg`: zero-shot segmentation (paper Table 2), every method, variant and mIoU
protocol, each number named by its protocol; evaluate.seg.protocol picks the headline table.

Per dataset, the rules evaluate.seg.{interpolation, ours_norm} resolve to one value
(pipeline/evaluation/variants.py); cs_ours_norm and coco_masks are one value. Every row names its
method's variant and the paper's Table 2 row it stands beside; details record both per dataset.

`--methods` splits the work the way DVC needs it: `baselines` (the methods that read no projectors)
writes results/{details,tables}/seg-baselines.*, with a run identity of only the params they read;
`projectors` computes the projector methods and merges the baselines' file into seg.*, so the table
still shows every method side by side and a train.* experiment recomputes only its own methods.
`all` (the default) computes every method in one pass into seg.*."""
from __future__ import annotations

import json

from pipeline.config import paths
from pipeline.config.backbones import backbone_kind
from pipeline.config.schema import Params
from pipeline.data.classes import CONTEXT_UNSEEN_IN_COCO
from pipeline.data.datasets import DatasetError, load_segmentation
from pipeline.errors import TrainingError
from pipeline.evaluation.metrics import MIOU_PROTOCOLS
from pipeline.evaluation.seg_eval import evaluate_segmentation
from pipeline.evaluation.segmentation import PROJECTED
from pipeline.evaluation.sources import SEG_SPLIT, backbone_and_head, dataset_root, fmt, source_line
from pipeline.evaluation.variants import method_records, method_variant, resolve, table2_row
from pipeline.model.build import backbone_from_params, resolve_device
from pipeline.results.outputs import PROJECTOR_FREE, run_identity

METHOD_GROUPS = ("all", "baselines", "projectors")
BASELINES = "seg-baselines"  # results/{details,tables}/seg-baselines.*: `--methods baselines`

PROTOCOL_TEXT = {
    "dataset": "dataset-level mIoU (%): intersections and unions summed over the dataset (mmseg IoUMetric)",
    "per-image-positive-pred": "per-image mIoU (%), authors' `positive_pred`: ground-truth background "
                               "ignored, mean IoU over the classes each image's prediction contains, "
                               "nanmean over images",
    "per-image-positive-only": "per-image mIoU (%), authors' `positive_only`: ground-truth background "
                               "ignored, mean over the classes with IoU > 0, nanmean over images",
    "per-image-predicted": "per-image mIoU (%): mean IoU over the classes predicted on non-ignored "
                           "pixels (ground-truth background a class), averaged over images",
}
BACKGROUND_TEXT = {"none": "none (argmax over classes, background never predicted)",
                   "softmax": "softmax (background where max softmax(100 x normalised maps) < {t})",
                   "max-score": "max-score (background where the max normalised score < {t})"}


def _columns(name: str, result: dict) -> list[tuple[str, str, str]]:
    """(column header, variant, key suffix) for the Table 2 layout."""
    cols = []
    for variant in next(iter(result["methods"].values())):
        header = name if variant == "all" else f"{name} ({variant.replace('_', ' ')})"
        cols.append((header, variant, ""))
        if name == "context59":
            cols += [(f"{name} {subset} in COCO", variant, f"_{subset}") for subset in ("unseen", "seen")]
    return cols


def _dataset_line(name: str, result: dict) -> str:
    """"voc2012: 1449 images, bicubic resize, ours normalised after the projector[, COCO masks x]"."""
    v = result["variant"]
    masks = f", COCO masks {v['coco_masks']}" if v["coco_masks"] else ""
    return (f"{name}: {result['num_images']} images, {v['interpolation']} resize, ours normalised "
            f"{v['ours_norm']} the projector{masks}")


def seg_table(results: dict, params: Params, src: dict) -> str:
    cfg, ev = params.evaluate.seg, params.evaluate
    headline = cfg.protocol
    cols = [(name, *c) for name, r in results.items() for c in _columns(name, r)]
    methods = list(next(iter(results.values()))["methods"]) if results else []
    norms: dict[str, str] = {n: r["variant"]["ours_norm"] for n, r in results.items()}
    vit = backbone_kind(params.backbone.name) == "vit"
    labels = {m: method_variant(m, norms, cfg.cs_ours_norm, vit) for m in methods}
    title = "## Zero-shot semantic segmentation (paper Table 2)" + (
        ", methods without projectors" if src.get("projectors") is None else "")
    lines = [title, "", _source_line(src), "",
             f"Backbone {params.backbone.name}, input {cfg.image_size} px (masks not resized), "
             "background rule " + BACKGROUND_TEXT[cfg.background].format(t=cfg.threshold)
             + f" in the bkgd columns; text into the projector {ev.text_input}, BatchNorm "
             f"{ev.text_bn.seg} statistics; VOC names {ev.voc_names}. Per dataset (rules "
             f"interpolation `{cfg.interpolation}`, ours_norm `{cfg.ours_norm}`): "
             + "; ".join(_dataset_line(n, r) for n, r in results.items()) + "."]
    for protocol in (headline, *[p for p in MIOU_PROTOCOLS if p != headline]):
        tag = " (headline)" if protocol == headline else ""
        lines += ["", f"### protocol `{protocol}`{tag}: {PROTOCOL_TEXT[protocol]}", "",
                  "| method (variant) | paper Table 2 row | " + " | ".join(c[1] for c in cols) + " |",
                  "|---" * (len(cols) + 2) + "|"]
        for m in methods:
            cells = [fmt(results[name]["methods"][m][variant].get(protocol + sub))
                     if not sub or protocol == "dataset" else "-" for name, _, variant, sub in cols]
            lines.append(f"| {labels[m]} | {table2_row(m)} | " + " | ".join(cells) + " |")
    lines += ["", f"Seconds per image (all {len(methods)} methods): "
              + ", ".join(f"{n} {r['seconds_per_image']:.3f}" for n, r in results.items()) + "."]
    return "\n".join(lines)


def _source_line(src: dict) -> str:
    if src.get("projectors") is None:
        return f"No projectors: these methods read only the frozen backbone; recipe: {src['recipe']}."
    line = source_line(src)
    return line + (f" Methods without projectors from {src['baselines']}." if src.get("baselines") else "")


def method_group(methods: list[str], group: str) -> list[str]:
    """evaluate.seg.methods restricted to `group` (METHOD_GROUPS), in their configured order."""
    if group not in METHOD_GROUPS:
        raise ValueError(f"methods group must be one of {METHOD_GROUPS}, got {group!r}")
    return [m for m in methods if group == "all" or (m in PROJECTED) == (group == "projectors")]


def read_baselines(params: Params, names: list[str]) -> dict:
    """The baselines' details (`--methods baselines`), refused unless they were made with the params
    they read now and on the datasets evaluated now (one line naming the command that remakes them)."""
    path = paths.results_dir(params.paths, "details", f"{BASELINES}.json")
    remake = "run `pipeline evaluate seg --methods baselines` (dvc repro runs it) or `--methods all`"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainingError(f"{path} not found: {remake}") from None
    except ValueError:
        raise TrainingError(f"{path} is not JSON (an interrupted write?): {remake}") from None
    want = run_identity(params, PROJECTOR_FREE)["digest"]
    got = (data.get("run") or {}).get("digest")
    if got != want:
        raise TrainingError(f"{path} was made with other backbone, data or evaluate.seg params "
                            f"(run {got}, now {want}): {remake}")
    if sorted(data.get("datasets", {})) != sorted(names):
        raise TrainingError(f"{path} evaluated {sorted(data.get('datasets', {}))}, this evaluation "
                            f"{sorted(names)}: {remake}")
    return data


def _merge(results: dict, per_class: dict, baselines: dict, order: list[str]) -> None:
    """The baselines' methods into `results` and `per_class` (in place), in evaluate.seg.methods
    order; seconds per image add up (both stages' work)."""
    for name, res in results.items():
        base = baselines["datasets"][name]
        for key in ("methods", "headline"):
            both = {**base[key], **res[key]}
            res[key] = {m: both[m] for m in order if m in both}
        res["seconds_per_image"] += base["seconds_per_image"]
        both = {**baselines["per_class"]["iou_dataset"][name], **per_class[name]}
        per_class[name] = {m: both[m] for m in order if m in both}


def evaluate_seg(params: Params, methods: str = "all") -> tuple[dict, str]:
    """Table 2 for the methods of `methods` (METHOD_GROUPS); "projectors" merges the baselines'
    file (read_baselines) into its results."""
    cfg, ev = params.evaluate.seg, params.evaluate
    chosen = method_group(list(cfg.methods), methods)
    roots, skipped = {}, {}
    for name in cfg.datasets:  # fail (or skip, evaluate.missing) before any work
        try:
            roots[name] = dataset_root(params.paths, name)
        except DatasetError as err:
            if ev.missing != "skip":
                raise
            skipped[name] = str(err)
            print(f"seg: skipping {name} (evaluate.missing skip): {err}", flush=True)
    if not roots:
        raise DatasetError("evaluate seg: none of evaluate.seg.datasets is on disk: " + "; ".join(skipped.values()))
    baselines = read_baselines(params, list(roots)) if methods == "projectors" else None
    src: dict
    if methods == "baselines":  # no projectors read, none required
        backbone = backbone_from_params(params.backbone, resolve_device(params.backbone.device), params=params)
        head, src = None, {"projectors": None, "recipe": params.recipe}
    else:
        backbone, head, _, src = backbone_and_head(params)
    if baselines is not None:
        src["baselines"] = str(paths.results_dir(params.paths, "details", f"{BASELINES}.json"))
    results, per_class = {}, {}
    for name, root in roots.items():
        variant = resolve(cfg, name)
        dataset = load_segmentation(name, root, SEG_SPLIT, coco_masks=variant.masks())
        res = evaluate_segmentation(
            backbone, head, dataset, image_size=cfg.image_size, batch_size=ev.batch_size,
            background=cfg.background, threshold=cfg.threshold,
            pos_interpolation=cfg.pos_interpolation, interpolation=variant.interpolation,
            methods=chosen, prompt=ev.prompt, text_input=ev.text_input,
            text_bn=ev.text_bn.seg, voc_names=ev.voc_names, ours_norm=variant.ours_norm,
            cs_ours_norm=variant.cs_ours_norm, ours_tokens=cfg.tokens)
        per_class[name] = res.pop("per_class")
        res["variant"] = variant.record()
        res["headline"] = {m: {v: r[cfg.protocol] for v, r in by_v.items()}
                           for m, by_v in res["methods"].items()}
        results[name] = res
        print(f"seg {name}: {res['num_images']} images, {res['seconds_per_image']:.3f} s/image", flush=True)
    if baselines is not None:
        _merge(results, per_class, baselines, list(cfg.methods))
    if "context59" in results:
        results["context59"]["unseen_in_coco"] = list(CONTEXT_UNSEEN_IN_COCO)
    norms: dict[str, str] = {n: r["variant"]["ours_norm"] for n, r in results.items()}
    metrics = {"source": src, "protocol": cfg.protocol, "protocols": list(MIOU_PROTOCOLS),
               "background": cfg.background, "threshold": cfg.threshold,
               "interpolation": cfg.interpolation, "ours_norm": cfg.ours_norm,
               "cs_ours_norm": cfg.cs_ours_norm, "coco_masks": cfg.coco_masks,
               "method_variants": method_records([m for m in cfg.methods if methods != "baselines"
                                                  or m in chosen], norms, cfg.cs_ours_norm,
                                                 backbone_kind(params.backbone.name) == "vit"),
               "text_input": ev.text_input,
               "text_bn": ev.text_bn.seg, "voc_names": ev.voc_names,
               "datasets": results, "skipped": sorted(skipped), "per_class": {"iou_dataset": per_class}}
    table = seg_table(results, params, src)
    if skipped:
        table += f"\n\nNot on disk, skipped (evaluate.missing skip): {', '.join(sorted(skipped))}."
    return metrics, table
