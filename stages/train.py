"""`pipeline train`: the projectors trained on cached tokens, top to bottom (data, model, optimiser,
schedule, loop, evaluation, checkpoint). CLIP never runs here unless `online=True`, which recomputes
the same tokens with the frozen backbone on every batch, for comparison and benchmarks.
"""
from __future__ import annotations

import resource
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import paths
from pipeline.config.params import as_dict
from pipeline.config.schema import Params, Train
from pipeline.evaluation.metrics import mean_average_precision
from pipeline.extraction.expected import open_checked
from pipeline.files import atomic_write_text
from pipeline.locks import one_writer
from pipeline.model.build import resolve_device
from pipeline.model.heads import UnmixHead
from pipeline.model.objective import build_objective, clip_alignment_mi, trainable_parameters
from pipeline.results.outputs import write_results
from pipeline.store.cache import CacheError, FeatureCache
from pipeline.store.loader import Batch, TokenLoader, resolve_read_threads
from pipeline.training import provenance
from pipeline.training.loop import (
    TrainingError,
    amp_dtype,
    build_optimizer,
    cache_identity,
    load_checkpoint,
    lr_at,
    make_scaler,
    mask_identity,
    merit_text,
    new_head,
    partial_labels,
    projector_text,
    save_checkpoint,
    save_projectors,
    set_lr,
    torch_threads,
    train_step,
    validation_identity,
    validation_metrics,
)
from pipeline.training.usage import use_record

# mfi_*: paper Table 4 on the plain prompts "A photo of a {class}."; mfi_pos_*: the same figure on
# the positive training prompts, the ones the MFI loss sees. val_mi_clip: I(CLIP alignment; projected
# alignment) on val tokens (objective.clip_alignment_mi), for every objective.
TSV_COLUMNS = ("epoch", "lr", "loss", "asl", "mfi", "val_map", "mfi_before", "mfi_after",
               "mfi_reduction_pct", "mfi_pos_before", "mfi_pos_after", "val_mi_clip", "train_seconds",
               "val_seconds")
# with InfoCLIP: the weighted loss terms and the (unweighted, not in the loss) train-batch MI.
INFOCLIP_COLUMNS = ("compress", "distill", "mi_student_teacher")


def open_data(params: Params, device: torch.device) -> tuple[TokenLoader, TokenLoader, dict[str, torch.Tensor]]:
    """Train loader (shuffled, one view per image per epoch, partial labels), val loader (in order)
    and the cached class text features {positive, negative, plain} (C, D) on `device` (no text
    forward pass), raw or normalised as train.text_input says."""
    cfg = params.train
    caches = {}
    for role in ("train", "val"):
        caches[role] = open_checked(params, role)  # the store the current params would extract
        provenance.require_images(caches[role], role, "train on" if role == "train" else "evaluate on")
    train, val = caches["train"], caches["val"]
    if train.classnames != val.classnames or train.dim != val.dim:
        raise CacheError(f"{train.path} and {val.path} disagree on classes or token dim: "
                         "extract both with the same dataset and backbone")
    labels = partial_labels(train.labels, cfg.label_fraction, cfg.seed)  # (N, C), -1 = unknown
    threads = resolve_read_threads(cfg.read_threads)
    loader = TokenLoader(train, cfg.batch_size, cfg.view_policy, seed=cfg.seed, labels=labels,
                         read_threads=threads)
    val_loader = TokenLoader(val, cfg.batch_size, "cycle", seed=cfg.seed, shuffle=False,
                             read_threads=threads)
    text = {name: t.to(device) for name, t in projector_text(train, cfg.text_input).items()}
    return loader, val_loader, text


def label_frequency_map(labels: np.ndarray) -> float:
    """mAP (%) of constant scores: each class's AP is then its positive rate (the no-skill baseline)."""
    return mean_average_precision(np.zeros(labels.shape), labels)


