"""Reading a blob as it streams: compression by magic, digests and sizes on the way through.

A layer blob is read once. HashingReader hashes and counts what passes (and refuses to pass more
than a budget: the decompression-bomb guard), Peekable puts the sniffed magic back,
decompressor() inflates gzip or zstd, Prefetcher moves inflating onto a thread (zlib and zstd
release the GIL, so it overlaps the tar parse), and ZstdFrameCheck tells a zstd stream that ends
at a frame boundary from one that was cut short (python-zstandard's readers end quietly).
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
import zlib
from collections.abc import Callable
from typing import BinaryIO

import zstandard

from cowfs.errors import InvalidInput

try:  # ISA-L's inflate is 2.5x zlib's: gzip layers import at the speed of uncompressed ones
    from isal import igzip as _gzip
    from isal.igzip_lib import IsalError as _IsalError

    # What a damaged or cut gzip stream raises, besides OSError and EOFError.
    GZIP_ERRORS: tuple[type[Exception], ...] = (zlib.error, _IsalError)
except ImportError:  # pragma: no cover - a dependency (setup.cfg); stdlib gzip reads the same
    import gzip as _gzip

    GZIP_ERRORS = (zlib.error,)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20

Progress = Callable[[int], None]  # called with the number of bytes just read


class HashingReader(io.RawIOBase):
    """Reads through `f`, hashing and counting; refuses to go past `budget` bytes."""

    def __init__(self, f: BinaryIO, budget: int | None, what: str,
                 progress: Progress | None = None, hashing: bool = True) -> None:  # fmt: skip
        self.f = f
        self.sha = hashlib.sha256() if hashing else None
        self.count = 0
        self.budget = budget
        self.what = what
        self.progress = progress
        self.observe: Callable[[bytes], None] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # buf: a writable buffer
        data = self.f.read(len(buf))
        n = len(data)
        buf[:n] = data
        if n:
            self._account(data)
        return n

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        if data:
            self._account(data)
        return data

    def _account(self, data: bytes) -> None:
        if self.sha is not None:
            self.sha.update(data)
        self.count += len(data)
        if self.budget is not None and self.count > self.budget:
            raise InvalidInput(
                f"{self.what} expands beyond {human(self.budget)} (decompression bomb?)"
            )
        if self.progress is not None:
            self.progress(len(data))
        if self.observe is not None:
            self.observe(data)

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def digest(self) -> str:
        assert self.sha is not None
        return "sha256:" + self.sha.hexdigest()


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TiB"


def detect_compression(head: bytes) -> str | None:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


class Peekable(io.RawIOBase):
    """A stream with its first bytes put back, so magic can be sniffed without seeking."""

    def __init__(self, head: bytes, f: BinaryIO) -> None:
        self.head = head
        self.f = f

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.head:
            if size < 0 or size >= len(self.head):
                data, self.head = self.head, b""
                rest = self.f.read(-1 if size < 0 else size - len(data))
                return data + rest
            data, self.head = self.head[:size], self.head[size:]
            return data
        return self.f.read(size)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


class ZstdFrameCheck:
    """Follows the zstd frame structure over the compressed bytes, block header by block header.

    python-zstandard's readers end quietly when the input stops inside a frame, so a truncated
    zstd layer would read as a shorter tar; this tells a stream that ends at a frame boundary
    from one cut short. It looks at headers only and skips block bodies arithmetically.
    """

    _ZSTD = 0xFD2FB528

    def __init__(self) -> None:
        self.frames = 0
        self.state = "magic"
        self.pending = b""
        self.skip = 0
        self.then = "magic"
        self.checksum = False
        self._rest = 0

    def _need(self) -> int:
        return {"magic": 4, "fhd": 1, "block": 3, "skipsize": 4}.get(self.state, self._rest)

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.skip:
                k = min(self.skip, end - pos)
                self.skip -= k
                pos += k
                if not self.skip:
                    self.state = self.then
                    if self.state == "sum":  # the frame's content checksum follows
                        self._skip(4, "magic")
                continue
            want = self._need() - len(self.pending)
            self.pending += data[pos : pos + want]
            pos += min(want, end - pos)
            if len(self.pending) == self._need():
                header, self.pending = self.pending, b""
                self._parse(header)

    def _skip(self, n: int, then: str) -> None:
        self.skip, self.then = n, then
        if not n:
            self.state = then

    def _parse(self, h: bytes) -> None:
        if self.state == "magic":
            magic = int.from_bytes(h, "little")
            if magic == self._ZSTD:
                self.frames += 1
                self.state = "fhd"
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self.state = "skipsize"
            else:
                raise InvalidInput("damaged or truncated archive (data after the zstd frames)")
        elif self.state == "fhd":
            d = h[0]
            fcs, single, did = d >> 6, (d >> 5) & 1, d & 3
            self.checksum = bool(d & 4)
            self._rest = (0 if single else 1) + (0, 1, 2, 4)[did] + (single, 2, 4, 8)[fcs]
            self.state = "rest" if self._rest else "block"
        elif self.state == "rest":
            self.state = "block"
        elif self.state == "block":
            b = int.from_bytes(h, "little")
            last, kind, size = b & 1, (b >> 1) & 3, b >> 3
            if kind == 3:
                raise InvalidInput("damaged or truncated archive (bad zstd block)")
            body = 1 if kind == 1 else size
            after = "block" if not last else ("sum" if self.checksum else "magic")
            self._skip(body, after)
            if self.state == "sum":
                self._skip(4, "magic")
        elif self.state == "skipsize":
            self._skip(int.from_bytes(h, "little"), "magic")

    def complete(self) -> bool:
        return self.frames > 0 and self.state == "magic" and not self.pending and not self.skip


def decompressor(raw: BinaryIO, compression: str | None) -> BinaryIO:
    if compression == "gzip":
        return _gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


class Prefetcher(io.RawIOBase):
    """Reads `src` on a thread, a chunk ahead: inflating (zlib and zstd drop the GIL) and hashing
    the blob overlap with parsing the tar on the caller's thread. Errors of the reading thread
    are raised by read(); close() stops the thread (it never outlives the import)."""

    _STOP = object()

    # Large chunks: the thread takes the GIL back after each read, hash and put, and waits for
    # it while the parser holds it; a few times per 4 MiB keeps that off the critical path.
    def __init__(self, src: BinaryIO, chunk: int = 4 * _CHUNK, depth: int = 4) -> None:
        self.src = src
        self.chunk = chunk
        self.q: queue.Queue = queue.Queue(depth)
        self.stopped = threading.Event()
        self.item = b""  # the chunk being read, from self.pos on
        self.pos = 0
        self.eof = False
        self.thread = threading.Thread(target=self._run, name="cowfs-layer-read", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                data = self.src.read(self.chunk)
                if not self._put(data) or not data:
                    return
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)

    def _put(self, item: object) -> bool:
        while not self.stopped.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        item = self.q.get()
        if isinstance(item, BaseException):
            self.eof = True
            raise item
        if not item:
            self.eof = True
        self.item, self.pos = item, 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            parts = [self.item[self.pos :]]
            while not self.eof:
                self._fill()
                parts.append(self.item)
            self.item, self.pos = b"", 0
            return b"".join(parts)
        if self.pos >= len(self.item):
            if self.eof:
                return b""
            self._fill()
        item, pos = self.item, self.pos
        if pos == 0 and size >= len(item):  # the whole chunk, as it came: no copy
            self.pos = len(item)
            return item
        data = item[pos : pos + size]
        self.pos = pos + len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stopped.set()
        while self.thread.is_alive():
            try:  # unblock a put() that waits for room
                self.q.get(timeout=0.05)
            except queue.Empty:
                pass
        super().close()
