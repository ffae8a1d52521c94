"""`pipeline evaluate seg`: zero-shot segmentation (paper Table 2), every method, variant and mIoU
protocol, each number named by its protocol; evaluate.seg.protocol picks the headline table.

Per dataset, the rules evaluate.seg.{interpolation, ours_norm} resolve to one value
(pipeline/evaluation/variants.py); cs_ours_norm and coco_masks are one value. Every row names its
method's variant and the paper's Table 2 row it stands beside; details record both per dataset."""
from __future__ import annotations

from pipeline.config.schema import Params
from pipeline.data.classes import CONTEXT_UNSEEN_IN_COCO
from pipeline.data.datasets import DatasetError, load_segmentation
from pipeline.evaluation.metrics import MIOU_PROTOCOLS
from pipeline.evaluation.seg_eval import evaluate_segmentation
from pipeline.evaluation.sources import SEG_SPLIT, backbone_and_head, dataset_root, fmt, source_line
from pipeline.evaluation.variants import method_records, method_variant, resolve, table2_row

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
    labels = {m: method_variant(m, norms, cfg.cs_ours_norm) for m in methods}
    lines = ["## Zero-shot semantic segmentation (paper Table 2)", "", source_line(src), "",
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


def evaluate_seg(params: Params) -> tuple[dict, str]:
    cfg, ev = params.evaluate.seg, params.evaluate
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
    backbone, head, _, src = backbone_and_head(params)
    results, per_class = {}, {}
    for name, root in roots.items():
        variant = resolve(cfg, name)
        dataset = load_segmentation(name, root, SEG_SPLIT, coco_masks=variant.masks())
        res = evaluate_segmentation(
            backbone, head, dataset, image_size=cfg.image_size, batch_size=ev.batch_size,
            background=cfg.background, threshold=cfg.threshold,
            pos_interpolation=cfg.pos_interpolation, interpolation=variant.interpolation,
            methods=cfg.methods, prompt=ev.prompt, text_input=ev.text_input,
            text_bn=ev.text_bn.seg, voc_names=ev.voc_names, ours_norm=variant.ours_norm,
            cs_ours_norm=variant.cs_ours_norm, ours_tokens=cfg.tokens)
        per_class[name] = res.pop("per_class")
        res["variant"] = variant.record()
        res["headline"] = {m: {v: r[cfg.protocol] for v, r in by_v.items()}
                           for m, by_v in res["methods"].items()}
        results[name] = res
        print(f"seg {name}: {res['num_images']} images, {res['seconds_per_image']:.3f} s/image", flush=True)
    if "context59" in results:
        results["context59"]["unseen_in_coco"] = list(CONTEXT_UNSEEN_IN_COCO)
    norms: dict[str, str] = {n: r["variant"]["ours_norm"] for n, r in results.items()}
    metrics = {"source": src, "protocol": cfg.protocol, "protocols": list(MIOU_PROTOCOLS),
               "background": cfg.background, "threshold": cfg.threshold,
               "interpolation": cfg.interpolation, "ours_norm": cfg.ours_norm,
               "cs_ours_norm": cfg.cs_ours_norm, "coco_masks": cfg.coco_masks,
               "method_variants": method_records(cfg.methods, norms, cfg.cs_ours_norm),
               "text_input": ev.text_input,
               "text_bn": ev.text_bn.seg, "voc_names": ev.voc_names,
               "datasets": results, "skipped": sorted(skipped), "per_class": {"iou_dataset": per_class}}
    table = seg_table(results, params, src)
    if skipped:
        table += f"\n\nNot on disk, skipped (evaluate.missing skip): {', '.join(sorted(skipped))}."
    return metrics, table
