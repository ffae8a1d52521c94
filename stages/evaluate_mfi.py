"""`pipeline evaluate mfi`: the MFI figure of merit (paper Table 4), and how much of it the MFI loss
does. Per class set, the mean off-diagonal cosine similarity of "A photo of a {class}." features:
  clip       CLIP's own text features (no projector);
  untrained  the projector as training started it (new_head: seeded by train.seed);
  alpha0     a projector trained with alpha = 0 (no MFI loss; lambda and form then irrelevant);
  trained    the evaluated projectors (evaluate.projectors).
Every projector row uses the same text input (evaluate.text_input) and BatchNorm statistics
(evaluate.text_bn.mfi). The alpha = 0 control (evaluate.mfi.control) comes from the ablation's
saved points (results/ablation/points/*/projectors.pt whose params equal this run's model and
train params except alpha = 0, the MFI loss settings and the epochs), else from a control run of
the training stage in <paths.cache>/controls/control-alpha0/; the table names which.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.config import paths
from pipeline.config.params import as_dict, read_yaml
from pipeline.config.schema import Params
from pipeline.data.classes import classnames, prompt_names
from pipeline.evaluation.metrics import mean_offdiagonal_similarity
from pipeline.evaluation.segmentation import PROMPTS, plain_text, project_classes
from pipeline.evaluation.sources import backbone_and_head, fmt, source_line
from pipeline.extraction.expected import open_checked
from pipeline.files import atomic_write_text
from pipeline.model.heads import UnmixHead
from pipeline.results.plots import similarity_heatmaps
from pipeline.training import provenance
from pipeline.training.checkpoints import head_from_blob
from pipeline.training.loop import TrainingError, load_projectors, new_head

MFI_CLASS_SETS = {"voc": "voc2007", "coco": "coco2014", "context59": "context59",
                  "context_unseen": "context59-unseen"}  # other names: classes.classnames(name)
ROWS = {"clip": "CLIP (no projector)", "untrained": "untrained projector",
        "alpha0": "projector trained with alpha = 0 (no MFI loss)", "trained": "trained projector (ours)"}
CONTROL_DIR = "control-alpha0"
# train params that do not change what an alpha = 0 run learns, or only how it runs.
_IGNORED_TRAIN_KEYS = ("alpha", "mfi", "epochs", "warmup_epochs", *provenance.IGNORED_TRAIN_KEYS)


def class_set(name: str) -> list[str]:
    return classnames(MFI_CLASS_SETS.get(name, name))


def _comparable(model: Mapping[str, Any], train: Mapping[str, Any]) -> dict:
    """The model and train params (dicts: as_dict, or as recorded) that decide what an alpha = 0
    run learns, JSON-normalised (tuples -> lists)."""
    kept = {k: v for k, v in train.items() if k not in _IGNORED_TRAIN_KEYS}
    return json.loads(json.dumps({"model": model, "train": kept}))


def _point_params(folder: Path, meta: dict) -> dict | None:
    """An ablation point's params as recorded: in the projectors' meta, or params.json / params.yaml
    beside (a plain dict: compared with as_dict of this run's)."""
    if isinstance(meta.get("params"), dict):
        return meta["params"]
    for name in ("params.json", "params.yaml"):
        if (folder / name).is_file():
            text = (folder / name).read_text()
            return json.loads(text) if name.endswith("json") else read_yaml(folder / name)
    return None


def ablation_control(params: Params, fingerprint: dict | None) -> tuple[Path, dict] | None:
    """(path, loaded projectors blob) of the first ablation point trained like this run but with
    alpha = 0, on the same cache; None when there is none (or this run records no train store)."""
    if fingerprint is None:  # unrecorded: no point can be shown to share this run's store
        return None
    want = _comparable(as_dict(params.model), as_dict(params.train))
    for path in sorted(paths.results_dir(params.paths, "ablation", "points").glob("*/projectors.pt")):
        blob = provenance.read_state(path)  # a damaged point is one line naming it
        meta = blob["meta"]
        point = _point_params(path.parent, meta)
        if point is None or float(point["train"]["alpha"]) != 0.0 \
                or _comparable(point["model"], point["train"]) != want:
            continue
        if meta.get("fingerprint") != fingerprint:  # another (or an unrecorded) train store
            continue
        return path, blob
    return None


def train_control(params: Params) -> Path:
    """Train (or reuse) the alpha = 0 control with the training stage, in its own folder under
    paths.cache (its features/ links to this run's cache, so nothing is re-extracted and the
    run's own models and results are never touched). Epochs: ablate.epochs, else train.epochs."""
    from stages import train

    # not under models/: that is the train stage's DVC output, and a change there re-runs training
    root = (Path(params.paths.cache) / "controls" / CONTROL_DIR).resolve()
    epochs = params.ablate.epochs or params.train.epochs
    warmup = min(params.train.warmup_epochs, epochs - 1)
    control = params.model_copy(deep=True)
    control = control.model_copy(update={
        "train": control.train.model_copy(update={"alpha": 0.0, "epochs": epochs, "warmup_epochs": warmup}),
        "paths": control.paths.model_copy(update={"cache": str(root), "results": str(root / "results")})})
    out = paths.projectors(control.paths, "last")
    stamp = root / "control.json"
    store = paths.feature_store(params.paths, "train").resolve()
    train_store = open_checked(params, "train")  # its fingerprint: a store re-extracted in place retrains
    identity = json.dumps({"train": as_dict(control.train), "model": as_dict(control.model),
                           "features": str(store), "fingerprint": train_store.fingerprint,
                           "layout": train_store.layout}, sort_keys=True)
    if out.is_file() and stamp.is_file() and stamp.read_text() == identity:
        return out
    root.mkdir(parents=True, exist_ok=True)
    link = root / "features"
    if link.is_symlink() or link.exists():
        link.unlink()  # always this run's stores, also when they moved
    os.symlink(store.parent, link)
    stamp.unlink(missing_ok=True)
    print(f"mfi: training the alpha = 0 control ({epochs} epochs) in {root}", flush=True)
    with torch.enable_grad():  # evaluate_mfi runs under no_grad
        train.run(control)
    atomic_write_text(stamp, identity)
    return out


def control_head(params: Params, device: torch.device, fingerprint: dict | None
                 ) -> tuple[UnmixHead, dict, str, Path] | None:
    """(head, meta, "ablation" | "train", path) per evaluate.mfi.control, or None for "none"."""
    mode = params.evaluate.mfi.control
    if mode == "none":
        return None
    found = ablation_control(params, fingerprint) if mode in ("auto", "ablation") else None
    if found is None:
        if mode == "ablation":
            raise TrainingError(
                f"evaluate.mfi.control is 'ablation' but no point under "
                f"{paths.results_dir(params.paths, 'ablation', 'points')} was trained with alpha = 0 and this "
                "run's other params: run `pipeline ablate` with alpha 0, or set it to auto / train / none")
        path = train_control(params)
        head, meta = load_projectors(path, device)
        return head, meta, "train", path
    path, blob = found  # already read: build the head from it rather than reading the file again
    return *head_from_blob(blob, device, source=path), "ablation", path


@torch.no_grad()
def evaluate_mfi(params: Params) -> tuple[dict, str]:
    ev = params.evaluate
    stats, text_input = ev.text_bn.mfi, ev.text_input
    backbone, head, meta, src = backbone_and_head(params)
    device = next(head.parameters()).device
    heads = {"untrained": new_head(params, backbone.embed_dim, device).eval(), "trained": head}
    control = control_head(params, device, meta.get("fingerprint"))
    control_info: dict[str, Any] = {"source": "none"}
    if control is not None:
        heads = {"untrained": heads["untrained"], "alpha0": control[0], "trained": head}
        control_info = {"source": control[2], "path": str(control[3]), "epoch": control[1].get("epoch")}
    sets, lines = {}, []
    for name in ev.mfi.class_sets:
        words = prompt_names(class_set(name), MFI_CLASS_SETS.get(name, name), ev.voc_names)
        text = plain_text(backbone, words, ev.prompt, normalise=text_input == "normalised")  # (C, D)
        features = {"clip": text.cpu()}
        features.update({k: project_classes(h, text, stats).cpu() for k, h in heads.items()})  # (C, D')
        rows = {k: mean_offdiagonal_similarity(f) for k, f in features.items()}
        reduction = {k: 100.0 * (rows["clip"] - v) / rows["clip"] for k, v in rows.items() if k != "clip"}
        figure = paths.results_dir(params.paths, "heatmaps", f"mfi_{name}.png")
        similarity_heatmaps({ROWS[k].split(" (")[0]: f.numpy() for k, f in features.items()}, words,
                            figure, title=f"class text similarity: {name}")
        sets[name] = {"num_classes": len(words), "rows": rows, "reduction_pct": reduction,
                      "before": rows["clip"], "after": rows["trained"], "figure": str(figure)}
        lines += [f"| {name} | {len(words)} | {ROWS[k]} | {fmt(v, 3)} | "
                  f"{fmt(reduction.get(k)) if k != 'clip' else '-'} |" for k, v in rows.items()]
    control_text = {"none": "no alpha = 0 control (evaluate.mfi.control none)",
                    "ablation": f"alpha = 0 control from the ablation point {control_info.get('path')} "
                                f"(epoch {control_info.get('epoch')})",
                    "train": f"alpha = 0 control trained by this stage: {control_info.get('path')} "
                             f"(epoch {control_info.get('epoch')})"}[control_info["source"]]
    prompt = PROMPTS[ev.prompt].format("{class}")
    table = "\n".join([
        "## MFI figure of merit (paper Table 4): how much is the MFI loss", "", source_line(src), "",
        (f"Mean off-diagonal cosine similarity of \"{prompt}\" features; text into the projector "
        f"{text_input}, BatchNorm {stats} statistics, VOC names {ev.voc_names}; {control_text}. "
        "Reduction relative to CLIP."), "",
        "| class set | classes | features | mean off-diagonal cosine | reduction (%) |",
        "|---|---|---|---|---|", *lines])
    metrics = {"source": src, "text_input": text_input, "text_bn": stats, "voc_names": ev.voc_names,
               "control": control_info, "class_sets": sets}
    return metrics, table
