"""Shared fixture of test_api.py and test_segment_cli.py: a tiny random CLIP (BatchNorm
recalibrated, saved as a checkpoint), smoke projectors trained in the fixture on planted-signal
images, and planted test images on disk with their ground-truth masks (as tests/test_evaluate.py).
The same head is also saved as `pipeline train` writes it, with its record (meta["use"]), in two
run layouts: "recorded" names the checkpoint (base/backbone.pt, project root base), "recorded_bn"
a random backbone with its recalibrated BatchNorm statistics file (project root base/random-run).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import paths
from pipeline.config.params import as_dict, load_params, updated
from pipeline.config.schema import Params
from pipeline.data.augment import eval_view
from pipeline.data.classes import COCO_CLASSES
from pipeline.data.synthetic import planted_sample
from pipeline.model.backbone import POSITIVE_TEMPLATE, load_backbone
from pipeline.model.recalibrate import bn_state_file, recalibrate_batchnorm, save_bn_state
from pipeline.model.weights import sha256_file
from pipeline.training.loop import build_optimizer, new_head, save_projectors, train_step
from pipeline.training.usage import use_record

REPO = Path(__file__).resolve().parents[1]
# lr 1e-3: at 3e-3 the trained head changed with the floating-point order (object mIoU 0.264
# trained in float32, 0.288 in float64); at 1e-3 the two agree to 1e-4 (tests/test_api.py).
NUM_CLASSES, N_TRAIN, N_TEST, PIXELS, SIZE, STEPS, LR = 8, 48, 12, 96, 128, 300, 1e-3
CLASSES = list(COCO_CLASSES[:NUM_CLASSES])
TEMPLATE = POSITIVE_TEMPLATE  # the training prompt: a random text tower puts others far away


def planted_mask(objects, size: int) -> np.ndarray:
    """(H, W) uint8: 0 background, k + 1 class k; squares painted largest first like the pixels."""
    mask = np.zeros((size, size), np.uint8)
    for o in objects:
        mask[o.y0:o.y0 + o.side, o.x0:o.x0 + o.side] = o.cls + 1
    return mask


def _labels(objects) -> np.ndarray:
    row = np.zeros(NUM_CLASSES, np.int8)
    row[[o.cls for o in objects]] = 1
    return row


_BUILT: dict[str, dict] = {}  # both test modules import the fixture: build it once per session


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny head is ~30x slower on 2 shared threads
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = _build(tmp_path_factory.mktemp("segment"))
    yield _BUILT[key]
    torch.set_num_threads(threads)


def _build(base: Path) -> dict:
    train = [planted_sample(0, "train", i, PIXELS, NUM_CLASSES) for i in range(N_TRAIN)]
    test = [planted_sample(0, "val", i, PIXELS, NUM_CLASSES) for i in range(N_TEST)]
    images = base / "images"
    images.mkdir()
    files = []
    for i, (pixels, _) in enumerate(test):
        files.append(images / f"planted_{i:02d}.png")  # lossless: file and in-memory image agree
        Image.fromarray(pixels).save(files[-1])
    masks = [planted_mask(objects, PIXELS) for _, objects in test]

    backbone = load_backbone("tiny-RN", pretrained=None)
    x_train = torch.stack([eval_view(Image.fromarray(p), SIZE) for p, _ in train])  # (N, 3, S, S)
    recalibrate_batchnorm(backbone, [x_train])  # random-init backbone only (TESTING trap 1)
    checkpoint = base / "backbone.pt"
    torch.save(backbone.model.state_dict(), checkpoint)
    digest = sha256_file(checkpoint)

    # The paper recipe: the authors' (eval-mode text BatchNorm, raw text input, their loss weights)
    # does not learn this toy task in 300 steps (object mIoU at chance, like CLIP-VV).
    params = updated(load_params(REPO / "configs" / "params.yaml", ["recipe=paper"], profile="smoke"), {
        "paths": {"data": str(base / "data"), "cache": str(base / "cache"), "results": str(base / "results")},
        "backbone.checkpoint": str(checkpoint), "backbone.device": "cpu", "evaluate.seg.image_size": SIZE,
        "evaluate.batch_size": 5})  # batches that do not divide N_TEST
    labels = torch.from_numpy(np.stack([_labels(o) for _, o in train])).long()  # (N, C)
    head = _train_head(backbone, x_train, labels, params, torch.float32)
    projectors = base / "projectors.pt"
    meta = {"model": as_dict(params.model), "embed_dim": backbone.embed_dim, "classnames": CLASSES, "epoch": 0,
            "fingerprint": {"backbone": {"name": "tiny-RN", "weights_digest": digest},
                            "image_size": SIZE}}
    save_projectors(projectors, head, meta)
    params_file = base / "params.yaml"
    params_file.write_text(yaml.safe_dump(as_dict(params), sort_keys=False))
    recorded = paths.projectors(params.paths, "best")  # base/cache/models/projectors-best.pt
    save_projectors(recorded, head, {**meta, "use": use_record(params, recorded, digest, root=base)})
    run = base / "random-run"  # a random backbone with backbone.recalibrate_bn, as the README's CPU trial
    random = updated(params, {"paths": {"data": str(run / "data"), "cache": str(run / "cache"),
                                        "results": str(run / "results")},
                              "backbone.checkpoint": None, "backbone.pretrained": None,
                              "backbone.recalibrate_bn": True})
    save_bn_state(backbone, bn_state_file(random), identity={})
    recorded_bn = paths.projectors(random.paths, "best")
    save_projectors(recorded_bn, head, {**meta, "use": use_record(random, recorded_bn, backbone.weights_digest,
                                                                  root=run)})
    wide: dict = {}

    def float64() -> dict:
        """The backbone and the head trained again, all in float64 (built on the first call)."""
        if not wide:
            wide["backbone"] = float64_backbone(checkpoint)
            wide["head"] = _train_head(wide["backbone"], x_train, labels, params, torch.float64)
        return wide

    return {"base": base, "files": files, "masks": masks, "checkpoint": checkpoint, "digest": digest,
            "projectors": projectors, "params": params, "recorded": recorded, "recorded_bn": recorded_bn, "params_file": params_file,
            "backbone": backbone, "head": head, "images_dir": images, "meta": meta,
            "float64": float64}


def _train_head(backbone, x_train: torch.Tensor, labels: torch.Tensor, params: Params,
                dtype: torch.dtype):
    """STEPS full-batch steps on the spatial tokens of x_train (N, 3, S, S), computed in `dtype`."""
    text = {k: v.to(dtype) for k, v in backbone.class_text_features(CLASSES).items()}  # (C, D) each
    tokens = backbone.spatial_tokens(x_train).to(dtype)  # (N, T, D)
    head = new_head(params, backbone.embed_dim, torch.device("cpu")).to(dtype)
    optimizer = build_optimizer(head.parameters(), params.train.model_copy(update={"lr": LR}))
    for step in range(STEPS):
        train_step(head, optimizer, tokens, labels, text, params.train, step=step)
    return head.eval()


def float64_backbone(checkpoint: Path):
    """The checkpoint's backbone computing in float64, its outputs float64 too. FrozenCLIP casts
    its input to float32 (_prepare) and its outputs back to float32: this instance casts its input
    to float64 and its token / text outputs (rounded to float32 by the library: 6e-8 relative, far
    below float32 arithmetic's own error over a network) to float64, so that a float64 head and
    UnmixCLIP take them as they are. The score maps UnmixCLIP derives are float32 again (the
    library's maps_from_tokens), after everything before them ran in float64."""
    backbone = load_backbone("tiny-RN", pretrained=None, checkpoint=checkpoint)
    backbone.model.double()
    backbone._prepare = lambda images: images.to(backbone.device, torch.float64)
    paths, text = backbone.token_paths, backbone.text_features
    backbone.token_paths = lambda *a, **k: {n: t.double() for n, t in paths(*a, **k).items()}
    backbone.text_features = lambda *a, **k: text(*a, **k).double()
    return backbone
