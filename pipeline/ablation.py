"""The lambda x alpha ablation's grid and outputs: a CSV, a Markdown table and paper Fig. 5
(MFI reduction vs mAP, one point per grid cell)."""
from __future__ import annotations

import copy
import csv
from collections.abc import Sequence
from pathlib import Path

# mfi_*: plain prompts "A photo of a {class}." (paper Table 4); mfi_pos_*: the positive training prompts.
COLUMNS = ("lambda", "alpha", "val_map", "mfi_before", "mfi_after", "mfi_reduction_pct",
           "mfi_pos_before", "mfi_pos_after", "mfi_pos_reduction_pct", "loss")


def point_params(params: dict, lam: float, alpha: float, epochs: int | None) -> dict:
    """params of one grid point: a solo `pipeline train` with exactly these is the same run."""
    p = copy.deepcopy(params)
    p["train"]["mfi"]["lambda"] = lam
    p["train"]["alpha"] = alpha
    if epochs is not None:
        p["train"]["epochs"] = epochs
    return p


def grid(lambdas: Sequence[float], alphas: Sequence[float]) -> list[tuple[float, float]]:
    """(lambda, alpha) pairs, lambda-major."""
    return [(float(lam), float(alpha)) for lam in lambdas for alpha in alphas]


def write_csv(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(rows: Sequence[dict], path: Path, epochs: int) -> None:
    note = (f"Each point trained for {epochs} epochs from the same seed. MFI = mean off-diagonal cosine "
            "similarity of the class text features before / after the text projector: plain prompts "
            "\"A photo of a {class}.\" (paper Table 4) and the positive training prompts.")
    lines = [note, "",
             ("| lambda | alpha | mAP (%) | MFI before | MFI after | MFI reduction (%) "
             "| MFI pos. before | MFI pos. after | MFI pos. reduction (%) |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['lambda']:g} | {r['alpha']:g} | {r['val_map']:.2f} | {r['mfi_before']:.3f} | "
              f"{r['mfi_after']:.3f} | {r['mfi_reduction_pct']:.1f} | {r['mfi_pos_before']:.3f} | "
              f"{r['mfi_pos_after']:.3f} | {r['mfi_pos_reduction_pct']:.1f} |" for r in rows]
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
        for lam in sorted({r["lambda"] for r in rows}):
            sel = [r for r in rows if r["lambda"] == lam]
            ax.plot([r[key] for r in sel], [r["val_map"] for r in sel], "o-", label=f"lambda = {lam:g}")
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
