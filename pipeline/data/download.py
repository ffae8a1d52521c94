"""Fetch the official dataset archives, verify them and unpack them into the layouts of docs/METHOD.md "Datasets and labels".

Datasets are resolved by name in one place (``REGISTRY``), like open_clip's pretrained registry:
each archive has its official URL, size and checksum (when known) and the paths it provides.
A download resumes from ``<file>.part`` with an HTTP Range request, is verified before anything is
unpacked, and a ``.done-<file>`` marker (written last) makes re-runs free. An archive whose paths
are already in place (a dataset unpacked by hand) is not fetched. Without network access the
error says which file to fetch by hand: a verified ``<root>/<file>`` is then used as is.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from pipeline.errors import DownloadError

CHUNK = 1 << 20
RETRIES = 3  # resumed attempts after a connection drops mid-stream


@dataclass(frozen=True)
class Archive:
    """One official archive. ``size``/``md5``/``sha256`` are verified when known (None = unknown);
    ``provides`` are the paths (relative to the dataset root) it creates when unpacked."""

    url: str
    filename: str
    provides: tuple[str, ...]
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    optional: bool = False  # fetched only when named in ``archives``


_COCO = "http://images.cocodataset.org"
_VOC = "http://host.robots.ox.ac.uk/pascal/VOC"

# Checksums: VOC md5s as in torchvision; COCO md5s/sizes as published in many download scripts and
# matching the servers' Content-Length. VOC2007 trainval size is not certain: left unknown.
REGISTRY: dict[str, tuple[Archive, ...]] = {
    "coco2014": (
        Archive(f"{_COCO}/zips/train2014.zip", "train2014.zip", ("train2014",),
                13510573713, "0da8c0bd3d6becc4dcb32757491aca88"),
        Archive(f"{_COCO}/zips/val2014.zip", "val2014.zip", ("val2014",),
                6645013297, "a3d79f5ed8d289b7a7554ce06a5782b3"),
        Archive(f"{_COCO}/annotations/annotations_trainval2014.zip", "annotations_trainval2014.zip",
                ("annotations/instances_train2014.json", "annotations/instances_val2014.json"),
                252872794, "0a379cfc70b0e71301e0f377548639bd"),
    ),
    "coco2017": (
        Archive(f"{_COCO}/zips/val2017.zip", "val2017.zip", ("val2017",),
                815585330, "442b8da7639aecaf257c1dceb8ba8c80"),
        Archive(f"{_COCO}/annotations/annotations_trainval2017.zip", "annotations_trainval2017.zip",
                ("annotations/instances_train2017.json", "annotations/instances_val2017.json"),
                252907541, "f4bbac642086de4f52a3fdda2de5fa2c"),
        Archive(f"{_COCO}/zips/train2017.zip", "train2017.zip", ("train2017",),
                19336861798, "cced6f7f71b7629ddf16f17bbcfab6b2", optional=True),
    ),
    "voc2007": (
        Archive(f"{_VOC}/voc2007/VOCtrainval_06-Nov-2007.tar", "VOCtrainval_06-Nov-2007.tar",
                ("VOCdevkit/VOC2007/ImageSets/Main/trainval.txt",),
                None, "c52e279531787c972589f7e41ab4ae64"),
        Archive(f"{_VOC}/voc2007/VOCtest_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar",
                ("VOCdevkit/VOC2007/ImageSets/Main/test.txt",),
                451020800, "b6e924de25625d8de591ea690078ad9f"),
    ),
    "voc2012": (
        Archive(f"{_VOC}/voc2012/VOCtrainval_11-May-2012.tar", "VOCtrainval_11-May-2012.tar",
                ("VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
                 "VOCdevkit/VOC2012/SegmentationClass"),
                1999639040, "6cd6e144f989b92b3379bac3b3de84fd"),
    ),
}


def verify_file(path: Path | str, size: int | None = None, md5: str | None = None,
                sha256: str | None = None) -> None:
    """Raise DownloadError naming the file, the expected and the actual value on the first mismatch."""
    path = Path(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"{path.name}: size expected {size} bytes, actual {actual}")
    if md5 is None and sha256 is None:
        return
    hashes = {k: hashlib.new(k) for k, v in (("md5", md5), ("sha256", sha256)) if v}
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for h in hashes.values():
                h.update(block)
    for kind, expected in (("md5", md5), ("sha256", sha256)):
        if expected and hashes[kind].hexdigest() != expected.lower():
            raise DownloadError(f"{path.name}: {kind} expected {expected}, "
                                f"actual {hashes[kind].hexdigest()}")


def download_dataset(name: str, root: Path | str, *, base_url: str | None = None,
                     archives: Iterable[str] | None = None, progress: bool = True,
                     timeout: float = 30, registry: Mapping[str, tuple[Archive, ...]] | None = None,
                     keep_archives: bool = False) -> list[Path]:
    """Make sure dataset ``name`` is unpacked under ``root``; return the paths its archives provide.

    ``archives`` selects archives by file name (default: all non-optional ones); ``base_url``
    replaces each URL's directory (a mirror, or the tests' loopback server). The verified archive
    is deleted after unpacking unless ``keep_archives``.
    """
    registry = REGISTRY if registry is None else registry
    if name not in registry:
        raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(sorted(registry))}")
    entries = {a.filename: a for a in registry[name]}
    if archives is None:
        chosen = [a for a in entries.values() if not a.optional]
    else:
        archives = [archives] if isinstance(archives, str) else list(archives)
        unknown = [f for f in archives if f not in entries]
        if unknown:
            raise DownloadError(f"{name}: unknown archive(s) {unknown}; known: {list(entries)}")
        chosen = [entries[f] for f in archives]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    provided: list[Path] = []
    for archive in chosen:
        url = archive.url if base_url is None else f"{base_url.rstrip('/')}/{archive.filename}"
        _fetch_and_unpack(archive, url, root, progress, timeout, keep_archives)
        provided += [root / p for p in archive.provides]
    return provided


def _fetch_and_unpack(archive: Archive, url: str, root: Path, progress: bool, timeout: float,
                      keep_archive: bool) -> None:
    marker = root / f".done-{archive.filename}"
    if marker.exists():
        return
    if not (root / archive.filename).exists() and all((root / p).exists() for p in archive.provides):
        return  # placed by hand (unpacked): used as is, never fetched again
    final = root / archive.filename
    if final.exists():  # fetched by hand (or kept): verify it, never delete the user's file
        try:
            verify_file(final, archive.size, archive.md5, archive.sha256)
        except DownloadError as e:
            raise DownloadError(f"archive {archive.filename} in {root} failed verification ({e}); "
                                f"delete it and re-run") from None
    else:
        part = root / f"{archive.filename}.part"
        _download(url, part, archive, root, progress, timeout)
        try:
            verify_file(part, archive.size, archive.md5, archive.sha256)
        except DownloadError as e:
            part.unlink(missing_ok=True)
            raise DownloadError(f"archive {archive.filename} from {url} failed verification ({e}); "
                                f"the download was deleted, re-run to fetch it again") from None
        part.replace(final)
    entries = _unpack(final, root, archive)
    missing = [p for p in archive.provides if not (root / p).exists()]
    if missing:
        raise DownloadError(f"archive {archive.filename} unpacked but {missing} missing under {root}")
    record = {"url": url, "size": final.stat().st_size, "md5": archive.md5,
              "sha256": archive.sha256, "entries": entries}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(marker)  # the marker appears only once everything is in place
    if not keep_archive:
        final.unlink()


def _download(url: str, part: Path, archive: Archive, root: Path, progress: bool,
              timeout: float) -> None:
    """Stream ``url`` into ``part``, resuming from its size; retry when a connection drops mid-way."""
    host = urllib.parse.urlsplit(url).hostname
    by_hand = (f"no network access to {host}: download {url} by hand into {root} "
               f"(as {root / archive.filename}) and re-run")
    if archive.size is not None and part.exists() and part.stat().st_size > archive.size:
        part.unlink()  # longer than the archive: cannot be a prefix of it
    for attempt in range(RETRIES + 1):
        offset = part.stat().st_size if part.exists() else 0
        if archive.size is not None and offset == archive.size:
            return  # complete already; verification decides
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:  # nothing beyond our bytes: the .part is complete
                return
            raise DownloadError(f"{url}: server answered HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise DownloadError(f"{by_hand} ({e})") from None
        with response:
            if offset and response.status == 206:
                start = _content_range_start(response.headers.get("Content-Range", ""))
                if start != offset:
                    raise DownloadError(f"{url}: asked for bytes from {offset}, server sent from "
                                        f"{start}; delete {part} and re-run")
                mode = "ab"
            else:  # 200: server ignored the Range header, start again from zero
                offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else archive.size
            received = offset
            try:
                with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B",
                                                 unit_scale=True, desc=archive.filename,
                                                 disable=not progress) as bar:
                    while block := response.read(CHUNK):
                        f.write(block)
                        received += len(block)
                        bar.update(len(block))
            except (http.client.HTTPException, OSError) as e:
                if attempt == RETRIES:
                    raise DownloadError(f"{url}: connection lost at {received} bytes ({e}); "
                                        f"re-run to resume from {part}") from None
                continue
        if total is None or received >= total:
            return
        if attempt == RETRIES:
            raise DownloadError(f"{url}: connection closed at {received} of {total} bytes; "
                                f"re-run to resume from {part}")


def _content_range_start(value: str) -> int | None:
    """'bytes 100-199/200' -> 100."""
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _unpack(path: Path, root: Path, archive: Archive) -> list[str]:
    """Extract into a temp dir inside ``root`` (same file system), then move the entries into place.

    Refuses members whose path would land outside ``root`` before extracting anything."""
    staging = root / f".unpack-{archive.filename}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    _check_member(info.filename, archive)
                    if stat.S_ISLNK(info.external_attr >> 16):  # zipfile would write the link as a file
                        raise DownloadError(f"archive {archive.filename}: refused member "
                                            f"{info.filename!r}, a symbolic link (not in official archives): "
                                            f"delete {path} and download it again")
                zf.extractall(staging)
        else:
            with tarfile.open(path) as tf:
                for member in tf.getmembers():
                    _check_member(member.name, archive)
                    if member.issym() or member.islnk():
                        base = "" if member.islnk() else str(PurePosixPath(member.name).parent)
                        _check_member(os.path.join(base, member.linkname), archive)
                # the data filter also refuses device files and unsafe modes (members checked above
                # for Pythons that predate it)
                safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(staging, **safe)
        entries = sorted(p.name for p in staging.iterdir())
        for name in entries:
            _merge_move(staging / name, root / name)
        return entries
    except (zipfile.BadZipFile, tarfile.TarError) as e:
        raise DownloadError(f"archive {archive.filename} cannot be unpacked ({e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_member(name: str, archive: Archive) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            break
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or depth < 0:
        raise DownloadError(f"archive {archive.filename}: refused member {name!r}, "
                            f"its path escapes the dataset root")


def _merge_move(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, merging directories (VOC2007 trainval and test share VOCdevkit/VOC2007)."""
    if src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _merge_move(child, dst / child.name)
        src.rmdir()
    else:
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)
