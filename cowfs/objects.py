"""Content-addressed object store: file contents keyed by the xxh128 of their bytes.

Each object is stored once, in one of two formats, both made of independent *frames* of FRAME_SIZE
uncompressed bytes so that a read at any offset touches at most a frame or two:

* **zstd seekable** (the format of zstd's contrib/seekable_format): every frame is an ordinary zstd
  frame, followed by a skippable frame holding the seek table (compressed size, decompressed size
  and XXH64-low-32 checksum per frame). Plain `zstd -d` decompresses such a file.
* **raw**, when compression does not pay (already-compressed data): the bytes as they are, followed
  by a trailer with an XXH64 per frame, so a pread is a pread plus a checksum.

Every read is verified against the frame checksum: a damaged object raises Corruption, never
returns wrong bytes. Writes go to tmp/ and are renamed into place; they are idempotent (an object
that exists is not written again). Durability is batched: callers call sync() once before they
publish anything that references new objects (one syncfs instead of an fsync per object).

Storage contract: put_*() returning DIGEST means the content is stored at DIGEST (durable after
the next sync()).
"""

from __future__ import annotations

import bisect
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import xxhash
import zstandard

from cowfs.errors import Corruption, NotFound

FRAME_SIZE = 128 * 1024
ZSTD_LEVEL = 3
# Store raw when zstd saves less than this fraction: decompressing costs more than it saves.
MIN_SAVING = 0.1

_SKIPPABLE_MAGIC = 0x184D2A5E
_SEEKABLE_MAGIC = 0x8F92EAB1
_RAW_MAGIC = b"COWRAW01"
_SEEK_FOOTER = struct.Struct("<IBI")  # number of frames, descriptor, seekable magic
_SEEK_ENTRY = struct.Struct("<III")  # compressed size, decompressed size, checksum
_RAW_FOOTER = struct.Struct("<QI8s")  # data size, frame size, magic
_CHECKSUM_FLAG = 0x80


def digest_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _frame_checksum(data: bytes) -> int:
    return xxhash.xxh64_intdigest(data) & 0xFFFFFFFF


