"""Where lower content comes from: a plain host directory or the store's objects.

A lower layer answers `open(path, entry)` with a Reader (pread/close) and, when the content is
a host file, `host_fd(path)` so copy-up can copy in the kernel and keep holes. Lower layers are
read-only: nothing here writes to them.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Protocol

from cowfs.errors import Corruption, NotFound
from cowfs.hostdir import HostDir
from cowfs.toc import Entry

_COPY_CHUNK = 1 << 20


class Reader(Protocol):
    def pread(self, size: int, offset: int) -> bytes: ...
    def close(self) -> None: ...


class LowerLayer(Protocol):
    """Where the content of one lower layer's regular files comes from."""

    def open(self, path: str, entry: Entry) -> Reader: ...
    def host_fd(self, path: str) -> int | None: ...  # a host fd for fast copy-up, if any
    def close(self) -> None: ...


class _FdReader:
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


class _EmptyReader:
    def pread(self, size: int, offset: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


class DirLayer:
    """A plain host directory used as a read-only lower (`-o lowerdir=`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.dir = HostDir(root)

    def host_fd(self, path: str) -> int | None:
        return self.dir.open(path, os.O_RDONLY)

    def open(self, path: str, entry: Entry) -> Reader:
        return _FdReader(self.dir.open(path, os.O_RDONLY))

    def close(self) -> None:
        self.dir.close()


class StoredLayer:
    """A layer of the store: contents are objects keyed by digest."""

    def __init__(self, objects: Any) -> None:
        self.objects = objects

    def host_fd(self, path: str) -> int | None:
        return None

    def open(self, path: str, entry: Entry) -> Reader:
        if not entry.digest:
            return _EmptyReader()
        try:
            reader = self.objects.open(entry.digest)
        except NotFound as exc:  # the TOC names it, so a missing object is damage: EIO
            raise Corruption(exc.message) from None
        # The TOC is checksummed; the object's seek table is not as a whole. A size that
        # disagrees means damage that would shift offsets: refuse rather than serve wrong bytes.
        if reader.size != entry.size:
            reader.close()
            raise Corruption(f"object {entry.digest} of /{path}: size {reader.size}, "
                             f"the layer says {entry.size}")  # fmt: skip
        return reader

    def close(self) -> None:
        pass



def copy_fd(src: int, dst: int, size: int) -> None:
    """Copy a host file keeping its holes: data extents only, in-kernel where possible."""
    off = 0
    while off < size:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            data = off
        try:
            hole = os.lseek(src, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        pos = data
        while pos < hole:
            n = _copy_range(src, dst, hole - pos, pos)
            if n <= 0:
                return
            pos += n
        off = hole


def _copy_range(src: int, dst: int, count: int, pos: int) -> int:
    try:
        return os.copy_file_range(src, dst, count, pos, pos)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    chunk = os.pread(src, min(count, _COPY_CHUNK), pos)
    return os.pwrite(dst, chunk, pos) if chunk else 0
