"""`pipeline ablate`: every lambda x alpha point of the one-pass grid equals its solo training run."""
from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import pytest
import torch
from test_training import fresh, shared_world, single_threaded, weights

from pipeline.ablation import point_params
from stages import ablate, train

LAMBDAS, ALPHAS, EPOCHS = [0.2, 1.0], [0.05, 2.0], 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with single_threaded():
        yield shared_world(tmp_path_factory)


def test_each_grid_point_equals_its_solo_run(world: dict, tmp_path: Path) -> None:
    params = fresh(world, tmp_path / "grid")
    params["ablate"] = {"lambdas": LAMBDAS, "alphas": ALPHAS, "epochs": EPOCHS}
    result = ablate.run(params)
    assert result["epochs"] == EPOCHS != params["train"]["epochs"]  # ablate.epochs overrides train.epochs
    rows = result["rows"]
    assert [(r["lambda"], r["alpha"]) for r in rows] == [(lam, a) for lam in LAMBDAS for a in ALPHAS]

    for i, (row, head) in enumerate(zip(rows, result["heads"])):
        solo = point_params(fresh(world, tmp_path / f"solo{i}"), row["lambda"], row["alpha"], EPOCHS)
        summary = train.run(solo)
        grid_weights, solo_weights = head.state_dict(), weights(solo)
        for k in solo_weights:
            assert torch.allclose(grid_weights[k], solo_weights[k], rtol=1e-5, atol=1e-7), (i, k)
        assert row["val_map"] == pytest.approx(summary["val_map"], abs=1e-6)
        assert row["mfi_after"] == pytest.approx(summary["mfi"]["after"], abs=1e-6)
    # the points are different runs: alpha changes the weights, lambda too once alpha > 0
    w = [h.state_dict()["text_projector.net.0.weight"] for h in result["heads"]]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[3])

    out = Path(result["out"])
    with (out / "ablation.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(float(r["lambda"]), float(r["alpha"])) for r in table] == [(r["lambda"], r["alpha"]) for r in rows]
    assert [float(r["val_map"]) for r in table] == pytest.approx([r["val_map"] for r in rows])
    md = (out / "ablation.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in md) == 1 + len(rows)  # header + one line per point
    png = matplotlib.image.imread(out / "mfi_reduction_vs_map.png")
    assert png.ndim == 3 and png.shape[0] > 100 and png.std() > 0  # a drawn figure, not a blank


def test_cli_grid_overrides_params_grid(world: dict, tmp_path: Path) -> None:
    params = fresh(world, tmp_path)
    params["ablate"] = {"lambdas": [0.2], "alphas": [0.05], "epochs": 1}
    rows = ablate.run(params, lambdas=[0.0, 0.5], alphas=[0.1])["rows"]
    assert [(r["lambda"], r["alpha"]) for r in rows] == [(0.0, 0.1), (0.5, 0.1)]
