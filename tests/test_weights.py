"""Local weights: checksum, missing file, plain state dicts and TorchScript archives."""
import hashlib

import pytest
import torch

from pipeline.model.backbone import TINY_MODEL, load_backbone
from pipeline.model.weights import WeightsError, load_checkpoint, sha256_file

# torch.jit.script/save are deprecated, but they are how OpenAI's archives were made.
jit_writer = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY_MODEL, pretrained=None, init_seed=3)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000  # spans several read chunks
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


def test_state_dict_round_trip_with_correct_sha256(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    digest = sha256_file(path)
    assert_same_state(load_checkpoint(path, sha256=digest.upper()), tiny.model.state_dict())

    loaded = load_backbone(TINY_MODEL, checkpoint=path, sha256=digest, init_seed=99)
    assert loaded.weights_digest == digest
    assert_same_state(loaded.model.state_dict(), tiny.model.state_dict())


def test_wrong_sha256_names_file_and_both_digests(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    wrong = "0" * 64
    with pytest.raises(WeightsError) as err:
        load_backbone(TINY_MODEL, checkpoint=path, sha256=wrong)
    message = str(err.value)
    assert str(path) in message and wrong in message and sha256_file(path) in message


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nowhere" / "RN101.pt"
    with pytest.raises(WeightsError, match="RN101.pt"):
        load_checkpoint(path)


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="notes.pt"):
        load_checkpoint(path)


def test_wrapped_and_prefixed_state_dict_loads(tiny, tmp_path):
    path = tmp_path / "ddp.pt"
    wrapped = {"state_dict": {"module." + k: v for k, v in tiny.model.state_dict().items()}}
    torch.save(wrapped, path)
    assert_same_state(load_checkpoint(path), tiny.model.state_dict())


def test_checkpoint_for_another_architecture_is_rejected(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    with pytest.raises(WeightsError, match="tiny.pt"):
        load_backbone("RN50", checkpoint=path)


@jit_writer
def test_torchscript_archive_of_the_model_loads_like_openai_weights(tiny, tmp_path):
    """OpenAI ships RN101.pt as a scripted CLIP; a scripted tiny CLIP stands in for it."""
    path = tmp_path / "tiny_jit.pt"
    torch.jit.save(torch.jit.script(tiny.model), str(path))
    loaded = load_backbone(TINY_MODEL, checkpoint=path, init_seed=99)
    assert_same_state(loaded.model.state_dict(), tiny.model.state_dict())
    images = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded.spatial_tokens(images), tiny.spatial_tokens(images))


@jit_writer
def test_small_scripted_module_drops_openai_extras(tmp_path):
    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)
            self.register_buffer("input_resolution", torch.tensor(224))

        def forward(self, x):
            return self.proj(x)

    module = Small()
    path = tmp_path / "small.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    state = load_checkpoint(path, sha256=sha256_file(path))
    assert set(state) == {"proj.weight", "proj.bias"}
    torch.testing.assert_close(state["proj.weight"], module.proj.weight)


def test_unknown_pretrained_tag_fails_with_advice():
    with pytest.raises(WeightsError, match="checkpoint="):
        load_backbone(TINY_MODEL, pretrained="no-such-tag")


def test_sha256_without_checkpoint_is_refused():
    with pytest.raises(ValueError, match="sha256"):
        load_backbone(TINY_MODEL, pretrained=None, sha256="0" * 64)


def test_uncached_pretrained_tag_offline_fails_in_seconds_naming_both_ways_out(tmp_path, monkeypatch):
    import time

    from pipeline.model import weights

    monkeypatch.setattr(weights, "_cached_pretrained", lambda cfg: False)
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:  # port 443 on loopback: refused at once
        weights.check_pretrained_available("RN101", "openai", hosts=("127.0.0.1",), timeout=1)
    assert time.monotonic() - start < 5
    assert "backbone.checkpoint" in str(err.value) and "backbone.pretrained: null" in str(err.value)


def test_random_backbone_is_announced_and_open_clip_noise_is_dropped(capfd, caplog):
    import logging

    from pipeline.config.schema import Backbone
    from pipeline.model.build import backbone_from_params

    b = {"name": TINY_MODEL, "pretrained": None, "checkpoint": None, "sha256": None, "device": "cpu",
         "precision": "fp32", "channels_last": False, "compile": False, "init_seed": 0,
         "recalibrate_bn": False, "image_size": 64}
    with caplog.at_level(logging.WARNING):
        backbone_from_params(Backbone.model_validate(b))
    err = capfd.readouterr().err
    assert err.count("RANDOM weights") == 1 and "backbone.recalibrate_bn" in err
    assert "No pretrained weights loaded" not in caplog.text + err


def test_recalibrate_bn_is_refused_with_pretrained_weights():
    from pipeline.config.params import ParamError, load_params, updated
    from pipeline.model.build import backbone_from_params

    b = updated(load_params(), {"backbone": {"name": "RN101", "pretrained": "openai", "checkpoint": None,
                                             "recalibrate_bn": True}}).backbone
    with pytest.raises(ParamError, match="backbone.recalibrate_bn"):
        backbone_from_params(b)
