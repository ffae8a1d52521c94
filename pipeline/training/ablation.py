"""The lambda x alpha ablation's grid and outputs: a CSV, a Markdown table and paper Fig. 5
(MFI reduction vs mAP, one point per grid cell). With an InfoCLIP objective the grid may also sweep
lambda1 x lambda2 (ablate.lambda1s / lambda2s; [] = the train.infoclip value, not swept)."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from pipeline.config.schema import Params, Train

# mfi_*: plain prompts "A photo of a {class}." (paper Table 4); mfi_pos_*: the positive training prompts.
# lambda1, lambda2, mi_student_teacher: InfoCLIP objectives only (empty otherwise); val_mi_clip:
# I(CLIP alignment; projected alignment) on val tokens (objective.clip_alignment_mi), every objective.
COLUMNS = ("lambda", "alpha", "lambda1", "lambda2", "val_map", "mfi_before", "mfi_after",
           "mfi_reduction_pct", "mfi_pos_before", "mfi_pos_after", "mfi_pos_reduction_pct", "val_mi_clip",
           "mi_student_teacher", "loss", "trained_as")


def point_label(lam: float, alpha: float, lambda1: float | None = None,
                lambda2: float | None = None) -> str:
    """How tables and errors name a grid point: "lambda=0.2, alpha=0.01" (+ lambda1, lambda2)."""
    values = {"lambda": lam, "alpha": alpha, "lambda1": lambda1, "lambda2": lambda2}
    return ", ".join(f"{k}={v:g}" for k, v in values.items() if v is not None)


def point_slug(lam: float, alpha: float, lambda1: float | None = None,
               lambda2: float | None = None) -> str:
    """A folder name for a grid point: lambda0.2_alpha0.01 (+ _lambda1..._lambda2...)."""
    return point_label(lam, alpha, lambda1, lambda2).replace("=", "").replace(", ", "_")


def loss_key(train: Train) -> tuple:
    """What a point's training depends on among the swept values: points with equal keys train the
    same weights. With MFI out of the loss (alpha = 0, or objective infoclip) lambda is irrelevant,
    and alpha too for infoclip; lambda1 / lambda2 only matter with InfoCLIP."""
    from pipeline.model.objective import uses_infoclip, uses_mfi

    objective = train.objective
    mfi = uses_mfi(objective) and train.alpha > 0
    info = uses_infoclip(objective)
    return (float(train.alpha) if mfi else 0.0, float(train.mfi.lambda_) if mfi else None,
            float(train.infoclip.lambda1) if info else None,
            float(train.infoclip.lambda2) if info else None)


def distinct(runs: Sequence[Params]) -> tuple[list[int], list[int]]:
    """(index of the first point of each distinct training, for each point the index into that list)."""
    first: dict[tuple, int] = {}
    owner = []
    for p in runs:
        owner.append(first.setdefault(loss_key(p.train), len(first)))
    reps = [0] * len(first)
    for i in reversed(range(len(runs))):
        reps[owner[i]] = i
    return reps, owner


def point_params(params: Params, lam: float, alpha: float, epochs: int | None,
                 lambda1: float | None = None, lambda2: float | None = None) -> Params:
    """params of one grid point: a solo `pipeline train` with exactly these is the same run.
    lambda1 / lambda2 None keep train.infoclip's values."""
    p = params.model_copy(deep=True)  # nothing shared with `params`
    t = p.train
    infoclip = {k: v for k, v in (("lambda1", lambda1), ("lambda2", lambda2)) if v is not None}
    train = t.model_copy(update={"mfi": t.mfi.model_copy(update={"lambda_": lam}), "alpha": alpha,
                                 "infoclip": t.infoclip.model_copy(update=infoclip),
                                 **({} if epochs is None else {"epochs": epochs})})
    return p.model_copy(update={"train": train})


Point = tuple[float, float, float | None, float | None]  # lambda, alpha, lambda1, lambda2


