"""Stage `report`: one Markdown file that collects the tables, metrics and figures of a run.

It is generic on purpose: every stage writes its tables under results/tables/*.md, metrics under
results/metrics/*.json and figures under results/{figures,heatmaps,ablation}/*.png; the report only gathers.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone

from pipeline import paths
from pipeline.files import atomic_write_text


def _metrics_table(metrics: dict) -> list[str]:
    rows = ["| metric | value |", "|---|---|"]
    for key, value in sorted(_flatten(metrics).items()):
        rows.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return rows


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            out[f"{prefix}{key}"] = value
    return out


def run(params: dict) -> dict:
    results = paths.results_dir(params)
    out = results / "report.md"
    b, d, t = params["backbone"], params["data"], params["train"]
    lines = [
        "# Unmix-CLIP run report",
        "",
        (f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Backbone {b['name']} "
         f"({b['checkpoint'] or b['pretrained']}), {b['image_size']} px; dataset {d['dataset']}; "
         f"objective {t['objective']}, alpha {t['alpha']}, MFI {t['mfi']['form']} "
         f"lambda {t['mfi']['lambda']}."),
    ]
    for table in sorted((results / "tables").glob("*.md")):
        lines += ["", f"## {table.stem}", "", table.read_text().strip()]
    ablation = results / "ablation" / "ablation.md"
    if ablation.exists():
        lines += ["", "## ablation (lambda x alpha)", "", ablation.read_text().strip()]
    for metrics in sorted((results / "metrics").glob("*.json")):
        lines += ["", f"## metrics: {metrics.stem}", "", *_metrics_table(json.loads(metrics.read_text()))]
    figures = [png for folder in ("figures", "heatmaps", "ablation")
               for png in sorted((results / folder).glob("*.png"))]
    if figures:
        lines += ["", "## figures"]
        for fig in figures:
            lines += ["", f"![{fig.stem}]({os.path.relpath(fig, out.parent)})"]
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"report: {out}")
    return {"report": str(out), "figures": len(figures)}
