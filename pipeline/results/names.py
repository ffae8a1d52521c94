"""Output names of `segment` and `query` that never collide and read at a glance.

A name is the image's file stem (a query's adds the queried text: <stem>_query_<text>). Among the
images of one call, stems that repeat (two folders holding the same file name) take their
folder's name in front (a_photo, b_photo), then a number if that still repeats. Against an
earlier call into the same folder, a name whose JSON records another image (its sha256) takes
the next number (_2, _3, ...): a rerun on the same image overwrites its own files, never another
image's. Each JSON records "image_sha256" for that check.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

from pipeline.model.weights import sha256_file

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str, fallback: str = "image") -> str:
    """File-name-safe text: runs of other characters to one "_"."""
    return _UNSAFE.sub("_", text).strip("_") or fallback


def image_digest(path: str | Path) -> str:
    return sha256_file(path)


def _recorded_elsewhere(out_dir: Path, name: str, digest: str) -> bool:
    """Does out_dir/<name>.json record an image other than `digest`? (unreadable: yes; a record
    without a digest, from before names were checked: no, as it was overwritten then)"""
    record = out_dir / f"{name}.json"
    if not record.exists():
        return False
    try:
        recorded = json.loads(record.read_text()).get("image_sha256", digest)
    except (OSError, ValueError, AttributeError):
        return True
    return bool(recorded != digest)


def free_name(out_dir: Path, base: str, digest: str, taken: Collection[str] = ()) -> str:
    """`base`, else base_2, base_3, ...: the first not in `taken` whose JSON in out_dir
    (<name>.json) is absent or records this image (`digest`)."""
    number = 1
    while True:
        name = base if number == 1 else f"{base}_{number}"
        if name not in taken and not _recorded_elsewhere(out_dir, name, digest):
            return name
        number += 1


def image_stems(files: Sequence[Path]) -> list[str]:
    """A readable stem per image, its folder's name in front where stems repeat within the call."""
    stems = [slug(f.stem) for f in files]
    repeated = {s for s, n in Counter(stems).items() if n > 1}
    return [f"{slug(f.parent.name, 'root')}_{s}" if s in repeated else s for f, s in zip(files, stems)]


def output_names(files: Sequence[Path], out_dir: Path, digests: Sequence[str]) -> list[str]:
    """The output stem of every image of one `segment` call (see the module docstring)."""
    taken: set[str] = set()
    names = []
    for stem, digest in zip(image_stems(files), digests):
        names.append(free_name(out_dir, stem, digest, taken))
        taken.add(names[-1])
    return names
