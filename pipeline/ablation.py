"""The lambda x alpha ablation's grid and outputs: a CSV, a Markdown table and paper Fig. 5
(MFI reduction vs mAP, one point per grid cell). With an InfoCLIP objective the grid may also sweep
lambda1 x lambda2 (ablate.lambda1s / lambda2s; [] = the train.infoclip value, not swept)."""
from __future__ import annotations

import copy
import csv
from collections.abc import Sequence
from pathlib import Path

# mfi_*: plain prompts "A photo of a {class}." (paper Table 4); mfi_pos_*: the positive training prompts.
# lambda1, lambda2, mi_student_teacher: InfoCLIP objectives only (empty otherwise); val_mi_clip:
# I(CLIP alignment; projected alignment) on val tokens (objective.clip_alignment_mi), every objective.
COLUMNS = ("lambda", "alpha", "lambda1", "lambda2", "val_map", "mfi_before", "mfi_after",
           "mfi_reduction_pct", "mfi_pos_before", "mfi_pos_after", "mfi_pos_reduction_pct", "val_mi_clip",
           "mi_student_teacher", "loss")


def point_params(params: dict, lam: float, alpha: float, epochs: int | None,
                 lambda1: float | None = None, lambda2: float | None = None) -> dict:
    """params of one grid point: a solo `pipeline train` with exactly these is the same run.
    lambda1 / lambda2 None keep train.infoclip's values."""
    p = copy.deepcopy(params)
    p["train"]["mfi"]["lambda"] = lam
    p["train"]["alpha"] = alpha
    if lambda1 is not None:
        p["train"]["infoclip"]["lambda1"] = lambda1
    if lambda2 is not None:
        p["train"]["infoclip"]["lambda2"] = lambda2
    if epochs is not None:
        p["train"]["epochs"] = epochs
    return p


Point = tuple[float, float, float | None, float | None]  # lambda, alpha, lambda1, lambda2


def grid(lambdas: Sequence[float], alphas: Sequence[float], lambda1s: Sequence[float] = (),
         lambda2s: Sequence[float] = ()) -> list[Point]:
    """(lambda, alpha, lambda1, lambda2) points, lambda-major then alpha, lambda1, lambda2.
    An empty lambda1s / lambda2s gives None there: the params value, not swept."""
    l1s = [float(v) for v in lambda1s] or [None]
    l2s = [float(v) for v in lambda2s] or [None]
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
            "I(CLIP alignment; projected alignment) on val tokens, bits (InfoCLIP's estimator).")
    info = any("lambda1" in r for r in rows)  # an InfoCLIP objective: its weights get columns
    head = "| lambda | alpha | " + ("lambda1 | lambda2 | " if info else "")
    lines = [note, "",
             (head + "mAP (%) | MFI before | MFI after | MFI reduction (%) "
              "| MFI pos. before | MFI pos. after | MFI pos. reduction (%) | val MI |"),
             "|" + "---:|" * (10 + 2 * info)]
    lines += [f"| {r['lambda']:g} | {r['alpha']:g} | "
              + (f"{r['lambda1']:g} | {r['lambda2']:g} | " if info else "")
              + f"{r['val_map']:.2f} | {r['mfi_before']:.3f} | "
              f"{r['mfi_after']:.3f} | {r['mfi_reduction_pct']:.1f} | {r['mfi_pos_before']:.3f} | "
              f"{r['mfi_pos_after']:.3f} | {r['mfi_pos_reduction_pct']:.1f} | {r['val_mi_clip']:.3f} |"
              for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def plot_reduction_vs_map(rows: Sequence[dict], path: Path) -> None:
    """Paper Fig. 5: how much disentangling (MFI reduction) each setting buys, against its mAP;
    left the paper's plain prompts, right the positive training prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=120, sharey=True)
    panels = (("mfi_reduction_pct", 'plain prompts "A photo of a {class}."'),
              ("mfi_pos_reduction_pct", "positive training prompts"))
    for ax, (key, title) in zip(axes, panels):
        for series in sorted({_series(r) for r in rows}):  # one line per setting but alpha
            sel = [r for r in rows if _series(r) == series]
            label = ", ".join(f"{k} = {v:g}" for k, v in zip(("lambda", "lambda1", "lambda2"), series))
            ax.plot([r[key] for r in sel], [r["val_map"] for r in sel], "o-", label=label)
            for r in sel:
                ax.annotate(f"alpha={r['alpha']:g}", (r[key], r["val_map"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("MFI reduction (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation mAP (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("MFI reduction vs performance")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _series(row: dict) -> tuple[float, ...]:
    return tuple(row[k] for k in ("lambda", "lambda1", "lambda2") if k in row)