class FrameCache:
    """A small LRU of decompressed frames, shared by all readers of a store (thread-safe)."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._frames.get(key)
            if data is not None:
                self._frames.move_to_end(key)
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        with self._lock:
            if key in self._frames:
                return
            self._frames[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._frames:
                _, old = self._frames.popitem(last=False)
                self._bytes -= len(old)


class ObjectReader:
    """Random access to one stored object. pread() is safe to call from several threads."""

    __slots__ = ("digest", "size", "_fd", "_raw", "_starts", "_offsets", "_csizes", "_checks",
                 "_cache")  # fmt: skip

    def __init__(self, digest: str, fd: int, cache: FrameCache) -> None:
        self.digest = digest
        self._fd = fd
        self._cache = cache
        try:
            self._read_index()
        except BaseException:
            os.close(fd)
            raise

    def _read_index(self) -> None:
        fd = self._fd
        file_size = os.fstat(fd).st_size
        if file_size < _SEEK_FOOTER.size:
            raise Corruption(f"object {self.digest}: too short")
        tail = os.pread(fd, max(_SEEK_FOOTER.size, _RAW_FOOTER.size), max(0, file_size - 20))
        if tail.endswith(_RAW_MAGIC):
            self._read_raw_index(file_size, tail)
            return
        nframes, desc, magic = _SEEK_FOOTER.unpack(tail[-_SEEK_FOOTER.size :])
        if magic != _SEEKABLE_MAGIC or not desc & _CHECKSUM_FLAG:
            raise Corruption(f"object {self.digest}: no seek table")
        table_len = nframes * _SEEK_ENTRY.size
        table_off = file_size - _SEEK_FOOTER.size - table_len
        if table_off < 8:
            raise Corruption(f"object {self.digest}: seek table out of range")
        table = os.pread(fd, table_len, table_off)
        skip_magic, skip_len = struct.unpack("<II", os.pread(fd, 8, table_off - 8))
        if skip_magic != _SKIPPABLE_MAGIC or skip_len != table_len + _SEEK_FOOTER.size:
            raise Corruption(f"object {self.digest}: seek table header damaged")
        starts, offsets, csizes, checks = [], [], [], []
        pos = out = 0
        for csize, dsize, check in _SEEK_ENTRY.iter_unpack(table):
            starts.append(out)
            offsets.append(pos)
            csizes.append(csize)
            checks.append(check)
            pos += csize
            out += dsize
        if pos != table_off - 8:
            raise Corruption(f"object {self.digest}: frames do not add up to the file size")
        self._raw = False
        self._starts, self._offsets, self._csizes, self._checks = starts, offsets, csizes, checks
        self.size = out

    def _read_raw_index(self, file_size: int, tail: bytes) -> None:
        size, frame, _ = _RAW_FOOTER.unpack(tail[-_RAW_FOOTER.size :])
        if frame <= 0:
            raise Corruption(f"object {self.digest}: bad raw trailer")
        nframes = (size + frame - 1) // frame
        table_len = nframes * 4
        if size + table_len + _RAW_FOOTER.size != file_size:
            raise Corruption(f"object {self.digest}: raw trailer does not match the file size")
        table = os.pread(self._fd, table_len, size)
        self._raw = True
        self._checks = [c for (c,) in struct.iter_unpack("<I", table)]
        self._starts = list(range(0, size, frame))
        self._offsets = self._starts
        self._csizes = [min(frame, size - s) for s in self._starts]
        self.size = size

    def _frame(self, i: int) -> bytes:
        key = (self.digest, i)
        data = self._cache.get(key)
        if data is not None:
            return data
        blob = os.pread(self._fd, self._csizes[i], self._offsets[i])
        if len(blob) != self._csizes[i]:
            raise Corruption(f"object {self.digest}: frame {i} truncated")
        if self._raw:
            data = blob
        else:
            try:
                data = zstandard.ZstdDecompressor().decompress(blob)
            except zstandard.ZstdError as exc:
                raise Corruption(
                    f"object {self.digest}: frame {i} does not decompress ({exc})"
                ) from None
        if _frame_checksum(data) != self._checks[i]:
            raise Corruption(f"object {self.digest}: frame {i} checksum mismatch")
        # The checksum covers the frame's bytes, not where the seek table says they sit: a
        # damaged decompressed size would shift every later offset and serve wrong bytes.
        end = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
        if len(data) != end - self._starts[i]:
            raise Corruption(f"object {self.digest}: frame {i} size does not match the seek table")
        self._cache.put(key, data)
        return data

    def pread(self, size: int, offset: int) -> bytes:
        """Up to `size` bytes at `offset` (fewer only at the end of the object)."""
        if offset >= self.size or size <= 0:
            return b""
        end = min(self.size, offset + size)
        i = bisect.bisect_right(self._starts, offset) - 1
        parts = []
        while offset < end:
            frame = self._frame(i)
            lo = offset - self._starts[i]
            chunk = frame[lo : lo + (end - offset)]
            parts.append(chunk)
            offset += len(chunk)
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_all(self) -> bytes:
        return self.pread(self.size, 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_tls = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """One compressor per thread: making a context per object costs more than small objects'
    compression itself, and a context must not be shared between threads."""
    cctx = getattr(_tls, "cctx", None)
    if cctx is None:
        cctx = _tls.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return cctx


def _split(data: bytes) -> list[bytes]:
    return [data[i : i + FRAME_SIZE] for i in range(0, len(data), FRAME_SIZE)]


def encode(data: bytes, compressed: list[bytes] | None = None) -> bytes:
    """The stored form of `data`: seekable zstd, or raw with checksums when zstd does not pay.
    `compressed` may hold the frames already compressed (by encode_many)."""
    frames = _split(data)
    if compressed is None:
        compress = _compressor().compress
        compressed = [compress(f) for f in frames]
    checks = [_frame_checksum(f) for f in frames]
    packed = sum(len(c) for c in compressed)
    if packed > len(data) * (1 - MIN_SAVING):
        table = struct.pack(f"<{len(checks)}I", *checks)
        return b"".join((data, table, _RAW_FOOTER.pack(len(data), FRAME_SIZE, _RAW_MAGIC)))
    table = b"".join(
        _SEEK_ENTRY.pack(len(c), len(f), k)
        for c, f, k in zip(compressed, frames, checks, strict=True)
    )
    footer = _SEEK_FOOTER.pack(len(frames), _CHECKSUM_FLAG, _SEEKABLE_MAGIC)
    header = struct.pack("<II", _SKIPPABLE_MAGIC, len(table) + len(footer))
    return b"".join((*compressed, header, table, footer))


def encode_many(datas: list[bytes]) -> list[bytes]:
    """encode() of many inputs at once: every frame of every input is compressed in one call
    that runs on several cores without the GIL, instead of a GIL round trip per frame."""
    frames: list[bytes] = []
    for data in datas:
        frames.extend(_split(data))
    if len(frames) < 2:
        return [encode(d) for d in datas]
    done = _compressor().multi_compress_to_buffer(frames, threads=_THREADS)
    compressed = [done[i].tobytes() for i in range(len(frames))]
    out, at = [], 0
    for data in datas:
        n = (len(data) + FRAME_SIZE - 1) // FRAME_SIZE
        out.append(encode(data, compressed[at : at + n]))
        at += n
    return out


_THREADS = max(1, os.cpu_count() or 1)
_HEX32 = re.compile(r"[0-9a-f]{32}")


class ObjectStore:
    """Objects under `root`/objects, staged in `tmp`, read through a shared frame cache."""

    def __init__(self, root: str | os.PathLike, tmp: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.tmp = Path(tmp) if tmp is not None else self.root.parent / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.cache = FrameCache()
        # Plain strings on the write path: pathlib costs more than the syscalls for small objects.
        self._root_s = f"{self.root}/"
        self._tmp_s = f"{self.tmp}/"

    def path(self, digest: str) -> Path:
        if not _HEX32.fullmatch(digest):
            raise NotFound(f"not an object digest: {digest!r}")
        return self.root / digest[:2] / digest[2:]

    def _path_s(self, digest: str) -> str:
        return f"{self._root_s}{digest[:2]}/{digest[2:]}"

    def has(self, digest: str) -> bool:
        if not _HEX32.fullmatch(digest):
            raise NotFound(f"not an object digest: {digest!r}")
        return os.path.exists(self._path_s(digest))

    def put_bytes(self, data: bytes, digest: str | None = None) -> str:
        """Store `data`; returns its digest. Idempotent; safe from several threads."""
        digest = digest or digest_bytes(data)
        path = self._path_s(digest)
        if os.path.exists(path):
            return digest
        self._write_object(digest, path, encode(data))
        return digest

    def put_many(self, items: list[tuple[bytes, str]]) -> None:
        """put_bytes() of many (data, digest) pairs, compressed together (see encode_many)."""
        todo = [(d, g, p) for d, g in items if not os.path.exists(p := self._path_s(g))]
        blobs = encode_many([d for d, _, _ in todo])
        for (_, digest, path), blob in zip(todo, blobs, strict=True):
            self._write_object(digest, path, blob)

    def _write_object(self, digest: str, path: str, blob: bytes) -> None:
        tmp = f"{self._tmp_s}obj.{os.getpid()}.{threading.get_ident()}.{digest}"
        # Created read-only: objects are immutable, a stray later open for writing fails loudly.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
            os.close(fd)
            fd = -1
            self._rename_into_place(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _rename_into_place(self, tmp: str, path: str) -> None:
        try:
            os.rename(tmp, path)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            os.makedirs(os.path.dirname(path), exist_ok=True)  # first object of its fan-out dir
            os.rename(tmp, path)

    def put_stream(self, f: BinaryIO, size: int | None = None) -> str:
        """Store the rest of a binary stream (read frame by frame: never all in memory)."""
        first = f.read(FRAME_SIZE)
        if len(first) < FRAME_SIZE:  # the common case: a small file
            return self.put_bytes(first)
        hasher = xxhash.xxh3_128()
        cctx = _compressor()
        tmp = self._tmpfile()
        entries: list[bytes] = []
        raw_len = packed_len = 0
        try:
            with open(tmp, "wb") as out:
                frame = first
                while frame:
                    hasher.update(frame)
                    c = cctx.compress(frame)
                    out.write(c)
                    entries.append(_SEEK_ENTRY.pack(len(c), len(frame), _frame_checksum(frame)))
                    raw_len += len(frame)
                    packed_len += len(c)
                    frame = f.read(FRAME_SIZE)
                table = b"".join(entries)
                footer = _SEEK_FOOTER.pack(len(entries), _CHECKSUM_FLAG, _SEEKABLE_MAGIC)
                out.write(struct.pack("<II", _SKIPPABLE_MAGIC, len(table) + len(footer)))
                out.write(table + footer)
            digest = hasher.hexdigest()
            path = self.path(digest)
            if path.exists():
                return digest
            if packed_len > raw_len * (1 - MIN_SAVING):
                self._rewrite_raw(tmp, digest)
            self._publish(tmp, path)
            tmp = None
            return digest
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def put_file(self, path: str | os.PathLike) -> str:
        with open(path, "rb") as f:
            return self.put_stream(f)

    def _rewrite_raw(self, tmp: Path, digest: str) -> None:
        """Turn a staged seekable object whose compression did not pay into the raw format."""
        reader = ObjectReader(digest, os.open(tmp, os.O_RDONLY), FrameCache(0))
        raw = self._tmpfile()
        try:
            with reader, open(raw, "wb") as out:
                checks = []
                for i in range(len(reader._starts)):
                    frame = reader._frame(i)
                    checks.append(_frame_checksum(frame))
                    out.write(frame)
                out.write(struct.pack(f"<{len(checks)}I", *checks))
                out.write(_RAW_FOOTER.pack(reader.size, FRAME_SIZE, _RAW_MAGIC))
            os.replace(raw, tmp)
        except BaseException:
            try:
                os.unlink(raw)
            except FileNotFoundError:
                pass
            raise

    def _tmpfile(self) -> Path:
        return self.tmp / f"obj.{os.getpid()}.{threading.get_ident()}.{os.urandom(6).hex()}"

    def _publish(self, tmp: Path, path: Path) -> None:
        os.chmod(tmp, 0o444)  # objects are immutable; a stray write should fail loudly
        self._rename_into_place(str(tmp), str(path))

    def sync(self) -> None:
        """Make every object written so far durable (one syncfs for the whole batch)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.syncfs(fd) if hasattr(os, "syncfs") else os.sync()
        finally:
            os.close(fd)

    def open(self, digest: str) -> ObjectReader:
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"object {digest} is missing") from None
        return ObjectReader(digest, fd, self.cache)

    def read(self, digest: str) -> bytes:
        with self.open(digest) as r:
            return r.read_all()

    def verify(self, digest: str) -> None:
        """Check every frame and the content hash; raises Corruption or NotFound."""
        hasher = xxhash.xxh3_128()
        with self.open(digest) as r:
            uncached = ObjectReader(digest, os.dup(r._fd), FrameCache(0))
            with uncached:
                for i in range(len(uncached._starts)):
                    hasher.update(uncached._frame(i))
        if hasher.hexdigest() != digest:
            raise Corruption(f"object {digest}: content does not hash to its name")

    def stored_size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def remove(self, digest: str) -> None:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            pass

    def __iter__(self) -> Iterator[str]:
        """Every stored digest."""
        if not self.root.exists():
            return
        for sub in sorted(os.listdir(self.root)):
            if len(sub) != 2:
                continue
            for name in sorted(os.listdir(self.root / sub)):
                if len(name) == 30:
                    yield sub + name
