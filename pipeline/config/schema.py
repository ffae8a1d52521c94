"""The one declaration of every parameter: its type, range and meaning (pydantic, strict).

`configs/params.yaml` holds the values, this module what a value may be. Unknown keys, strings
where numbers belong, booleans where integers belong and non-finite numbers are all refused
(`pipeline.config.params` turns pydantic's errors into one line naming the dotted key). Keys whose
value is `recipe` in the file are filled from `pipeline/config/recipes/<recipe>.yaml` before validation.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Number = Annotated[float, Field(allow_inf_nan=False)]
PosNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegNumber = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


def _at_least_8(v: int) -> int:
    if v < 8:  # a multiple of the backbone's token stride too: checked with the backbone (params.validate)
        raise ValueError("must be at least 8 (and a multiple of the backbone's token stride)")
    return v


def _device(v: str) -> str:
    if v in {"auto", "cpu", "cuda"} or re.fullmatch(r"cuda:\d+", v):
        return v
    raise ValueError("must be auto, cpu, cuda or cuda:N")


ImageSize = Annotated[int, AfterValidator(_at_least_8)]
Device = Annotated[str, AfterValidator(_device)]
Auto = Literal["auto"]

# The allowed words, as types (what a type checker sees) and as tuples (what messages list).
Recipe = Literal["authors", "paper"]
MultilabelDataset = Literal["coco2014", "coco2017", "voc2007", "synthetic"]
SegDataset = Literal["voc2012", "coco2017", "context59", "synthetic"]
MfiClassSet = Literal["voc", "coco", "context59", "context_unseen", "synthetic"]
MfiForm = Literal["paper", "authors-classes", "authors-features"]
SegMethod = Literal["clip", "clip-vproj", "clip-surgery", "clip-vv", "ours", "clip-surgery+ours",
                    "clip-surgery-per-token", "clearclip"]
# Token methods of the backbones (pipeline/config/backbones.py): ResNet vproj | vv | qk | surgery,
# ViT maskclip | clip-surgery | qk | clearclip; auto = the backbone's default for the role.
TokenMethod = Literal["auto", "vproj", "vv", "qk", "surgery", "maskclip", "clip-surgery", "clearclip"]
SegBackground = Literal["none", "softmax", "max-score"]
MiouProtocol = Literal["dataset", "per-image-positive-pred", "per-image-positive-only", "per-image-predicted"]
Interpolation = Literal["bilinear", "bicubic"]
# ZS3 rules naming a choice per dataset: "released" = what each released script did (the
# resolution per dataset is pipeline/evaluation/variants.py), any other word = every dataset alike
SegInterpolation = Literal["released", "bilinear", "bicubic"]
OursNorm = Literal["released", "after", "before"]
ImageNorm = Literal["after", "before"]
CocoMasks = Literal["official", "released"]
RECIPES: tuple[str, ...] = get_args(Recipe)
MULTILABEL_DATASETS: tuple[str, ...] = get_args(MultilabelDataset)
SEG_DATASETS: tuple[str, ...] = get_args(SegDataset)
MFI_CLASS_SETS: tuple[str, ...] = get_args(MfiClassSet)
MFI_FORMS: tuple[str, ...] = get_args(MfiForm)
SEG_METHODS: tuple[str, ...] = get_args(SegMethod)
SEG_BACKGROUND: tuple[str, ...] = get_args(SegBackground)
MIOU_PROTOCOLS: tuple[str, ...] = get_args(MiouProtocol)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Paths(Section):
    data: str = Field(description="dataset roots live under here (data/coco2014, data/voc2007, ...)")
    cache: str = Field(description="feature stores and checkpoints (git-ignored, large)")
    results: str = Field(description="metrics, plots, figures, report (small)")


class Synthetic(Section):
    n_train: PosInt
    n_val: PosInt
    num_classes: Annotated[int, Field(ge=2, le=80)]
    image_size: Annotated[int, Field(ge=16)]
    seed: NonNegInt


class Data(Section):
    dataset: MultilabelDataset = Field(description="multi-label dataset trained and validated on")
    train_split: str
    val_split: str
    coco_val_images: Literal["annotated", "all"] = Field(
        description="COCO val images: annotated (val2014 40,137, the authors' code) or all (40,504)")
    synthetic: Synthetic


class Backbone(Section):
    name: str = Field(description="open_clip ModifiedResNet or OpenAI-style ViT config: RN50, RN101, "
                      "RN50x4, ViT-B-16, ViT-B-32, ViT-L-14, ViT-L-14-336, tiny-RN, tiny-ViT")
    pretrained: str | None = Field(description="open_clip tag (openai); null = random init")
    checkpoint: str | None = Field(description="local weights file; wins over `pretrained`")
    sha256: str | None = Field(description="expected sha256 of `checkpoint`")
    init_seed: NonNegInt
    recalibrate_bn: bool = Field(description="random init only: recalibrate BatchNorm statistics on "
                                 "the dataset's own images (changes the weights digest)")
    image_size: ImageSize
    precision: Literal["fp32", "fp16", "bf16"]
    channels_last: bool
    compile: bool
    device: Device


class Augment(Section):
    cutout: bool
    cutout_inclusive: bool = Field(description="Cutout rectangle includes its far edge (authors' code)")
    num_ops: NonNegInt
    magnitude: Annotated[int, Field(ge=0, le=30)]
    randaugment: Literal["package", "torchvision"] = Field(
        description="RandAugment of the `randaugment` PyPI package (authors) or torchvision's")
    interpolation: Interpolation = Field(description="resize of training views")


class Extract(Section):
    views: PosInt
    seed: NonNegInt
    shard_size: PosInt
    batch_size: PosInt
    dtype: Literal["float16", "float32"]
    compressor: Literal["none", "zstd"] | None
    num_workers: NonNegInt | Auto = Field(description="decode/augment processes; auto = host cores")
    workers: NonNegInt = Field(description="Dask local cluster size; 0 = in-process")
    scheduler: str | None
    on_bad_image: Literal["error", "skip"]
    eval_interpolation: Interpolation = Field(
        description="resize of the val / test store's un-augmented view (the MLR evaluation view): "
                    "bilinear (the authors' loader, torchvision's default) or bicubic; recorded in "
                    "the eval store's fingerprint")
    tokens: TokenMethod = Field(
        description="the tokens stored and trained on: auto (vproj, DualCoOp's value path, for a "
                    "ResNet; maskclip, MaskCLIP's value path, for a ViT) or a token method of the "
                    "backbone; in the store's fingerprint")
    transforms: Literal["workers", "device"] = Field(
        description="where images are decoded and augmented: workers (PIL, in the decode processes) "
                    "or device (the backbone's, e.g. nvJPEG + torchvision on a GPU; ~1 grey level "
                    "from PIL, so another store fingerprint; needs randaugment torchvision)")
    augment: Augment

    @model_validator(mode="after")
    def _device_transforms_need_torchvision_randaugment(self) -> Extract:
        if self.transforms == "device" and self.augment.randaugment == "package":
            raise ValueError("parameter 'extract.transforms' device cannot run "
                             "'extract.augment.randaugment' package (the `randaugment` package works "
                             "on PIL images only): set extract.transforms: workers or "
                             "extract.augment.randaugment: torchvision (the paper recipe's)")
        return self


class Model(Section):
    proj_dim: PosInt | None
    text_hidden: PosInt | None
    image_projector: Literal["linear", "mlp"]
    softmax: Literal["per_prompt", "positive"]
    text_bn: Literal["eval", "train"] = Field(
        description="text projector BatchNorm while training: eval (initial statistics kept, as run) "
                    "or train (batch statistics, running statistics updated)")


class Asl(Section):
    gamma_neg: NonNegNumber
    gamma_pos: NonNegNumber
    clip: Fraction
    eps: PosNumber


class Mfi(Section):
    form: MfiForm = Field(description="paper (C x C cosine), authors-classes (C x C per "
                                     "prompt set), authors-features (D' x D' cross-correlation)")
    lambda_: NonNegNumber = Field(alias="lambda")


class InfoClip(Section):
    lambda1: NonNegNumber
    lambda2: NonNegNumber
    num_tokens: Annotated[int, Field(ge=2)]
    alpha: PosNumber
    kernel: Literal["gaussian", "linear"]
    temperature: PosNumber
    student_temperature: PosNumber
    mode: Literal["softmax", "cosine"]


class Train(Section):
    objective: Literal["unmix", "infoclip", "unmix+infoclip"]
    epochs: PosInt
    batch_size: PosInt
    optimizer: Literal["sgd", "adam"]
    lr: PosNumber
    lr_schedule: Literal["epoch", "step"] = Field(
        description="cosine stepped once per epoch (Dassl, as run) or every step")
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    weight_decay: NonNegNumber
    warmup_epochs: NonNegInt
    warmup_lr: PosNumber
    view_policy: Literal["random", "cycle"]
    seed: NonNegInt
    device: Device
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    cpu_threads: PosInt | Auto = Field(description="torch threads for the head step on CPU")
    read_threads: PosInt | Auto = Field(
        description="threads reading a batch's views from a streamed store; auto = 1 per 4 cores, <= 8")
    eval_every: PosInt = Field(description="validate every N epochs (and after the last)")
    text_input: Literal["raw", "normalised"] = Field(
        description="text features into the text projector: raw encode_text output (as run) or L2-normalised")
    label_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = Field(
        description="each (image, class) train label kept with this probability, else unknown (-1)")
    asl_weight: PosNumber
    alpha: NonNegNumber
    asl: Asl
    mfi: Mfi
    infoclip: InfoClip

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> Train:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"parameter 'train.warmup_epochs' must be smaller than 'train.epochs', "
                             f"got {self.warmup_epochs} >= {self.epochs}")
        return self


class TextBn(Section):
    """BatchNorm statistics of the text projector per evaluation: running or of the evaluated prompts."""
    mlr: Literal["running", "batch"]
    mfi: Literal["running", "batch"]
    seg: Literal["running", "batch"]


class Seg(Section):
    datasets: list[SegDataset]
    methods: Annotated[list[SegMethod], Field(min_length=1)]
    background: SegBackground = Field(description="none (argmax over classes, as released), "
                                                "softmax (GEM rule) or max-score")
    threshold: Fraction
    protocol: MiouProtocol = Field(description="the headline mIoU; all are computed")
    interpolation: SegInterpolation = Field(
        description="ZS3 image resize: released (per dataset as each released script: bilinear on "
                    "context59, bicubic elsewhere) or one kernel everywhere; `pipeline segment` / "
                    "`query` use it too (released: bicubic)")
    ours_norm: OursNorm = Field(
        description="`ours`' image side: after (h(z) / |h(z)|, the paper's cosine), before (h(z / |z|), "
                    "not normalised after) or released (per dataset as each released script: before "
                    "on COCO, after on VOC / Context)")
    cs_ours_norm: ImageNorm = Field(
        description="`clip-surgery+ours`' image side: before (the released CS_Ours) or after the projector")
    coco_masks: CocoMasks = Field(
        description="COCO-2017 ZS3 masks: official (crowd ignored, small objects on top) or released "
                    "(as the authors' cocoper.py rendered them)")
    pos_interpolation: Interpolation
    image_size: ImageSize
    tokens: TokenMethod = Field(
        description="the tokens `ours` scores (projected by projectors trained on extract.tokens): "
                    "auto (vv for a ResNet, clip-surgery's v-v path for a ViT) or a token method")


class ZsMlr(Section):
    dataset: MultilabelDataset
    split: str
    region_weight: Fraction
    min_area: Fraction
    region_mode: Literal["mask", "crop"]
    image_size: ImageSize


class MfiEval(Section):
    class_sets: list[MfiClassSet]
    control: Literal["auto", "ablation", "train", "none"] = Field(
        description="the alpha = 0 projector row: auto (an ablation point if one matches, else train "
                    "one), ablation (required), train (always this stage's own control run) or none")


class Evaluate(Section):
    batch_size: PosInt
    missing: Literal["error", "skip"] = Field(
        description="a configured evaluation dataset that is not on disk: error (before any work) or skip")
    prompt: Literal["plain", "positive"]
    projectors: Literal["best", "last"] = Field(description="which trained projectors every evaluation uses")
    text_input: Literal["raw", "normalised"] = Field(
        description="text into the projector for ZS3, the MFI figure and ZS-MLR (MLR uses train.text_input)")
    text_bn: TextBn
    voc_names: Literal["authors", "official"] = Field(
        description="VOC prompt names: authors' ('dining table', 'potted plant', 'tv/monitor') or official")
    seg: Seg
    zs_mlr: ZsMlr
    mfi: MfiEval


class Figures(Section):
    images: NonNegInt
    classes: list[str]


class Ablate(Section):
    lambdas: Annotated[list[NonNegNumber], Field(min_length=1)]
    alphas: Annotated[list[NonNegNumber], Field(min_length=1)]
    epochs: PosInt | None
    lambda1s: list[NonNegNumber]
    lambda2s: list[NonNegNumber]


class Params(Section):
    recipe: Recipe = Field(description="authors (the released code's choices) or paper (as written)")
    paths: Paths
    data: Data
    backbone: Backbone
    extract: Extract
    model: Model
    train: Train
    evaluate: Evaluate
    figures: Figures
    ablate: Ablate
