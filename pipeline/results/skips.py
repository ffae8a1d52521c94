"""`evaluate.missing: skip` at the start of an evaluation stage: which evaluations still have their
data, and a record of what was skipped (results a DVC stage still expects)."""
from __future__ import annotations

from pipeline.config import paths
from pipeline.config.schema import Params
from pipeline.data.datacheck import require_datasets
from pipeline.results.outputs import stamp, write_skipped


def for_evaluation(params: Params, whats: tuple[str, ...] | list[str]) -> tuple[Params, list[str]]:
    """Call at the start of an evaluation stage: (params, the evaluations that still have data).

    Under `evaluate.missing: error` nothing changes here: the data stage refused before any work,
    and each evaluation names a dataset that went missing since. Under `skip`: zs-mlr without its
    dataset gets results that say so (DVC expects its outputs), figures use the first segmentation
    dataset on disk (in the params returned, a copy), and seg skips its missing datasets itself
    (stages/evaluate_seg.py).
    """
    if params.evaluate.missing != "skip":
        return params, list(whats)
    problems = require_datasets(params, whats=whats, training=False)
    skipped: dict[str, list[str]] = {}
    for p in problems:
        if p.need.what is not None:  # training datasets are never skipped: require_datasets raised
            skipped.setdefault(p.need.what, []).append(p.need.dataset)
    out = params
    kept = []
    for what in whats:
        present = [n for n in out.evaluate.seg.datasets if n not in skipped.get("seg", [])]
        if what == "figures" and "seg" in skipped:
            if present:  # drawn on the first segmentation dataset: the first one on disk
                mine = out.model_copy(deep=True)  # the caller's params stay as they are
                seg = mine.evaluate.seg.model_copy(update={"datasets": present})
                out = mine.model_copy(update={"evaluate": mine.evaluate.model_copy(update={"seg": seg})})
                kept.append(what)
            else:
                folder = paths.results_dir(out.paths, "figures")
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "SKIPPED.txt").write_text(
                    f"no figures: {', '.join(skipped['seg'])} not on disk (evaluate.missing: skip)\n")
                stamp(out, folder)
        elif what == "zs-mlr" and "zs-mlr" in skipped:
            write_skipped(out, what, skipped[what])
        else:
            kept.append(what)
    return out, kept
