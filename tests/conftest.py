"""Shared test set-up: offline, deterministic, small."""
import os

# A pretrained-weights request hangs ~1 min before failing without this: tests must never touch a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# 2 threads (the CI machine's cores) unless OMP_NUM_THREADS says otherwise: the suite must pass at 1
# and at 2 threads, whose float32 summation orders differ.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def store_world(tmp_path_factory: pytest.TempPathFactory):
    """A small run made through the CLI (tests/store_world.py), built once per session."""
    from store_world import build

    return build(tmp_path_factory.mktemp("store-world"))
