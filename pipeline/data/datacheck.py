"""Is every dataset the params configure on disk, in the layout its reader expects?

Checked before any work (the `data` stage) and again at the start of the evaluation stages, so a
missing PASCAL Context fails in a second naming the parameter to change, not after an hour of
extraction. Only cheap checks: the folders and split/annotation files the readers open (a COCO
annotation file is opened by its reader later; an archive fetched by `pipeline download` was
verified by size and md5 before unpacking, its `.done-<archive>` marker records that).

`evaluate.missing: skip` means "evaluate what is present": a missing evaluation dataset is left
out with a printed line and recorded under `skipped` in the results; the training dataset is
never optional.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import paths
from pipeline.config.schema import Params
from pipeline.data.datasets import DatasetError, link_problem

_COCO_YEARS = {"coco2014": "2014", "coco2017": "2017", "synthetic": "2017"}
_VOC = {  # name -> (year, split-file folder, extra folder the reader opens)
    "voc2007": ("2007", "ImageSets/Main", "Annotations"),
    "voc2012": ("2012", "ImageSets/Segmentation", "SegmentationClass"),
    "context59": ("2010", "ImageSets/SegmentationContext", "SegmentationClassContext"),
}
SEG_SPLIT = "val"


@dataclass(frozen=True)
class Need:
    """One dataset split a stage will read, and the parameter that asks for it."""

    dataset: str
    split: str
    param: str          # the key to change to drop or replace it
    what: str | None    # the evaluation that reads it (None: training, never optional)


@dataclass(frozen=True)
class Problem:
    need: Need
    message: str

    def __str__(self) -> str:
        return self.message


def needs(params: Params) -> list[Need]:
    """Every dataset split the configured stages read: training first, then the evaluations."""
    d, ev = params.data, params.evaluate
    out = [Need(d.dataset, d.train_split, "data.dataset", None),
           Need(d.dataset, d.val_split, "data.dataset", None)]
    out += [Need(name, SEG_SPLIT, "evaluate.seg.datasets", "seg") for name in ev.seg.datasets]
    z = ev.zs_mlr
    out.append(Need(z.dataset, z.split, "evaluate.zs_mlr.dataset", "zs-mlr"))
    return out


def layout_problem(name: str, root: Path, split: str) -> str | None:
    """None when `root` has what the reader of `name` opens for `split`, else what is missing."""
    if not root.exists():
        return link_problem(root) or f"{root} not found"
    if name in _COCO_YEARS:
        year = _COCO_YEARS[name]
        ann, images = root / "annotations" / f"instances_{split}{year}.json", root / f"{split}{year}"
        missing = [str(p) for p in (ann, images) if not p.exists()]
        if missing:
            return f"{' and '.join(missing)} not found (COCO layout: {root}/annotations/" \
                   f"instances_{split}{year}.json and {root}/{split}{year}/*.jpg)"
        if not any(images.iterdir()):
            return f"{images} is empty"
        return None
    if name in _VOC:
        year, sets, extra = _VOC[name]
        for voc in (root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
            if (voc / sets).is_dir():
                break
        else:
            return f"no {root}/VOCdevkit/VOC{year}/{sets}/ (PASCAL VOC{year} layout)"
        missing = [str(p) for p in (voc / sets / f"{split}.txt", voc / extra, voc / "JPEGImages")
                   if not p.exists()]
        return f"{', '.join(missing)} not found" if missing else None
    return f"unknown dataset {name!r}"


def _how(need: Need) -> str:
    if need.dataset == "synthetic":
        return "run `pipeline download` (it generates it)"
    if need.dataset == "context59":
        return "PASCAL Context is prepared by hand (README, 'Datasets')"
    return f"place it there or run `pipeline download --dataset {need.dataset}`"


def check_datasets(params: Params, *, generated_ok: bool = False) -> list[Problem]:
    """One Problem per configured dataset split that is absent or not in its layout.

    ``generated_ok``: the synthetic dataset is not a problem when absent (the data stage makes it).
    """
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for need in needs(params):
        if (need.dataset, need.split) in seen:
            continue
        seen.add((need.dataset, need.split))
        root = paths.dataset_root(params.paths, need.dataset)
        if generated_ok and need.dataset == "synthetic" and not root.exists() and not link_problem(root):
            continue
        problem = layout_problem(need.dataset, root, need.split)
        if problem:
            use = "training dataset" if need.what is None else f"evaluation {need.what}"
            problems.append(Problem(need, (
                f"dataset {need.dataset} ({use}, split {need.split}, from '{need.param}'): {problem}; "
                f"{_how(need)}, or change '{need.param}'"
                + ("" if need.what is None else " or set 'evaluate.missing: skip'"))))
    return problems


def require_datasets(params: Params, *, generated_ok: bool = False,
                     whats: tuple[str, ...] | list[str] | None = None,
                     training: bool = True) -> list[Problem]:
    """Raise DatasetError (all problems, one per line) unless every one is a skippable evaluation
    dataset under `evaluate.missing: skip`; those are printed and returned.

    ``whats``: only the datasets of these evaluations (None: all); ``training``: and the training one."""
    problems = check_datasets(params, generated_ok=generated_ok)
    if whats is not None:
        reads = set(whats) | ({"seg"} if "figures" in whats else set())
        problems = [p for p in problems if p.need.what in reads or (training and p.need.what is None)]
    elif not training:
        problems = [p for p in problems if p.need.what is not None]
    fatal = [p for p in problems if p.need.what is None or params.evaluate.missing == "error"]
    if fatal:
        raise DatasetError("\n".join(str(p) for p in fatal))
    for p in problems:
        print(f"skipping {p.need.dataset} for {p.need.what}: not on disk (evaluate.missing: skip)",
              flush=True)
    return problems