def peak_memory_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def online_tokens(params: Params, cache: FeatureCache, device: torch.device) -> Callable[[Batch], torch.Tensor]:
    """Batch -> (B, T, D) tokens recomputed by the frozen backbone: the cached images and views.

    Everything that decides a view (dataset, image size, augmentation, view seeds) is read from
    the cache's fingerprint, and the view recipe is the extraction's: image i, view k is
    train_view(seed = view_seed(seed, i, k)) when augmented, else eval_view with the store's
    recorded resize (extract.eval_interpolation; bicubic in stores that predate it); made on the
    backbone's device when the store's views were (fingerprint "transforms": "device").
    """
    from pipeline.data.augment import eval_view, normalise_pixels, train_view, view_seed
    from pipeline.data.datasets import load_multilabel
    from pipeline.extraction.device_views import file_view
    from pipeline.model.build import backbone_from_params

    fp = cache.fingerprint
    backbone = backbone_from_params(params.backbone, device, params=params)
    if backbone.weights_digest != fp["backbone"]["weights_digest"]:
        raise TrainingError(f"--online: backbone weights {backbone.weights_digest} differ from those "
                            f"that built {cache.path} ({fp['backbone']['weights_digest']}): check "
                            "params 'backbone'")
    name, split = fp["dataset"]["name"], fp["dataset"]["split"]
    data = load_multilabel(name, paths.dataset_root(params.paths, name), split, params.data.coco_val_images)
    if [r.image_id for r in data.records] != list(cache.ids):
        raise TrainingError(f"--online: dataset {name}/{split} no longer lists the images of "
                            f"{cache.path}: re-run `pipeline extract-features`")
    size, augment = fp["image_size"], dict(fp["augment"])
    enabled = augment.pop("enabled")
    on_device = fp.get("transforms") == "device"
    if on_device and fp["backbone"]["device"] != backbone.device.type:
        raise TrainingError(f"--online: {cache.path} holds views made on {fp['backbone']['device']}, "
                            f"whose decode and resize kernels {backbone.device.type} does not repeat: "
                            f"run with train.device: {fp['backbone']['device']}")

    def view(i: int, k: int) -> torch.Tensor:  # (3, S, S)
        if on_device:
            seed = view_seed(fp["seed"], i, k) if enabled else None
            return normalise_pixels(file_view(str(data.records[i].path), size, seed, augment,
                                              backbone.device))
        image = data.image(i)
        if enabled:
            return train_view(image, size, view_seed(fp["seed"], i, k), **augment)
        return eval_view(image, size, augment.get("interpolation", "bicubic"))

    def tokens(batch: Batch) -> torch.Tensor:
        images = torch.stack([view(int(i), int(k)) for i, k in zip(batch.index, batch.view)])  # (B, 3, S, S)
        return backbone.tokens(images, fp["backbone"].get("tokens")).to(device)  # (B, T, D), as stored

    return tokens


def write_metrics(params: Params, history: list[dict], summary: dict | None) -> None:
    """results/plots/train.tsv (one row per epoch) and, at the end, results/details/train.json."""
    columns = TSV_COLUMNS + tuple(c for c in INFOCLIP_COLUMNS if history and c in history[0])
    lines = ["\t".join(columns)] + ["\t".join(f"{row[c]:.6g}" for c in columns) for row in history]
    atomic_write_text(paths.results_dir(params.paths, "plots", "train.tsv"), "\n".join(lines) + "\n")
    if summary is not None:
        write_results(params, "train", summary)  # details/train.json (DVC's metrics: the evaluations')


def evaluated(epoch: int, cfg: Train) -> bool:
    """train.eval_every: validate after every N-th epoch (1-based) and after the last."""
    return epoch % cfg.eval_every == 0 or epoch == cfg.epochs


def best_row(history: list[dict]) -> dict:
    """The evaluated epoch with the highest val mAP (the earliest on ties)."""
    rows = [r for r in history if np.isfinite(r["val_map"])]
    return max(rows, key=lambda r: (r["val_map"], -r["epoch"]))


def validate(head: UnmixHead, val_loader: TokenLoader, text: dict, figure_text: dict,
             params: Params) -> dict[str, float]:
    """training.validation_metrics plus val MI CLIP-projected (objective.clip_alignment_mi)."""
    cfg = params.train
    row = validation_metrics(head, val_loader, text, figure_text, params.evaluate,
                             mean_ap=mean_average_precision)
    row["val_mi_clip"] = clip_alignment_mi(head, val_loader.epoch(0), text, cfg.infoclip, seed=cfg.seed)
    return row


