"""Where lower content comes from: a plain host directory or the store's objects.

A lower layer answers `open(path, entry)` with a Reader (pread/close), and `copy_into(path,
entry, fd)` writes a file's whole content into a host fd for copy-up: in the kernel for a host
file, verified frame by frame for an object, holes kept where cheap. Lower layers are read-only:
nothing here writes to them.
"""

from __future__ import annotations

import errno
import os

from cowfs.errors import Corruption, NotFound
from cowfs.hostdir import HostDir, copy_range, start_writeback

# The interfaces are for type checkers only: `typing` is not loaded on a daemon's way to a
# container's first instruction (docs/ARCHITECTURE.md, "The start path").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Protocol

    from cowfs.toc import Entry

    class Reader(Protocol):
        def pread(self, size: int, offset: int) -> bytes | memoryview: ...
        def close(self) -> None: ...

    class LowerLayer(Protocol):
        """Where the content of one lower layer's regular files comes from."""

        def open(self, path: str, entry: Entry) -> Reader: ...
        def known(self, entry: Entry) -> bool: ...  # open() of it succeeded before: may be deferred
        # The content at offset 0; `writeback`: start writing each stretch to the disk.
        def copy_into(self, path: str, entry: Entry, fd: int, writeback: bool) -> None: ...
        # What a copy of `entry` could be repaired from after a host crash, or None.
        def source_of(self, entry: Entry) -> str | None: ...
        def close(self) -> None: ...

# copy_fd copies at most this much per call and then starts writing it to the disk, so that the
# copy's own reads and writes overlap and a following fdatasync waits for the last stretch only.
_WRITEBACK_STEP = 8 << 20


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

    def copy_into(self, path: str, entry: Entry, fd: int, writeback: bool) -> None:
        src = self.dir.open(path, os.O_RDONLY)
        try:
            copy_fd(src, fd, entry.size, writeback)
        finally:
            os.close(src)

    def source_of(self, entry: Entry) -> str | None:
        return None  # a host file may change: its copies are synced before they are renamed

    def open(self, path: str, entry: Entry) -> Reader:
        return _FdReader(self.dir.open(path, os.O_RDONLY))

    def known(self, entry: Entry) -> bool:
        return False

    def close(self) -> None:
        self.dir.close()


class StoredLayer:
    """A layer of the store: contents are objects keyed by digest."""

    def __init__(self, objects: Any) -> None:
        self.objects = objects
        # (digest, size) pairs whose object opened and had that size: a later open of the
        # same content can be deferred to its first read, which the page cache often spares.
        self._sized: set[tuple[str, int]] = set()

    def known(self, entry: Entry) -> bool:
        return not entry.digest or (entry.digest, entry.size) in self._sized

    def copy_into(self, path: str, entry: Entry, fd: int, writeback: bool) -> None:
        if entry.digest:
            with self._object(path, entry) as reader:
                reader.copy_into(fd, _writeback(fd) if writeback else None)

    def source_of(self, entry: Entry) -> str | None:
        return entry.digest or None

    def restore_holes(self, digest: str, fd: int) -> int:
        """ObjectReader.restore_holes of object `digest` into `fd` (cowfs/settling.py)."""
        try:
            reader = self.objects.open(digest)
        except NotFound as exc:
            raise Corruption(exc.message) from None
        with reader:
            return reader.restore_holes(fd)

    def open(self, path: str, entry: Entry) -> Reader:
        if not entry.digest:
            return _EmptyReader()
        return self._object(path, entry)

    def _object(self, path: str, entry: Entry) -> Any:
        try:
            reader = self.objects.open(entry.digest, entry.size)
        except NotFound as exc:  # the TOC names it, so a missing object is damage: EIO
            raise Corruption(exc.message) from None
        # The TOC is checksummed; the object's seek table is not as a whole. A size that
        # disagrees means damage that would shift offsets: refuse rather than serve wrong bytes.
        if reader.size != entry.size:
            reader.close()
            raise Corruption(f"object {entry.digest} of /{path}: size {reader.size}, "
                             f"the layer says {entry.size}")  # fmt: skip
        self._sized.add((entry.digest, entry.size))
        return reader

    def close(self) -> None:
        pass


def _writeback(fd: int) -> Callable[[int, int], None]:
    return lambda offset, length: start_writeback(fd, offset, length)


def copy_fd(src: int, dst: int, size: int, writeback: bool = True) -> None:
    """Copy a host file keeping its holes: data extents only, in-kernel where possible;
    `writeback`: start writing each stretch to the disk behind the copy."""
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
            n = copy_range(src, dst, min(hole - pos, _WRITEBACK_STEP), pos)
            if n <= 0:
                return
            if writeback and pos + n < size:
                start_writeback(dst, pos, n)
            pos += n
        off = hole

