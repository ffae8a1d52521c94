"""Download, resume, verification and safe unpacking against a loopback HTTP server."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import socket
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.data.download import (
    REGISTRY,
    RETRIES,
    Archive,
    DownloadError,
    download_dataset,
    verify_file,
)


class ArchiveServer(ThreadingHTTPServer):
    """Serves ``files`` from memory with Range support; logs (name, Range header) per request.

    ``truncate[name] = (n, times)`` closes the connection after ``n`` body bytes on the first
    ``times`` requests for ``name``; ``ignore_range`` answers 200 with the whole file regardless."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.truncate: dict[str, tuple[int, int]] = {}
        self.ignore_range = False
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/files"


class _Handler(BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold a server thread past the test

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv: ArchiveServer = self.server  # type: ignore[assignment]
        name = self.path.rsplit("/", 1)[-1]
        range_header = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((name, range_header))
            nth = sum(n == name for n, _ in srv.requests)
        data = srv.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if range_header and not srv.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, times = srv.truncate.get(name, (len(body), 0))
        self.wfile.write(body[:cut] if nth <= times else body)
        self.close_connection = True


@pytest.fixture
def server():
    srv = ArchiveServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def noise(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def pinned(archive: Archive, data: bytes) -> Archive:
    """The registry entry with the size and md5 of the test's stand-in bytes."""
    return dataclasses.replace(archive, size=len(data), md5=hashlib.md5(data).hexdigest())


def single(filename: str, data: bytes, provides: tuple[str, ...], **checks) -> dict:
    checks = checks or {"size": len(data), "md5": hashlib.md5(data).hexdigest()}
    return {"toy": (Archive(f"http://example.invalid/{filename}", filename, provides, **checks),)}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coco_archives_download_verify_unpack_and_rerun_makes_no_request(server, tmp_path):
    image = noise(3000)
    files = {
        "train2014.zip": make_zip({"train2014/COCO_train2014_000000000009.jpg": image}),
        "val2014.zip": make_zip({"val2014/COCO_val2014_000000000042.jpg": image[::-1]}),
        "annotations_trainval2014.zip": make_zip({
            "annotations/instances_train2014.json": b'{"images": []}',
            "annotations/instances_val2014.json": b'{"images": [1]}'}),
    }
    server.files.update(files)
    registry = {"coco2014": tuple(pinned(a, files[a.filename]) for a in REGISTRY["coco2014"])}
    root = tmp_path / "coco2014"

    paths = download_dataset("coco2014", root, base_url=server.url, registry=registry, progress=False)

    assert paths == [root / "train2014", root / "val2014", root / "annotations/instances_train2014.json",
                     root / "annotations/instances_val2014.json"]
    assert (root / "train2014/COCO_train2014_000000000009.jpg").read_bytes() == image
    assert (root / "val2014/COCO_val2014_000000000042.jpg").read_bytes() == image[::-1]
    assert (root / "annotations/instances_val2014.json").read_bytes() == b'{"images": [1]}'
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["train2014", "val2014", "annotations"] + [f".done-{f}" for f in files])  # no .part/staging
    assert len(server.requests) == 3

    again = download_dataset("coco2014", root, base_url=server.url, registry=registry, progress=False)
    assert again == paths and len(server.requests) == 3


def test_voc2007_trainval_and_test_tars_merge_into_one_devkit(server, tmp_path):
    main = "VOCdevkit/VOC2007/ImageSets/Main"
    files = {
        "VOCtrainval_06-Nov-2007.tar": make_tar({f"{main}/trainval.txt": b"000005\n",
                                                 "VOCdevkit/VOC2007/JPEGImages/000005.jpg": b"a"}),
        "VOCtest_06-Nov-2007.tar": make_tar({f"{main}/test.txt": b"000001\n",
                                             "VOCdevkit/VOC2007/JPEGImages/000001.jpg": b"b"}),
    }
    server.files.update(files)
    registry = {"voc2007": tuple(pinned(a, files[a.filename]) for a in REGISTRY["voc2007"])}
    root = tmp_path / "voc2007"

    download_dataset("voc2007", root, base_url=server.url, registry=registry, progress=False)

    assert (root / main / "trainval.txt").read_bytes() == b"000005\n"
    assert (root / main / "test.txt").read_bytes() == b"000001\n"
    assert sorted(p.name for p in (root / "VOCdevkit/VOC2007/JPEGImages").iterdir()) == [
        "000001.jpg", "000005.jpg"]


def test_truncated_download_resumes_with_range_request(server, tmp_path):
    data = make_zip({"toy/blob.bin": noise(50_000)})
    server.files["toy.zip"] = data
    server.truncate["toy.zip"] = (1000, 1)  # first response dies after 1000 bytes

    download_dataset("toy", tmp_path, base_url=server.url, registry=single("toy.zip", data, ("toy",)),
                     progress=False)

    assert server.requests == [("toy.zip", None), ("toy.zip", "bytes=1000-")]
    assert (tmp_path / "toy/blob.bin").read_bytes() == noise(50_000)
    assert (tmp_path / ".done-toy.zip").exists()


def test_existing_part_file_is_resumed_not_refetched(server, tmp_path):
    data = make_tar({"toy/blob.bin": noise(20_000, seed=1)})
    server.files["toy.tar"] = data
    (tmp_path / "toy.tar.part").write_bytes(data[:700])

    download_dataset("toy", tmp_path, base_url=server.url, registry=single("toy.tar", data, ("toy",)),
                     progress=False)

    assert server.requests == [("toy.tar", "bytes=700-")]
    assert (tmp_path / "toy/blob.bin").read_bytes() == noise(20_000, seed=1)


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    data = make_zip({"toy/blob.bin": noise(8000)})
    server.files["toy.zip"] = data
    server.ignore_range = True
    (tmp_path / "toy.zip.part").write_bytes(b"x" * 700)  # not even a prefix: must be overwritten

    download_dataset("toy", tmp_path, base_url=server.url, registry=single("toy.zip", data, ("toy",)),
                     progress=False)

    assert server.requests == [("toy.zip", "bytes=700-")]
    assert (tmp_path / "toy/blob.bin").read_bytes() == noise(8000)


def test_connection_dropping_every_time_stops_after_bounded_retries_keeping_prefix(server, tmp_path):
    data = make_zip({"toy/blob.bin": noise(50_000)})
    server.files["toy.zip"] = data
    server.truncate["toy.zip"] = (500, 100)

    with pytest.raises(DownloadError, match="re-run to resume"):
        download_dataset("toy", tmp_path, base_url=server.url,
                         registry=single("toy.zip", data, ("toy",)), progress=False)

    assert len(server.requests) == RETRIES + 1
    assert (tmp_path / "toy.zip.part").read_bytes() == data[: 500 * (RETRIES + 1)]
    assert not (tmp_path / "toy").exists() and not (tmp_path / ".done-toy.zip").exists()


@pytest.mark.parametrize("kind", ["md5", "sha256", "size"])
def test_wrong_checksum_raises_naming_archive_and_unpacks_nothing(server, tmp_path, kind):
    data = make_zip({"toy/blob.bin": noise(4000)})
    server.files["toy.zip"] = data
    wrong = {"md5": "0" * 32, "sha256": "f" * 64, "size": len(data) + 1}[kind]
    actual = {"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest(),
              "size": str(len(data))}[kind]

    with pytest.raises(DownloadError) as err:
        download_dataset("toy", tmp_path, base_url=server.url, progress=False,
                         registry=single("toy.zip", data, ("toy",), **{kind: wrong}))

    message = str(err.value)
    assert "toy.zip" in message and str(wrong) in message and actual in message
    assert list(tmp_path.iterdir()) == []  # no .part, no archive, no marker, nothing unpacked


def test_unreachable_server_says_no_network_and_what_to_fetch(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/files"
    root = tmp_path / "voc2012"
    start = time.monotonic()

    with pytest.raises(DownloadError) as err:
        download_dataset("voc2012", root, base_url=url, timeout=2, progress=False)

    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "no network access to 127.0.0.1" in message
    assert f"{url}/VOCtrainval_11-May-2012.tar" in message and "by hand" in message
    assert str(root / "VOCtrainval_11-May-2012.tar") in message
    assert list(root.iterdir()) == []


def test_archive_placed_by_hand_is_verified_and_unpacked_offline(tmp_path):
    data = make_tar({"toy/a.txt": b"by hand"})
    (tmp_path / "toy.tar").write_bytes(data)

    paths = download_dataset("toy", tmp_path, base_url=f"http://127.0.0.1:{closed_port()}",
                             registry=single("toy.tar", data, ("toy/a.txt",)), progress=False)

    assert paths == [tmp_path / "toy/a.txt"] and paths[0].read_bytes() == b"by hand"


@pytest.mark.parametrize("members, links", [
    ({"../evil.txt": b"x"}, None),
    ({"toy/../../evil.txt": b"x"}, None),
    ({"/tmp/evil.txt": b"x"}, None),
    ({"toy/ok.txt": b"x"}, {"toy/link": "../../evil.txt"}),
])
def test_tar_member_escaping_root_is_refused(server, tmp_path, members, links):
    data = make_tar(members, links)
    server.files["toy.tar"] = data
    root = tmp_path / "root"

    with pytest.raises(DownloadError, match="toy.tar.*escapes"):
        download_dataset("toy", root, base_url=server.url,
                         registry=single("toy.tar", data, ("toy",)), progress=False)

    assert [p.name for p in tmp_path.iterdir()] == ["root"]
    assert not (root / ".done-toy.tar").exists() and not (root / "toy").exists()
    assert not list(root.glob(".unpack-*"))


def test_zip_member_escaping_root_is_refused(server, tmp_path):
    data = make_zip({"../evil.txt": b"x"})
    server.files["toy.zip"] = data
    with pytest.raises(DownloadError, match="toy.zip.*escapes"):
        download_dataset("toy", tmp_path / "root", base_url=server.url,
                         registry=single("toy.zip", data, ("toy",)), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["root"]


def test_verify_file_matches_hashlib_and_names_the_mismatch(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(noise(1234))
    verify_file(path, 1234, hashlib.md5(noise(1234)).hexdigest(), hashlib.sha256(noise(1234)).hexdigest())
    with pytest.raises(DownloadError, match=r"f\.bin: size expected 1235 bytes, actual 1234"):
        verify_file(path, size=1235)


def test_unknown_dataset_or_archive_names_the_known_ones(tmp_path):
    with pytest.raises(DownloadError, match="coco2014"):
        download_dataset("imagenet", tmp_path)
    with pytest.raises(DownloadError, match="val2017.zip"):
        download_dataset("coco2017", tmp_path, archives=["test2017.zip"])


def test_registry_entries_are_well_formed():
    for archives in REGISTRY.values():
        for a in archives:
            assert a.url.endswith("/" + a.filename), a
            assert a.md5 is None or (len(a.md5) == 32 and int(a.md5, 16) >= 0), a
            top = Path(a.provides[0]).parts[0]
            assert top in {"annotations", "train2014", "val2014", "train2017", "val2017", "VOCdevkit"}
    assert [a.filename for a in REGISTRY["coco2017"] if a.optional] == ["train2017.zip"]


def test_dataset_unpacked_by_hand_is_used_without_any_request(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "a.txt").write_bytes(b"unpacked by hand")  # no archive, no marker
    paths = download_dataset("toy", tmp_path, base_url=f"http://127.0.0.1:{closed_port()}",
                             registry=single("toy.tar", b"x", ("toy/a.txt",)), progress=False)
    assert paths == [tmp_path / "toy/a.txt"] and paths[0].read_bytes() == b"unpacked by hand"
