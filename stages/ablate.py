"""`pipeline ablate`: a lambda x alpha grid trained in ONE pass over the cache per epoch.

Every grid point is the solo `pipeline train` run with that point's params (ablation.point_params):
same seeded initial head, same batches, same partial labels, same arithmetic. Points whose loss is
the same (alpha = 0 leaves lambda out of it) are trained once and reported for each. The distinct
heads are stacked into one batched forward / backward / update (pipeline/training/stacked.py), with one host
sync per step for the whole grid; InfoCLIP objectives (an LPAM and a token sampler per point) run
head by head through training.train_step instead. Each point is validated as a solo run is (every
train.eval_every epochs and after the last), and its projectors are saved with its params under
results/ablation/points/<slug>/projectors.pt (training.load_projectors reads them).
"""
from __future__ import annotations

import json
import time
from typing import Any

import torch
from tqdm import tqdm

from pipeline.config import paths
from pipeline.config.params import ParamError, as_dict
from pipeline.config.schema import Params
from pipeline.files import atomic_write_text
from pipeline.locks import one_writer
from pipeline.model.build import resolve_device
from pipeline.model.heads import UnmixHead
from pipeline.model.objective import build_objective, uses_infoclip
from pipeline.results.outputs import stamp
from pipeline.store.loader import TokenLoader
from pipeline.training import provenance
from pipeline.training.ablation import (
    distinct,
    grid,
    plot_ablation,
    point_label,
    point_params,
    point_slug,
    write_csv,
    write_markdown,
)
from pipeline.training.loop import (
    amp_dtype,
    lr_at,
    merit_text,
    new_head,
    save_projectors,
    torch_threads,
)
from pipeline.training.stacked import LoopTrainer, StackedTrainer
from pipeline.training.usage import use_record
from stages.train import evaluated, open_data
from stages.train import validate as solo_validate


def validate(head: UnmixHead, val_loader: TokenLoader, text: dict, merit: dict, params: Params) -> dict:
    """The solo run's per-epoch validation figures of one head (train.validate) and the positive
    prompts' MFI reduction."""
    row = solo_validate(head, val_loader, text, merit, params)
    mi = row.pop("val_mi_clip")  # listed last in history.json, as before
    return {**row, "mfi_pos_reduction_pct": 100.0 * (1.0 - row["mfi_pos_after"] / row["mfi_pos_before"]),
            "val_mi_clip": mi}