def grid(lambdas: Sequence[float], alphas: Sequence[float], lambda1s: Sequence[float] = (),
         lambda2s: Sequence[float] = ()) -> list[Point]:
    """(lambda, alpha, lambda1, lambda2) points, lambda-major then alpha, lambda1, lambda2.
    An empty lambda1s / lambda2s gives None there: the params value, not swept."""
    l1s: list[float | None] = [float(v) for v in lambda1s] or [None]
    l2s: list[float | None] = [float(v) for v in lambda2s] or [None]
    return [(float(lam), float(alpha), l1, l2)
            for lam in lambdas for alpha in alphas for l1 in l1s for l2 in l2s]


def write_csv(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(rows: Sequence[dict], path: Path, epochs: int) -> None:
    note = (f"Each point trained for {epochs} epochs from the same seed. MFI = mean off-diagonal cosine "
            "similarity of the class text features before / after the text projector: plain prompts "
            "\"A photo of a {class}.\" (paper Table 4) and the positive training prompts. Val MI = "
            "I(CLIP alignment; projected alignment) on val tokens, bits (InfoCLIP's estimator). "
            "\"Trained as\": points whose loss is the same (alpha = 0 leaves lambda out of it) were "
            "trained once and report that run.")
    info = any("lambda1" in r for r in rows)  # an InfoCLIP objective: its weights get columns
    head = "| lambda | alpha | " + ("lambda1 | lambda2 | " if info else "")
    lines = [note, "",
             (head + "mAP (%) | MFI before | MFI after | MFI reduction (%) "
              "| MFI pos. before | MFI pos. after | MFI pos. reduction (%) | val MI | trained as |"),
             "|" + "---:|" * (10 + 2 * info) + "---|"]
    lines += [f"| {r['lambda']:g} | {r['alpha']:g} | "
              + (f"{r['lambda1']:g} | {r['lambda2']:g} | " if info else "")
              + f"{r['val_map']:.2f} | {r['mfi_before']:.3f} | "
              f"{r['mfi_after']:.3f} | {r['mfi_reduction_pct']:.1f} | {r['mfi_pos_before']:.3f} | "
              f"{r['mfi_pos_after']:.3f} | {r['mfi_pos_reduction_pct']:.1f} | {r['val_mi_clip']:.3f} | "
              f"{r.get('trained_as') or 'itself'} |"
              for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


PANELS = (("val_map", "validation mAP (%)"),
          ("mfi_reduction_pct", 'MFI reduction (%), plain prompts "A photo of a {class}."'),
          ("mfi_pos_reduction_pct", "MFI reduction (%), positive training prompts"))


def plot_ablation(rows: Sequence[dict], path: Path) -> None:
    """One panel per metric, MFI lambda on x (sorted), one line per alpha (and InfoCLIP weights),
    named in one legend: how mAP and disentangling move with lambda at each alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.8), dpi=120)
    series = sorted({_series(r) for r in rows})
    markers = "osD^v<>ph*"
    for ax, (key, title) in zip(axes, PANELS):
        for j, s in enumerate(series):
            sel = sorted((r for r in rows if _series(r) == s), key=lambda r: r["lambda"])
            label = ", ".join(f"{k} = {v:g}" for k, v in zip(("alpha", "lambda1", "lambda2"), s))
            if any(r.get("trained_as") for r in sel):
                label += " (lambda not in the loss: one run)"
            ax.plot([r["lambda"] for r in sel], [r[key] for r in sel], marker=markers[j % len(markers)],
                    label=label, alpha=0.85)
        ax.set_xticks(sorted({r["lambda"] for r in rows}))
        ax.set_xlabel("MFI lambda")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(series), 5), fontsize=8, frameon=False)
    fig.suptitle("Ablation: validation mAP and MFI reduction against lambda, one line per alpha")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _series(row: dict) -> tuple[float, ...]:
    return tuple(row[k] for k in ("alpha", "lambda1", "lambda2") if k in row)
