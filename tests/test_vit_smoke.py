"""The smoke pipeline on the tiny random ViT, end to end through the CLI: data, extraction (MaskCLIP
tokens), training, every evaluation (ZS3 with the ViT token methods), figures, an ablation point and
the report; the projectors learn (val mAP well above the label-frequency baseline)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.app import main
from pipeline.store.cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # tiny-ViT's native size: an 8 x 8 grid of 8 px patches


def run(tmp: Path, *args: str) -> str:
    sets = {"paths.data": tmp / "data", "paths.cache": tmp / "cache", "paths.results": tmp / "results",
            "backbone.name": "tiny-ViT", "backbone.checkpoint": tmp / "data" / "synthetic" / "backbone.pt",
            "backbone.image_size": SIZE, "evaluate.seg.image_size": SIZE, "evaluate.zs_mlr.image_size": SIZE,
            "data.synthetic.n_val": 60, "train.device": "cpu", "backbone.device": "cpu",
            "evaluate.seg.methods": "[clip, clip-vproj, clip-surgery, clip-vv, ours, clip-surgery+ours, clearclip]",
            "ablate.lambdas": "[0.0]", "ablate.alphas": "[0.05]", "ablate.epochs": 2, "figures.images": 1}
    argv = [*args, "--params", str(ROOT / "configs" / "params.yaml"), "--profile", "smoke",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, (args, result.output)
    return result.output


@pytest.mark.slow
def test_the_smoke_pipeline_runs_on_a_vit_and_its_projectors_learn(tmp_path: Path) -> None:
    for stage in (["download"], ["extract-features"], ["train"], ["evaluate", "all"], ["figures"],
                  ["ablate"], ["report"]):
        run(tmp_path, *stage)
    train = FeatureCache.open(tmp_path / "cache" / "features" / "train.zarr")
    assert train.tokens.shape[2:] == (1 + (SIZE // 8) ** 2, 64)  # class token + 8 x 8 grid, D 64
    assert train.fingerprint["params"]["extract.tokens"] == "maskclip"
    val = FeatureCache.open(tmp_path / "cache" / "features" / "val.zarr")
    labels = np.asarray(val.labels)
    assert labels.shape[0] == 60 and set(np.unique(labels)) <= {0, 1}
    # a constant score per class ranks every image alike: its AP is the class's frequency
    baseline = 100 * float(labels.mean(axis=0).mean())
    trained = json.loads((tmp_path / "results" / "details" / "train.json").read_text())
    assert trained["val_map"] >= baseline + 10, (trained["val_map"], baseline)  # the last epoch's
    seg = json.loads((tmp_path / "results" / "details" / "seg.json").read_text())
    assert {"clip", "clearclip", "ours", "clip-surgery+ours"} <= set(seg["datasets"]["synthetic"]["methods"])
    report = (tmp_path / "results" / "report.md").read_text()
    assert "backbone: tiny-ViT, tokens: maskclip (trained on), clip-surgery (ZS3 ours)" in report
    table = (tmp_path / "results" / "tables" / "seg.md").read_text()  # rows say what ran on a ViT
    assert "MaskCLIP's value path" in table and "ResNet" not in table