NOT_EVALUATED = dict.fromkeys(("val_map", "mfi_before", "mfi_after", "mfi_reduction_pct", "mfi_pos_before",
                               "mfi_pos_after", "val_mi_clip"), float("nan"))


@one_writer(lambda params, *_, **__: paths.models_dir(params.paths), "`pipeline train`")  # one run per output
def run(params: Params, resume: bool = False, online: bool = False) -> dict[str, Any]:
    cfg = params.train
    device = resolve_device(cfg.device)
    amp = amp_dtype(device, cfg.precision)
    print(f"train: device {device}, precision {amp or torch.float32}, {'online' if online else 'cached'} tokens")

    # -- data -------------------------------------------------------------------------------------
    loader, val_loader, text = open_data(params, device)
    cache = loader.cache
    if not online:
        mib = cache.tokens_nbytes / 2**20
        how = ("held in memory" if loader.in_memory else
               f"streamed from the shard files ({loader.read_threads} read threads)")
        print(f"train: {f'{mib / 1024:.1f} GiB' if mib >= 1024 else f'{mib:.1f} MiB'} of tokens, {how}")
    figure_text = {k: t.to(device) for k, t in merit_text(cache, params.evaluate).items()}
    mask = mask_identity(loader.labels.numpy(), cfg.label_fraction, cfg.seed)  # the mask open_data drew
    get_tokens = online_tokens(params, cache, device) if online else None
    steps = len(loader)

    # -- model and optimiser ------------------------------------------------------------------------
    head = new_head(params, cache.dim, device)
    aux = build_objective(cfg, len(cache.classnames), device)  # InfoCLIP's terms and LPAM; None for unmix
    optimizer = build_optimizer(trainable_parameters(head, aux), cfg)
    scaler = make_scaler(amp)
    ckpt = paths.checkpoint(params.paths)
    start, history, best_head = 0, [], None
    if resume:
        state = load_checkpoint(ckpt, cache, params, labels=mask,
                                validation=validation_identity(val_loader.cache, params.evaluate))
        head.load_state_dict(state["head"])
        if aux is not None:
            aux.load_state_dict(state["objective"])  # LPAM and its token-sampling generator
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        start, history, best_head = state["epoch"], list(state["history"]), state.get("best_head")
        print(f"train: resumed from {ckpt} after epoch {start}")
    provenance.invalidate(params.paths)  # an interrupted (re)train leaves no stale projectors to evaluate
    # -- loop ---------------------------------------------------------------------------------------
    with torch_threads(device, cfg.cpu_threads):
        for epoch in range(start, cfg.epochs):
            sums: dict[str, float] = defaultdict(float)
            t0 = time.perf_counter()
            bar = tqdm(loader.epoch(epoch), total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
            for step, batch in enumerate(bar):
                lr = lr_at(epoch + step / steps, cfg)
                set_lr(optimizer, lr)
                tokens = get_tokens(batch) if get_tokens is not None else batch.tokens_on(device)  # (B, T, D)
                parts = train_step(head, optimizer, tokens, batch.labels.to(device), text, cfg, aux,
                                   epoch=epoch + 1, step=step + 1, amp=amp, scaler=scaler)
                if aux is not None:
                    assert aux.last_mi is not None  # set by the step just taken
                    parts["mi_student_teacher"] = float(aux.last_mi)  # logged, not in the loss
                for name, value in parts.items():
                    sums[name] += value
                bar.set_postfix(loss=f"{parts['total']:.3f}", lr=f"{lr:.2e}")
            row = {"epoch": epoch + 1, "lr": lr, "loss": sums["total"] / steps, "asl": sums["asl"] / steps,
                   "mfi": sums["mfi"] / steps, "train_seconds": time.perf_counter() - t0}
            if aux is not None:
                row.update({k: sums[k] / steps for k in ("compress", "distill", "mi_student_teacher")})

            # -- evaluation -----------------------------------------------------------------------
            t0 = time.perf_counter()
            row.update(validate(head, val_loader, text, figure_text, params) if evaluated(epoch + 1, cfg)
                       else NOT_EVALUATED)
            row["val_seconds"] = time.perf_counter() - t0
            history.append(row)
            if np.isfinite(row["val_map"]):
                if best_row(history) is row:
                    best_head = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
                info = f", MI student-teacher {row['mi_student_teacher']:.3f}" if aux is not None else ""
                print(f"epoch {epoch + 1}: loss {row['loss']:.4f} (asl {row['asl']:.4f}, "
                      f"mfi {row['mfi']:.4f}{info}), val mAP {row['val_map']:.2f}, text similarity "
                      f"{row['mfi_before']:.3f} -> {row['mfi_after']:.3f}, "
                      f"val MI CLIP-projected {row['val_mi_clip']:.3f}")
            else:
                print(f"epoch {epoch + 1}: loss {row['loss']:.4f} (asl {row['asl']:.4f}, mfi {row['mfi']:.4f})")

            # -- checkpoint -----------------------------------------------------------------------
            save_checkpoint(ckpt, {
                "head": head.state_dict(), "objective": aux.state_dict() if aux is not None else None,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch + 1,
                "params": as_dict(params), "cache": cache_identity(cache), "history": history,
                "validation": validation_identity(val_loader.cache, params.evaluate),
                "labels": mask, "best_head": best_head})
            write_metrics(params, history, None)

    # -- final projectors and metrics -----------------------------------------------------------------
    if not history:
        raise TrainingError(f"parameter 'train.epochs' is {cfg.epochs}: nothing to train")
    last, best = history[-1], best_row(history)
    assert best_head is not None  # the last epoch is always validated
    meta = {"model": as_dict(params.model), "embed_dim": cache.dim, "classnames": cache.classnames,
            "fingerprint": cache.fingerprint, "provenance": provenance.record(params, cache, val_loader.cache)}
    files = {"last": paths.projectors(params.paths, "last"), "best": paths.projectors(params.paths, "best")}
    digest = cache.fingerprint["backbone"]["weights_digest"]
    save_projectors(files["best"], best_head, {**meta, "which": "best", "epoch": best["epoch"],
                                               "val_map": best["val_map"],
                                               "use": use_record(params, files["best"], digest)})
    save_projectors(files["last"], head, {**meta, "which": "last", "epoch": last["epoch"],
                                          "val_map": last["val_map"],
                                          "use": use_record(params, files["last"], digest)})
    summary = {
        "device": str(device), "online": online, "objective": cfg.objective, "epochs": last["epoch"],
        "val_map": last["val_map"],
        "last": {"epoch": last["epoch"], "val_map": last["val_map"], "projectors": str(files["last"])},
        "best": {"epoch": best["epoch"], "val_map": best["val_map"], "projectors": str(files["best"])},
        "evaluated_epochs": [r["epoch"] for r in history if np.isfinite(r["val_map"])],
        "label_frequency_map": label_frequency_map(val_loader.cache.labels[val_loader.cache.valid]),
        "labels": {"fraction": mask["fraction"], "kept": mask["kept"],
                   "known_of": int(np.prod(mask["shape"]))},
        "mfi": {"before": last["mfi_before"], "after": last["mfi_after"],
                "reduction_pct": last["mfi_reduction_pct"]},
        "mfi_positive_prompts": {"before": last["mfi_pos_before"], "after": last["mfi_pos_after"]},
        "loss": {k: last[k] for k in ("loss", "asl", "mfi", "compress", "distill") if k in last},
        "val_mi_clip": last["val_mi_clip"],
        "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in history])),
        "peak_memory_mib": peak_memory_mib(),
    }
    if aux is not None:
        summary["mi_student_teacher"] = last["mi_student_teacher"]
    if device.type == "cuda":
        summary["peak_cuda_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    write_metrics(params, history, summary)
    print(f"train: val mAP last {last['val_map']:.2f} (epoch {last['epoch']}), best {best['val_map']:.2f} "
          f"(epoch {best['epoch']}); projectors -> {files['last']}, {files['best']}")
    return {**summary, "projectors": str(files["last"]), "history": history}
