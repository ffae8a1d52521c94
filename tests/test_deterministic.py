"""Torch files the project writes are byte-identical for the same contents, whichever process writes
them: torch.save names its zip records after the file it is given, and atomic writes go through a
PID-named temporary file, so the smoke data stage's backbone.pt (and checkpoints, projectors) used
to change sha256 every run and make DVC rebuild both feature stores. End to end: test_dvc.py."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.config.params import as_dict, load_params
from pipeline.data.synthetic import make_planted_coco
from pipeline.model.build import head_from_params
from pipeline.training.checkpoints import save_checkpoint, save_projectors
from stages.download import write_random_backbone

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "configs" / "params.yaml", profile="smoke")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def written_by_two_processes(monkeypatch: pytest.MonkeyPatch, write: Callable[[Path], object],
                             path: Path) -> tuple[str, str]:
    """sha256 of `path` after `write(path)` by two processes (two pids) in turn."""
    digests = []
    for pid in (4001, 4002):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        write(path)
        digests.append(_digest(path))
    monkeypatch.undo()
    return digests[0], digests[1]


def test_the_smoke_backbone_is_the_same_file_every_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_planted_coco(tmp_path / "synthetic", 4, 0, num_classes=4, image_size=64)
    images = sorted((root / "train2017").glob("*.jpg"))
    first, second = written_by_two_processes(
        monkeypatch, lambda out: write_random_backbone(out, "tiny-RN", 0, 64, images), root / "backbone.pt")
    assert first == second


def test_checkpoints_and_projectors_are_the_same_file_for_the_same_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    head = head_from_params(PARAMS.model, 64)
    meta = {"model": as_dict(PARAMS.model), "embed_dim": 64, "classnames": ["a", "b"], "which": "last",
            "epoch": 2, "val_map": 50.0}
    state = {"head": head.state_dict(), "epoch": 2, "params": as_dict(PARAMS), "history": [{"loss": 1.0}]}
    one, two = written_by_two_processes(monkeypatch, lambda p: save_projectors(p, head, meta),
                                        tmp_path / "projectors.pt")
    assert one == two
    one, two = written_by_two_processes(monkeypatch, lambda p: save_checkpoint(p, state), tmp_path / "last.pt")
    assert one == two
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2  # still a torch file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "projectors.pt"]  # no temp left