@one_writer(lambda params, *_, **__: paths.results_dir(params.paths, "ablation"), "`pipeline ablate`")
def run(params: Params, lambdas: list[float] | None = None, alphas: list[float] | None = None,
        lambda1s: list[float] | None = None, lambda2s: list[float] | None = None,
        stacked: bool | None = None) -> dict[str, Any]:
    """stacked: None = stacked unless InfoCLIP is on; False = head by head (benchmarks compare)."""
    a = params.ablate
    lambda1s = a.lambda1s if lambda1s is None else lambda1s
    lambda2s = a.lambda2s if lambda2s is None else lambda2s
    objective = params.train.objective
    for key, values in (("lambda1s", lambda1s), ("lambda2s", lambda2s)):
        if values and not uses_infoclip(objective):
            raise ParamError(f"parameter 'ablate.{key}' sweeps an InfoCLIP weight, but 'train.objective' "
                             f"is {objective!r}: set it to infoclip or unmix+infoclip, or ablate.{key} to []")
    points = grid(a.lambdas if lambdas is None else lambdas, a.alphas if alphas is None else alphas,
                  lambda1s, lambda2s)
    runs = [point_params(params, lam, alpha, a.epochs, l1, l2) for lam, alpha, l1, l2 in points]
    reps, owner = distinct(runs)  # reps[k]: the point trained for head k; owner[i]: point i's head
    labels = [point_label(*pt) for pt in points]
    cfg = runs[0].train
    epochs = cfg.epochs
    device = resolve_device(cfg.device)
    amp = amp_dtype(device, cfg.precision)
    if stacked and uses_infoclip(objective):
        raise ParamError(f"'train.objective' {objective!r} trains its grid head by head (an LPAM per point)")
    if stacked and amp == torch.float16:
        raise ParamError("fp16 trains the grid head by head: one GradScaler for stacked heads would skip "
                         "every head's step when one overflows (set train.precision bf16 or fp32 to stack)")
    stacked = not (uses_infoclip(objective) or amp == torch.float16) if stacked is None else stacked
    print(f"ablate: {len(points)} grid points ({len(reps)} distinct trainings, "
          f"{'stacked' if stacked else 'head by head'}) x {epochs} epochs on {device}")

    with torch_threads(device, cfg.cpu_threads):
        loader, val_loader, text = open_data(params, device)
        cache = loader.cache
        merit = {k: t.to(device) for k, t in merit_text(cache, params.evaluate).items()}
        heads = [new_head(runs[i], cache.dim, device) for i in reps]
        head_labels = [labels[i] for i in reps]
        trainer: StackedTrainer | LoopTrainer
        if stacked:
            trainer = StackedTrainer(heads, [runs[i].train for i in reps], head_labels, amp)
        else:
            auxes = [build_objective(runs[i].train, len(cache.classnames), device) for i in reps]  # None: unmix
            trainer = LoopTrainer(heads, [runs[i].train for i in reps], head_labels, auxes, amp)
        steps, seconds = len(loader), 0.0
        history: list[list[dict]] = [[] for _ in reps]

        for epoch in range(epochs):
            sums = torch.zeros(len(reps), len(trainer.parts), device=device)  # (H, parts)
            t0 = time.perf_counter()
            for step, batch in enumerate(tqdm(loader.epoch(epoch), total=steps,
                                              desc=f"epoch {epoch + 1}/{epochs}", leave=False)):
                tokens = batch.tokens_on(device)  # (B, T, D) float32, read once
                sums += trainer.step(tokens, batch.labels.to(device, non_blocking=True), text,
                                     lr_at(epoch + step / steps, cfg), epoch=epoch + 1,
                                     step=step + 1).to(device)
            means = (sums / steps).cpu()  # (H, parts): the epoch's one read-back
            seconds += time.perf_counter() - t0
            if not evaluated(epoch + 1, cfg):
                continue
            for k, head in enumerate(trainer.unstacked()):
                row = {"epoch": epoch + 1, **dict(zip(trainer.parts, means[k].tolist()))}
                history[k].append({**row, **validate(head, val_loader, text, merit, runs[reps[k]])})

    # -- outputs: one row and one projectors file per grid point --------------------------------
    out = paths.results_dir(params.paths, "ablation")
    final = trainer.unstacked()
    rows = []
    for i, ((lam, alpha, l1, l2), p) in enumerate(zip(points, runs)):
        k = owner[i]
        last = history[k][-1]
        row = {"lambda": lam, "alpha": alpha, **{c: last[c] for c in last if c not in ("epoch", "total")},
               "loss": last["total"], "trained_as": "" if reps[k] == i else labels[reps[k]]}
        if row["trained_as"]:  # its MFI loss value was computed with the trained point's lambda
            row["mfi"] = None
        if uses_infoclip(objective):  # lambda1, lambda2 as trained, swept or not
            row.update(lambda1=p.train.infoclip.lambda1, lambda2=p.train.infoclip.lambda2)
        rows.append(row)
        folder = out / "points" / point_slug(lam, alpha, l1, l2)
        meta = {"model": as_dict(p.model), "train": as_dict(p.train), "params": as_dict(p),
                "embed_dim": cache.dim, "classnames": cache.classnames, "fingerprint": cache.fingerprint,
                "epoch": last["epoch"], "val_map": last["val_map"], "point": labels[i],
                "trained_as": row["trained_as"],
                "provenance": provenance.record(p, cache, val_loader.cache),
                "use": use_record(p, folder / "projectors.pt", cache.fingerprint["backbone"]["weights_digest"])}
        save_projectors(folder / "projectors.pt", final[k], meta)
        atomic_write_text(folder / "history.json", json.dumps(history[k], indent=2) + "\n")
    write_csv(rows, out / "ablation.csv")
    write_markdown(rows, out / "ablation.md", epochs)
    plot_ablation(rows, out / "ablation.png")
    stamp(params, out)  # the report checks which run made the grid
    print(f"ablate: {len(reps)} heads trained for {len(points)} points in {seconds:.1f} s; "
          f"table -> {out / 'ablation.md'}")
    return {"rows": rows, "train_seconds": seconds, "epochs": epochs, "out": str(out),
            "heads": [final[owner[i]].cpu() for i in range(len(points))], "trained": len(reps)}
