"""Turn params into objects (device, frozen backbone, head) in one place, so every stage agrees.

The backbone is where a run can silently mean nothing: random weights print one loud line, a
pretrained tag that is neither cached nor reachable fails in seconds naming `backbone.checkpoint`
and `backbone.pretrained: null`, and `backbone.recalibrate_bn` (random init only) re-estimates the
BatchNorm statistics on the training dataset's own images (else a random ModifiedResNet maps every
image to nearly the same tokens; docs/TESTING.md, trap 1). Either tower: a ModifiedResNet gives a
FrozenCLIP, an OpenAI-style ViT a FrozenViT (model.vit.load_any_backbone); a ViT has LayerNorms,
no BatchNorm, so recalibrating one is refused.
"""
from __future__ import annotations

import sys

import torch

from pipeline.config.backbones import backbone_kind
from pipeline.config.schema import Backbone, Model, Params
from pipeline.model.backbone import FrozenTowers
from pipeline.model.heads import UnmixHead
from pipeline.model.vit import FrozenViT, load_any_backbone
from pipeline.model.weights import check_pretrained_available


def resolve_device(spec: str | None = "auto") -> torch.device:
    """'auto' -> the first CUDA device when present, else CPU."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def is_random(b: Backbone) -> bool:
    """The backbone section describes random weights (no checkpoint, no pretrained tag)."""
    return not b.checkpoint and b.pretrained in (None, "random")


def random_warning(b: Backbone) -> str:
    resnet = backbone_kind(b.name) == "resnet"  # a ViT has no BatchNorm statistics to recalibrate
    fix = "" if b.recalibrate_bn or not resnet else "; set 'backbone.recalibrate_bn: true' at least"
    return (f"WARNING: backbone {b.name} has RANDOM weights (backbone.pretrained: null, no "
            f"backbone.checkpoint): every number of this run means nothing{fix}")


def backbone_from_params(b: Backbone, device: torch.device | None = None, *,
                         params: Params | None = None) -> FrozenTowers:
    """The frozen backbone of the backbone section (BatchNorm recalibrated when asked, which needs
    the whole `params` too: the statistics come from the training images of data and paths)."""
    from pipeline.config.params import ParamError

    if b.recalibrate_bn and not is_random(b):
        raise ParamError("'backbone.recalibrate_bn' changes the weights' BatchNorm statistics: only for "
                         "random init (backbone.pretrained: null, no backbone.checkpoint); set it false")
    pretrained = None if b.checkpoint else b.pretrained
    if pretrained not in (None, "random"):
        check_pretrained_available(b.name, pretrained)
    backbone = load_any_backbone(
        b.name, pretrained=pretrained, checkpoint=b.checkpoint, sha256=b.sha256,
        device=str(device or resolve_device(b.device)), precision=b.precision,
        channels_last=b.channels_last, compile=b.compile, init_seed=b.init_seed)
    if b.recalibrate_bn and isinstance(backbone, FrozenViT):
        raise ParamError(f"'backbone.recalibrate_bn': {b.name} is a ViT, whose LayerNorms have no running "
                         "statistics to recalibrate: set it false")
    if is_random(b):
        print(random_warning(b), file=sys.stderr, flush=True)
        if b.recalibrate_bn:  # imported only then: it reads the dataset
            from pipeline.model.recalibrate import recalibrate_on_dataset

            if params is None:
                raise ParamError("'backbone.recalibrate_bn' needs the dataset: pass the whole params")
            recalibrate_on_dataset(backbone, params)
    return backbone


def head_from_params(model: Model, embed_dim: int) -> UnmixHead:
    """`model` is the params' model section (a projectors file records it to rebuild the head)."""
    return UnmixHead(
        embed_dim,
        proj_dim=model.proj_dim,
        text_hidden=model.text_hidden,
        image_projector=model.image_projector,
        softmax_mode=model.softmax,
        text_bn=model.text_bn,
    )
