"""Direct reads of single (image, view) token chunks from the store's shard files.

A tokens shard file follows the Zarr v3 sharding codec (index at the end): the inner chunks
(1, 1, T, D), each `bytes [-> zstd] -> crc32c`, then one (offset, nbytes) little-endian uint64
pair per inner chunk in C order of (image, view) and the crc32c of those pairs. Zarr decodes a
whole shard per call (1.6k-2.6k views/s at RN-101 shape); training samples one view of random
images, so each sampled chunk is copied straight into the batch buffer from a read-only mapping
of its shard file (uncompressed stores; ``os.pread`` for zstd ones) and its crc32c checked with
the `crc32c` package (hardware instructions, GIL released; the same
function as zarr's codec: tests/test_shards.py proves the bytes equal zarr's reads). Shard indexes
are cached: 16 bytes per view. The same crc32c, XOR'd with crc32c(store id, i, v), must equal the
chunk's key (pipeline/store/identity.py): a chunk moved, swapped, copied from another store, or
read under an edited fingerprint is refused at no extra cost.

Why a mapping: a copy from mapped page cache is what a NumPy memmap gather does; one ``os.preadv``
per chunk paid a system call and page-cache lookups per 4 KiB page: 0.45-0.55x the memmap gather
here against 0.6-0.7x mapped (bench/bench_reader.py). The mapped pages are page cache (file RSS).
A mapping covers the file as indexed, and every batch first compares the file's fstat (size
included), so a file rewritten or cut short is re-indexed before its mapping is read. zarr renames
shard files into place, never truncating one; only a hand truncating it in place during the
microseconds of a copy could fault the mapping (SIGBUS). At most `_OPEN_FILES` mappings.

Verification (`verify`): "first" (training's default) checks each chunk the first time this
reader reads it, and again after its shard file changes (every read compares the open file's
inode, size, mtime and ctime with those it was indexed with; `refresh`, once per epoch, the path's,
which sees a file replaced while open); "every" checks every read (verify_shard, `pipeline
verify`); "none" only measures the check's cost (bench/). The check costs about as much as the
read itself (13 of 37 us per RN-101 view here), and an epoch re-reads chunks a previous one proved.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from crc32c import crc32c

from pipeline.errors import CacheError
from pipeline.store.format import REPAIR
from pipeline.store.identity import identity_problem

if TYPE_CHECKING:
    from pipeline.store.cache import FeatureCache

MISSING = np.uint64(2**64 - 1)
_OPEN_FILES = 64  # shard file descriptors kept open per reader
VERIFY = ("first", "every", "none")


def _crc(data: object) -> bytes:
    return np.uint32(crc32c(data)).tobytes()  # little-endian, as the codec stores it


class ShardReader:
    """Reads token chunks of a FeatureCache's shard files, checking their crc32c (`verify`).

    Every read first compares its shard file (fstat of the open descriptor) with the file it indexed
    and checked chunks of: a file written since, or replaced and reopened, is indexed and checked
    again, and the store's settings are re-read (a store re-extracted with others is refused)."""

    def __init__(self, cache: FeatureCache, verify: str = "first", threads: int = 1) -> None:
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.cache = cache
        self.verify = verify
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self.path = cache.path
        c = cache
        self.chunks = c.shard_size * c.views  # inner chunks per shard
        self.index_nbytes = 16 * self.chunks + 4
        self.chunk_raw = c.num_tokens * c.dim * c.dtype.itemsize
        self.compressed = c.layout.get("compressor") is not None
        self._shard_size, self._views = c.shard_size, c.views
        self._index: dict[int, np.ndarray] = {}  # shard -> (shard_size * K, 2) uint64
        self._proved: dict[int, np.ndarray] = {}  # shard -> (shard_size * K,) bool, crc checked
        self._expected: dict[int, list[int]] = {}  # shard -> (n * K) crc32c each chunk must have
        self._identity: dict[int, tuple[int, ...]] = {}  # shard -> its file's stat when indexed
        self._files: OrderedDict[int, int] = OrderedDict()
        self._maps: dict[int, np.ndarray] = {}  # shard -> its file mapped read-only (uint8), uncompressed
        self._paths: dict[int, str] = {}  # shard -> its file path
        self._lock = threading.Lock()
        if self.compressed:
            from numcodecs import Zstd
            self._zstd = Zstd()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()
            self._maps.clear()  # unmapped once no read holds them

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def shard_file(self, s: int) -> Path:
        return self.cache.shard_file(s)

    def _file(self, s: int) -> str:
        """Shard s's file path as a string, built once (refresh stats every indexed shard's path
        each epoch; a Path built per call cost as much as the stat)."""
        path = self._paths.get(s)
        if path is None:
            path = self._paths[s] = str(self.shard_file(s))
        return path

    def _where(self, s: int) -> str:
        return f"{self.path}: array tokens, shard {s} ({self.shard_file(s)})"

    def _fd(self, s: int) -> int:
        with self._lock:
            fd = self._files.get(s)
            if fd is not None:
                self._files.move_to_end(s)
                return fd
            try:
                fd = os.open(self._file(s), os.O_RDONLY)
            except FileNotFoundError:
                raise CacheError(f"{self._where(s)} is missing although the shard is marked "
                                 f"complete; {REPAIR}"
                                 ) from None
            self._files[s] = fd
            if len(self._files) > _OPEN_FILES:
                old, old_fd = self._files.popitem(last=False)
                os.close(old_fd)
                self._maps.pop(old, None)  # mapped again when its file is opened again
            return fd

    def index(self, s: int) -> np.ndarray:
        """(shard_size * K, 2) uint64 (offset, nbytes) of shard s, its crc32c and bounds checked."""
        idx = self._index.get(s)
        if idx is not None:
            return idx
        fd = self._fd(s)
        st = os.fstat(fd)
        size = st.st_size
        if size < self.index_nbytes:
            raise CacheError(f"{self._where(s)} is truncated ({size} bytes, its index alone is "
                             f"{self.index_nbytes}); {REPAIR}")
        raw = os.pread(fd, self.index_nbytes, size - self.index_nbytes)
        if _crc(raw[:-4]) != raw[-4:]:
            raise CacheError(f"{self._where(s)}: the shard index fails its crc32c (damaged); {REPAIR}")
        idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.chunks, 2)
        start, stop = self.cache.shard_range(s)
        live = idx[: (stop - start) * self.cache.views]
        data_end = size - self.index_nbytes
        if (live[:, 0] == MISSING).any():
            j = int(np.flatnonzero(live[:, 0] == MISSING)[0])
            raise CacheError(f"{self._where(s)}: image {start + j // self.cache.views} view "
                             f"{j % self.cache.views} has no chunk; {REPAIR}")
        if (live[:, 0] + live[:, 1] > data_end).any() or (
                not self.compressed and (live[:, 1] != self.chunk_raw + 4).any()):
            raise CacheError(f"{self._where(s)}: the shard index points outside the file or to "
                             f"chunks of the wrong size; {REPAIR}")
        self._expected[s] = self.cache.expected_crcs(s).reshape(-1).tolist()  # keys chunk checked
        self._identity[s] = _identity(st)
        self._proved[s] = np.zeros(self.chunks, dtype=bool)
        self._index[s] = idx
        self._map(s, fd)
        return idx

    def _map(self, s: int, fd: int) -> None:
        """Map shard s's file (uncompressed stores), as long as it was when indexed."""
        if not self.compressed and s not in self._maps:
            size = self._identity[s][1]
            self._maps[s] = np.frombuffer(mmap.mmap(fd, size, prot=mmap.PROT_READ), np.uint8)

    def refresh(self) -> None:
        """Forget the index, open file and proved chunks of every shard file that changed (or
        vanished) since it was indexed: its chunks are checked again on their next read."""
        changed = False
        for s in list(self._index):
            try:
                same = _identity(os.stat(self._file(s))) == self._identity[s]
            except FileNotFoundError:
                same = False
            if not same:
                self._forget(s)
                changed = True
        if changed:
            self._check_settings()

    def _check_settings(self) -> None:
        """A shard file changed under this reader: refuse a store re-extracted with other settings
        (its chunks would pass their crc32c, and training would mix two stores)."""
        try:
            now = type(self.cache).open(self.path)
        except CacheError as err:
            raise CacheError(f"{self.path} changed while this process read it ({err}); "
                             "run again once extract-features has finished") from err
        c = self.cache
        if ((now.fingerprint, now.layout, now.classnames, now.digests, now.store_id)
                != (c.fingerprint, c.layout, c.classnames, c.digests, c.store_id)):  # ids, labels
            raise CacheError(f"{self.path} was re-extracted with other settings while this process "
                             "read it; run again on the new store")

    def _open(self, s: int) -> tuple[np.ndarray, int]:
        """Shard s's index and an open descriptor of the file that index (and the chunks proved
        so far) belong to: one fstat per call."""
        fd = self._fd(s)
        if s in self._index and _identity(os.fstat(fd)) != self._identity[s]:
            self._forget(s)  # written in place, or replaced and reopened: check it all again
            self._check_settings()
            fd = self._fd(s)
        idx = self.index(s)
        self._map(s, fd)  # (again, after its file was closed to open others)
        return idx, fd

    def _forget(self, s: int) -> None:
        self._index.pop(s, None)
        self._proved.pop(s, None)
        self._expected.pop(s, None)
        self._identity.pop(s, None)
        with self._lock:
            fd = self._files.pop(s, None)
            if fd is not None:
                os.close(fd)
            self._maps.pop(s, None)

    def read_into(self, i: int, v: int, out: np.ndarray, verify: bool | None = None) -> None:
        """Tokens of image i, view v into `out` ((T, D) C-contiguous, the store dtype); `verify`
        True/False overrides the reader's policy for this read."""
        self._read(i, v, *self._open(i // self._shard_size), out, verify)

    def _read(self, i: int, v: int, idx: np.ndarray, fd: int, out: np.ndarray,
              verify: bool | None = None) -> None:
        s, r = divmod(i, self._shard_size)
        k = r * self._views + v
        offset, nbytes = idx[k].tolist()
        proved = self._proved[s]
        if verify is None:
            verify = self.verify == "every" or (self.verify == "first" and not proved[k])
        placed = True  # the chunk's values match its key: this store's chunk for (i, v)
        if self.compressed:
            payload = os.pread(fd, nbytes, offset)
            ok = len(payload) == nbytes and (not verify or _crc(
                np.frombuffer(payload, np.uint8)[:-4]) == payload[-4:])
            try:
                if ok:
                    self._zstd.decode(memoryview(payload)[:-4], out=out)
                    placed = not verify or crc32c(out) == self._expected[s][k]
            except (RuntimeError, ValueError):  # unchecked bytes that do not decompress
                ok = False
        else:
            mapped = self._maps.get(s)
            if mapped is not None:  # within the file: the index was bounds-checked against its size
                if not out.flags.c_contiguous:  # reshape would copy: the tokens would land elsewhere
                    raise ValueError("ShardReader reads into C-contiguous (T, D) arrays only")
                chunk = mapped[offset:offset + nbytes]  # (T * D * itemsize + 4,) uint8
                np.copyto(out.reshape(-1).view(np.uint8), chunk[:-4])
                crc: bytes | bytearray = chunk[-4:].tobytes()
                got = nbytes
            else:  # closed to open other files meanwhile (another thread's reads)
                dest = memoryview(out).cast("B")  # type: ignore[arg-type]  # numpy: arrays are Buffers (typed so from Python 3.12)
                crc = bytearray(4)
                got = os.preadv(fd, [dest, crc], offset)
            value = crc32c(out) if verify and got == nbytes else None
            ok = got == nbytes and (not verify or value == int.from_bytes(crc, "little"))
            placed = not verify or value == self._expected[s][k]
        if ok and placed and verify:
            proved[k] = True
        elif not ok:
            if not verify:  # unchecked bytes that did not read back: check them, to say why
                return self._read(i, v, idx, fd, out, verify=True)
            raise CacheError(f"{self._where(s)}: image {i} view {v} fails its crc32c (damaged "
                             f"chunk); {REPAIR}")
        elif not placed:
            raise CacheError(identity_problem(self.cache, s, i, v))

    def gather(self, index: np.ndarray, view: np.ndarray, out: np.ndarray | None = None
               ) -> np.ndarray:
        """(B, T, D) tokens of images `index`, views `view`, in the store dtype. With `threads` > 1
        the reads are split between threads (pread and crc32c release the GIL); the shard files
        are opened and indexed first, in this thread, in groups of at most half the open-file
        cache, so no open closes a file a read still needs."""
        c = self.cache
        if out is None:
            out = np.empty((len(index), c.num_tokens, c.dim), dtype=c.dtype)
        by_shard: dict[int, list[tuple[int, int, int]]] = {}  # shard -> (row, image, view)
        for b, i, v in zip(range(len(index)), index.tolist(), view.tolist()):
            by_shard.setdefault(i // self._shard_size, []).append((b, i, v))
        shards, group = list(by_shard), _OPEN_FILES // 2
        for g in range(0, len(shards), group):  # opening a group's files closes none of them
            files = {s: self._open(s) for s in shards[g:g + group]}  # one fstat per shard
            self._read_rows([r for s in files for r in by_shard[s]], files, out)
        return out

    def _read_rows(self, rows: list[tuple[int, int, int]], files: dict[int, tuple[np.ndarray, int]],
                   out: np.ndarray) -> None:
        def part(rows: list[tuple[int, int, int]]) -> None:
            for b, i, v in rows:
                self._read(i, v, *files[i // self._shard_size], out[b])

        if self.threads == 1 or len(rows) < 2 * self.threads:
            part(rows)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ShardReader")
        step = -(-len(rows) // self.threads)
        futures = [self._pool.submit(part, rows[a:a + step]) for a in range(0, len(rows), step)]
        wait(futures)  # every thread done with `out` before an error is raised
        for f in futures:
            f.result()

    def check_shard(self, s: int) -> str | None:
        """Cheap check of a complete shard (file, index, chunk sizes, the keys chunk, and the first
        chunk's crc32c and key, which a swapped or foreign file or an edited fingerprint fails):
        None, or what is wrong."""
        self._forget(s)
        try:
            self.index(s)
            c = self.cache
            self.read_into(s * c.shard_size, 0, np.empty((c.num_tokens, c.dim), c.dtype), verify=True)
        except CacheError as err:
            return str(err)
        return None

    def verify_shard(self, s: int) -> str | None:
        """Read and check every chunk of shard s (crc32c, finite tokens): None, or what is wrong."""
        c = self.cache
        start, stop = c.shard_range(s)
        out = np.empty((c.num_tokens, c.dim), dtype=c.dtype)
        try:
            self._forget(s)
            for i in range(start, stop):
                for v in range(c.views):
                    self.read_into(i, v, out, verify=True)
                    if not np.isfinite(out).all():
                        return f"{self._where(s)}: image {i} view {v} holds non-finite tokens"
        except CacheError as err:
            return str(err)
        return None


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or written in place."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
