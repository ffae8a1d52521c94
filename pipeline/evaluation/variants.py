"""Which variant of each ZS3 method a run computes on each dataset, and the words its tables use.

Three `evaluate.seg` parameters name a rule rather than one value. The rule `released` resolves per
dataset to what the authors' released script for that dataset did (docs/METHOD.md "Released ZS3
methods in detail"); any other value applies to every dataset alike:
  interpolation  released: bilinear on context59 (the Context script), bicubic elsewhere (VOC, COCO);
  ours_norm      released: "before" on COCO (the COCO script: normalise, then project, nothing
                 after), "after" elsewhere (the VOC and Context scripts: project, then normalise).
`cs_ours_norm` is one value for every dataset (CS_Ours exists in the VOC script only);
`coco_masks` concerns COCO-2017 only.

Datasets without a released ZS3 script take the rule of the script of the same images' family:
ZS-MLR's voc2007 / coco2014 those of the VOC / COCO scripts (the released ZS-MLR script was not
audited, so this is this project's reading). The generated `synthetic` data and an image without a
dataset (`pipeline segment` / `query`) take the defaults, bicubic and "after".
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config.schema import Seg
from pipeline.errors import ParamError

RELEASED = "released"
SCRIPT = {"voc2012": "VOC", "voc2007": "VOC", "coco2017": "COCO", "coco2014": "COCO",
          "context59": "Context"}  # the released ZS3 script of each dataset's family
RELEASED_INTERPOLATION = {"Context": "bilinear"}  # else bicubic
RELEASED_OURS_NORM = {"COCO": "before"}  # else after
# coco_masks applies to COCO-2017 only: the generated `synthetic` data (also a COCO layout) keeps
# the official rendering, which is its generator's ground truth (small objects on top)
COCO_MASKS_DATASETS = ("coco2017",)

# The paper's Table 2 row each method's numbers stand beside; None: the table has no such row.
TABLE2_ROW: dict[str, str | None] = {
    "clip": "CLIP", "clip-vproj": None, "clip-surgery": "CLIP Surgery", "clip-vv": "CLIP-VV",
    "ours": "Ours", "clip-surgery+ours": None, "clip-surgery-per-token": None}
NORM_WORDS = {"after": "image normalised after the projector: a cosine, as the paper and the VOC / "
                       "Context scripts",
              "before": "image normalised before the projector, not after, as the COCO script"}
FIXED_WORDS = {
    "clip": "clip (q-k tokens, cosine)",
    "clip-vproj": "clip-vproj (DualCoOp's spatial tokens, cosine)",
    "clip-surgery": "clip-surgery (released: CLIP Surgery's ResNet pool, feature surgery weighted "
                    "from token 0)",
    "clip-vv": "clip-vv (v-v tokens, cosine)",
    "clip-surgery-per-token": "clip-surgery-per-token (this project's variant: v-v tokens, feature "
                              "surgery weighted per token)",
    "clearclip": "clearclip (ViT: ClearCLIP's last block, q-q attention without residual or MLP, cosine)",
}
# on a ViT the same method names read the ViT's own token paths (model/vit_tokens.py)
VIT_FIXED_WORDS = {
    **FIXED_WORDS,
    "clip": "clip (ViT output tokens: the last block's q-k attention, cosine)",
    "clip-vproj": "clip-vproj (ViT: MaskCLIP's value path, cosine)",
    "clip-surgery": "clip-surgery (ViT: CLIP Surgery's v-v path, feature surgery weighted from token 0)",
    "clip-vv": "clip-vv (ViT: CLIP Surgery's v-v tokens, cosine)",
}


def seg_interpolation(rule: str, dataset: str | None = None) -> str:
    """The image resize of `evaluate.seg.interpolation`'s rule on `dataset` (None: any image)."""
    if rule != RELEASED:
        return rule
    return RELEASED_INTERPOLATION.get(SCRIPT.get(dataset or "", ""), "bicubic")


def ours_norm(rule: str, dataset: str | None = None) -> str:
    """The image normalisation of `ours` under `evaluate.seg.ours_norm`'s rule on `dataset`."""
    if rule != RELEASED:
        return rule
    return RELEASED_OURS_NORM.get(SCRIPT.get(dataset or "", ""), "after")


@dataclass(frozen=True)
class SegVariant:
    """What the ZS3 evaluation computes on one dataset (every field a resolved value)."""
    interpolation: str
    ours_norm: str
    cs_ours_norm: str
    coco_masks: str | None  # None: not COCO-2017 (its masks are the dataset's own)

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def masks(self) -> str:
        """load_segmentation's coco_masks for this dataset."""
        return self.coco_masks or "official"


def resolve(seg: Seg, dataset: str) -> SegVariant:
    """The params' rules resolved on one dataset."""
    return SegVariant(seg_interpolation(seg.interpolation, dataset), ours_norm(seg.ours_norm, dataset),
                      seg.cs_ours_norm, seg.coco_masks if dataset in COCO_MASKS_DATASETS else None)


def method_variant(method: str, ours_norms: dict[str, str], cs_ours_norm: str, vit: bool = False) -> str:
    """A method's name with its variant, for a table row spanning datasets; `ours_norms` is
    {dataset: resolved ours normalisation} of the datasets in the table; `vit`: on a ViT backbone."""
    fixed = VIT_FIXED_WORDS if vit else FIXED_WORDS
    if method in fixed:
        return fixed[method]
    if method == "clip-surgery+ours":
        how = {"before": "image normalised before the projector, not after: the released CS_Ours",
               "after": "image normalised after the projector: the paper's cosine"}[cs_ours_norm]
        return f"clip-surgery+ours ({how})"
    if method != "ours":
        raise ParamError(f"no ZS3 method {method!r}")
    norms = sorted(set(ours_norms.values()))
    if len(norms) == 1:
        return f"ours ({NORM_WORDS[norms[0]]})"
    where = {"after": "after the projector (a cosine)", "before": "before the projector (not after)"}
    by_norm = {n: ", ".join(d for d, v in ours_norms.items() if v == n) for n in norms}
    return ("ours (per dataset, as each released script: image normalised "
            + "; ".join(f"{where[n]} on {by_norm[n]}" for n in norms) + ")")


def table2_row(method: str) -> str:
    """The paper's Table 2 row a method corresponds to, or "-"."""
    return TABLE2_ROW.get(method) or "-"


def method_records(methods: Sequence[str], ours_norms: dict[str, str], cs_ours_norm: str,
                   vit: bool = False) -> dict[str, dict[str, str | None]]:
    """{method: {"variant": words, "table2": paper row or None}}, what details files record."""
    return {m: {"variant": method_variant(m, ours_norms, cs_ours_norm, vit), "table2": TABLE2_ROW.get(m)}
            for m in methods}
