"""Local CLIP weights: one place that checks a file's sha256 and reads it as a state dict.

OpenAI publishes its CLIP weights as TorchScript archives (RN101.pt, RN50.pt); open_clip and
most training code save plain state dicts. Both come back here as a plain ``{key: tensor}``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.config.schema import Backbone
from pipeline.errors import WeightsError

# Non-tensor attributes OpenAI's TorchScript models carry in their state dict (open_clip drops them too).
_OPENAI_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``constants.pkl`` record; torch.save archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[-1] == "constants.pkl" for name in archive.namelist())


def _unwrap(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept ``{"state_dict": ...}`` wrappers and DataParallel's ``module.`` prefix."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        raise WeightsError(f"{path}: not a state dict of tensors (got {type(checkpoint).__name__})")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def load_checkpoint(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a TorchScript archive or a plain state dict on the CPU, after checking its sha256.

    ``sha256`` (hex, any case) is compared with the file's digest before anything is unpickled,
    so a truncated download or a wrong file fails here with both digests in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.strip().lower():
            raise WeightsError(
                f"{path}: sha256 mismatch (expected {sha256.strip().lower()}, got {actual})"
            )
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # deprecated, yet the only reader of OpenAI's archives
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            state = {k: v for k, v in state.items() if k not in _OPENAI_JIT_EXTRAS}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt archive, pickled code, ...: name the file either way
        raise WeightsError(f"{path}: cannot read as a TorchScript archive or state dict: {e}") from e
    return _unwrap(state, path)


# -- pretrained tags offline, and open_clip's misleading log lines ------------------------------------

HUB_HOSTS = ("huggingface.co", "openaipublic.azureedge.net")
REACH_TIMEOUT_S = 3.0


def _cached_pretrained(cfg: dict) -> bool:
    """True when open_clip will find the tag's weights without the network (HF cache or ~/.cache/clip)."""
    import os

    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            pass
        else:
            repo, filename = os.path.split(hub)
            for name in (filename or "open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
                if isinstance(try_to_load_from_cache(repo, name), str):
                    return True
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.expanduser(f"~/.cache/clip/{os.path.basename(url)}"))


def _reachable(hosts: tuple[str, ...], timeout: float) -> bool:
    import socket

    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return True
        except OSError:
            continue
    return False


def check_pretrained_available(name: str, tag: str, *, hosts: tuple[str, ...] = HUB_HOSTS,
                               timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail in seconds (not after a minute of hub retries) when a tag's weights are neither cached
    nor downloadable; the message names both ways out."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise WeightsError(f"backbone.pretrained: open_clip has no tag {tag!r} for {name} "
                           f"(known: {open_clip.list_pretrained_tags_by_model(name)})")
    if _cached_pretrained(cfg) or _reachable(hosts, timeout):
        return
    raise WeightsError(
        f"pretrained weights {name}:{tag} are not cached and {' / '.join(hosts)} cannot be reached: "
        f"set 'backbone.checkpoint' to the downloaded file (e.g. OpenAI's {name}.pt, with "
        f"'backbone.sha256'), or 'backbone.pretrained: null' for random weights (numbers then mean nothing)")


class _DropOpenClipNoise(logging.Filter):
    """open_clip logs 'No pretrained weights loaded ... initialized randomly' when we build the
    architecture to load our own checkpoint into it: true for open_clip, wrong for the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's misleading 'initialized randomly' line for the duration (root logger)."""
    noise = _DropOpenClipNoise()
    root = logging.getLogger()
    handlers = list(root.handlers)
    root.addFilter(noise)
    for h in handlers:
        h.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)
        for h in handlers:
            h.removeFilter(noise)


def declared_digest(backbone: Backbone) -> str | None:
    """The weights digest `load_backbone` would give for the backbone section, without loading it
    (BatchNorm recalibration's "+bn:" suffix left out); None if the checkpoint is missing."""
    return weights_digest_of(backbone.name, backbone.checkpoint, backbone.pretrained, backbone.sha256,
                             backbone.init_seed)


def weights_digest_of(name: str, checkpoint: str | os.PathLike | None, pretrained: str | None,
                      sha256: str | None, init_seed: int) -> str | None:
    """declared_digest of these backbone values."""
    if checkpoint:
        if sha256:
            return str(sha256).strip().lower()
        if not Path(checkpoint).is_file():
            return None
        return sha256_file(Path(checkpoint))
    if pretrained in (None, "random"):
        return f"random:{init_seed}"
    return f"{name}:{pretrained}"
