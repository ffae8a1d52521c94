"""`pipeline ablate`: a lambda x alpha grid trained in ONE pass over the cache per epoch.

Reading tokens is the shared, expensive part: each batch is read once and fed to every grid
point's head in turn, each with its own optimiser, through the same training.train_step a solo
`pipeline train` uses, from the same seeded initial head. So every point ends with the weights
its solo run would reach (same batches, same arithmetic), while the grid pays for reading once.
With an InfoCLIP objective each point also has its own LPAM (in its optimiser) and its own
token-sampling generator seeded by train.seed, so the grid = solo property holds for it too;
ablate.lambda1s / lambda2s then sweep InfoCLIP's weights as well.
"""
from __future__ import annotations

import time

from tqdm import tqdm

from pipeline import paths
from pipeline.ablation import grid, plot_reduction_vs_map, point_params, write_csv, write_markdown
from pipeline.build import resolve_device
from pipeline.config import ParamError
from pipeline.metrics import mean_average_precision
from pipeline.objective import (
    build_objective,
    clip_alignment_mi,
    trainable_parameters,
    uses_infoclip,
)
from pipeline.results import stamp
from pipeline.training import (
    amp_dtype,
    build_optimizer,
    evaluate_head,
    lr_at,
    make_scaler,
    new_head,
    set_lr,
    text_figure_of_merit,
    train_step,
)
from stages.train import open_data


def run(params: dict, lambdas: list[float] | None = None, alphas: list[float] | None = None,
        lambda1s: list[float] | None = None, lambda2s: list[float] | None = None) -> dict:
    a = params["ablate"]
    sweeps = {"lambda1s": a.get("lambda1s", []) if lambda1s is None else lambda1s,
              "lambda2s": a.get("lambda2s", []) if lambda2s is None else lambda2s}
    objective = params["train"]["objective"]
    for key, values in sweeps.items():
        if values and not uses_infoclip(objective):
            raise ParamError(f"parameter 'ablate.{key}' sweeps an InfoCLIP weight, but 'train.objective' "
                             f"is {objective!r}: set it to infoclip or unmix+infoclip, or ablate.{key} to []")
    points = grid(a["lambdas"] if lambdas is None else lambdas, a["alphas"] if alphas is None else alphas,
                  sweeps["lambda1s"], sweeps["lambda2s"])
    runs = [point_params(params, lam, alpha, a["epochs"], l1, l2) for lam, alpha, l1, l2 in points]
    epochs = runs[0]["train"]["epochs"]
    device = resolve_device(params["train"]["device"])
    amp = amp_dtype(device, params["train"]["precision"])
    print(f"ablate: {len(points)} grid points x {epochs} epochs on {device}")

    # -- data, heads, optimisers (one per point) ---------------------------------------------------
    loader, val_loader, text = open_data(params, device)
    heads = [new_head(p, loader.cache.dim, device) for p in runs]
    num_classes = len(loader.cache.classnames)
    auxes = [build_objective(p["train"], num_classes, device) for p in runs]  # None for unmix
    optimizers = [build_optimizer(trainable_parameters(h, x), p["train"])
                  for h, x, p in zip(heads, auxes, runs)]
    scalers = [make_scaler(amp) for _ in runs]
    steps = len(loader)
    losses, mis = [0.0] * len(runs), [0.0] * len(runs)

    # -- one pass over the cache per epoch, every head on every batch ------------------------------
    start = time.perf_counter()
    for epoch in range(epochs):
        losses, mis = [0.0] * len(runs), [0.0] * len(runs)
        for step, batch in enumerate(tqdm(loader.epoch(epoch), total=steps,
                                          desc=f"epoch {epoch + 1}/{epochs}", leave=False)):
            tokens = batch.tokens.to(device, non_blocking=True)  # (B, T, D), read once
            labels = batch.labels.to(device)
            for i, (head, aux, optimizer, scaler, p) in enumerate(
                    zip(heads, auxes, optimizers, scalers, runs)):
                set_lr(optimizer, lr_at(epoch + step / steps, p["train"]))
                parts = train_step(head, optimizer, tokens, labels, text, p["train"], aux,
                                   epoch=epoch + 1, step=step + 1, amp=amp, scaler=scaler)
                losses[i] += parts["total"] / steps
                if aux is not None:
                    mis[i] += float(aux.last_mi) / steps
    seconds = time.perf_counter() - start

    # -- evaluation and outputs ------------------------------------------------------------------
    rows = []
    for (lam, alpha, _, _), head, aux, p, loss, mi in zip(points, heads, auxes, runs, losses, mis):
        scores, labels = evaluate_head(head, val_loader, text, amp)
        merit = text_figure_of_merit(head, text["plain"])
        pos = text_figure_of_merit(head, text["positive"])
        cfg = p["train"]
        row = {"lambda": lam, "alpha": alpha, "val_map": mean_average_precision(scores, labels),
               "mfi_before": merit["before"], "mfi_after": merit["after"],
               "mfi_reduction_pct": merit["reduction_pct"], "mfi_pos_before": pos["before"],
               "mfi_pos_after": pos["after"], "mfi_pos_reduction_pct": pos["reduction_pct"],
               "val_mi_clip": clip_alignment_mi(head, val_loader.epoch(0), text, cfg["infoclip"],
                                                seed=cfg["seed"]),
               "loss": loss}
        if aux is not None:  # lambda1, lambda2 as trained, swept or not
            row.update(lambda1=cfg["infoclip"]["lambda1"], lambda2=cfg["infoclip"]["lambda2"],
                       mi_student_teacher=mi)
        rows.append(row)
    out = paths.results_dir(params, "ablation")
    write_csv(rows, out / "ablation.csv")
    write_markdown(rows, out / "ablation.md", epochs)
    plot_reduction_vs_map(rows, out / "mfi_reduction_vs_map.png")
    stamp(params, out)  # the report checks which run made the grid
    print(f"ablate: {len(points)} points trained in {seconds:.1f} s; table -> {out / 'ablation.md'}")
    return {"rows": rows, "train_seconds": seconds, "epochs": epochs, "out": str(out),
            "heads": [h.cpu() for h in heads]}

