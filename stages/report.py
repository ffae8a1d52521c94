"""Stage `report`: one Markdown file a person reads in a minute (pipeline/results/report.py has the parts).

Order: what ran (and a loud line when the numbers mean nothing), inputs from another run, the
paper beside this run, training, the stages' tables, figures, the ablation; per-class values last,
collapsed. It never refuses: what it cannot vouch for is marked at the top.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from pipeline.config import paths
from pipeline.config.schema import Params
from pipeline.files import atomic_write_text
from pipeline.results.outputs import project_relative
from pipeline.results.report import (
    paper_table,
    per_class_sections,
    provenance_warnings,
    read_json,
    recipe_lines,
    what_ran,
)
from pipeline.training import provenance

TABLE_ORDER = ("mlr", "mfi", "seg", "seg-baselines", "zs-mlr")


def run(params: Params) -> dict[str, Any]:
    results = paths.results_dir(params.paths)
    out = results / "report.md"
    lines = ["# Unmix-CLIP run report", "",
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.", "", *what_ran(params)]
    foreign = provenance_warnings(results, params) + provenance.check(params)
    if foreign:
        lines += ["", "> **WARNING: inputs from another run** (re-run `dvc repro` to make them agree):"]
        lines += [f"> - {w}" for w in foreign]
    lines += ["", "## Paper vs this run", "", *paper_table(results, params)]
    lines += ["", *recipe_lines(results)]
    trained = read_json(results / "details" / "train.json")
    if "last" in trained or "best" in trained:
        used = params.evaluate.projectors
        lines += ["", "## Training", "", "| projectors | file | epoch | val mAP | evaluations use it |",
                  "|---|---|---:|---:|---|"]
        lines += [f"| {which} | `{trained[which]['projectors']}` | {trained[which]['epoch']} | "
                  f"{trained[which]['val_map']:.2f} | {'yes' if which == used else 'no'} |"
                  for which in ("last", "best") if which in trained]
    tables = sorted((results / "tables").glob("*.md"),
                    key=lambda p: (TABLE_ORDER.index(p.stem) if p.stem in TABLE_ORDER else 99, p.stem))
    if (results / "tables" / "seg.md").exists():  # the projector methods' table has the baselines too
        tables = [t for t in tables if t.stem != "seg-baselines"]
    for table in tables:
        lines += ["", table.read_text().strip()]  # each stage's table carries its own heading
    figures = [png for folder in ("figures", "heatmaps")
               for png in sorted((results / folder).glob("*.png"))]
    if figures:
        lines += ["", "## Figures"]
        lines += [f"\n![{fig.stem}]({os.path.relpath(fig, out.parent)})" for fig in figures]
    ablation = results / "ablation" / "ablation.md"
    if ablation.exists():
        lines += ["", "## Ablation (lambda x alpha)", "", ablation.read_text().strip()]
        lines += [f"\n![{p.stem}]({os.path.relpath(p, out.parent)})"
                  for p in sorted((results / "ablation").glob("*.png"))]
    per_class = per_class_sections(results)
    if per_class:
        lines += ["", "## Per-class values", *per_class]
    atomic_write_text(out, project_relative("\n".join(lines)) + "\n")  # no machine's paths
    print(f"report: {out}" + (f" ({len(foreign)} input(s) from another run, marked at the top)"
                              if foreign else ""))
    return {"report": str(out), "figures": len(figures), "foreign": foreign}
