"""Content-addressed object store: file contents keyed by the xxh128 of their bytes.

Each object is stored once, in one of two formats, both made of independent *frames* of FRAME_SIZE
uncompressed bytes so that a read at any offset touches at most a frame or two:

* **zstd seekable** (the format of zstd's contrib/seekable_format): every frame is an ordinary zstd
  frame, followed by a skippable frame holding the seek table (compressed size, decompressed size
  and XXH64-low-32 checksum per frame). Plain `zstd -d` decompresses such a file.
* **raw**, when compression does not pay (already-compressed data): the bytes as they are, followed
  by a trailer with an XXH64 per frame, so a pread is a pread plus a checksum.

Every read is verified against the frame checksum: a damaged object raises Corruption, never
returns wrong bytes.

Where an object lives: a *loose* object is a file of its own, objects/<2 hex>/<30 hex>; a small
one (stored form <= PACK_MAX_OBJECT) is usually *packed*: a span of a pack file under
objects/packs/, in the same bytes a loose file would hold (see "packs" below). A layer import
packs its files in tar order, so the files of a directory sit side by side on disk: a cold read
of them is a few large reads, not one random read per file, and a store of 50k small files is a
few dozen files. open() hides the difference; location() tells it (fsck, tests).

Writes are staged in tmp/ and renamed into place; they are idempotent (an object that exists is
not written again; the same object in two packs, or packed and loose, is harmless: either copy
serves it). Durability is batched: callers call sync() (or PackWriter.publish(), which syncs)
once before they publish anything that references new objects (one syncfs for the batch).

Storage contract: put_*() returning DIGEST means the content is stored at DIGEST (durable after
the next sync()); PackWriter.publish() returning means every object appended is durable and
found by has()/open() of any ObjectStore on the same root (other instances look again when an
object is not where they last saw it).
"""

from __future__ import annotations

import _thread  # threading and queue would load functools and collections: see below
import bisect
import errno
import fcntl
import mmap
import os
import struct
import time
from _collections import OrderedDict  # the C one, without collections' imports
from _queue import SimpleQueue

import xxhash

from cowfs import zstd as zstandard
from cowfs.atomic import fsync_dir
from cowfs.errors import Corruption, NotFound

# Annotations only. This module is on a FUSE daemon's way to a container's first instruction,
# where pathlib, re, typing, threading, queue, functools and collections (~20 ms) are not
# loaded: paths are str inside (`root` and the others are made on first use), locks and the
# helper threads come from _thread (docs/ARCHITECTURE.md, "The start path").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from typing import BinaryIO

FRAME_SIZE = 128 * 1024
# Level 1: measured on the 1.2 GB Debian import bench, level 3 costs 20% more CPU for a store
# 4% smaller (0.309x against 0.322x of the rootfs); import speed is what level 1 buys.
ZSTD_LEVEL = 1
# Store raw when zstd saves less than this fraction: decompressing costs more than it saves.
MIN_SAVING = 0.1
# put_stream judges a large stream's compressibility on its first frames (1 MiB).
_PROBE_FRAMES = 8

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
    """A small LRU of decompressed frames, shared by all readers of a store (thread-safe).

    An OrderedDict, not a plain dict popped from its front: after many such pops, finding a
    dict's first key walks the deleted slots before it until the next resize (measured: 72 µs
    per eviction with 50k pops behind it, in a read of every file of a tree)."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()  # oldest use first
        self._bytes = 0
        self._lock = _thread.allocate_lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._frames.get(key)
            if data is not None:
                self._frames.move_to_end(key)  # now the newest
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        with self._lock:
            if key in self._frames:
                return
            self._frames[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._frames:
                self._bytes -= len(self._frames.popitem(last=False)[1])


class ObjectReader:
    """Random access to one stored object. pread() is safe to call from several threads.

    A loose object is read through its own file descriptor; a packed one (small by definition)
    is read whole when it is opened, with one pread of its pack: a reader then holds no fd, and
    the frames are sliced from memory (and still verified)."""

    __slots__ = ("digest", "size", "_fd", "_blob", "_raw", "_starts", "_offsets", "_csizes",
                 "_checks", "_cache", "_map", "_behind")  # fmt: skip

    def __init__(self, digest: str, fd: int, cache: FrameCache, blob: bytes | None = None) -> None:
        self.digest = digest
        self._fd = fd
        self._blob = blob
        self._cache = cache
        self._map: memoryview | None = None
        self._behind: bool | None = None  # big reads drop the pages behind them (_pread_raw_span)
        try:
            self._read_index()
        except BaseException:
            self.close()
            raise

    def _pread(self, n: int, offset: int) -> bytes:
        if self._blob is not None:
            return self._blob[offset : offset + n]
        return os.pread(self._fd, n, offset)

    def _read_index(self) -> None:
        file_size = len(self._blob) if self._blob is not None else os.fstat(self._fd).st_size
        if file_size < _SEEK_FOOTER.size:
            raise Corruption(f"object {self.digest}: too short")
        tail = self._pread(max(_SEEK_FOOTER.size, _RAW_FOOTER.size), max(0, file_size - 20))
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
        table = self._pread(table_len, table_off)
        skip_magic, skip_len = struct.unpack("<II", self._pread(8, table_off - 8))
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
        table = self._pread(table_len, size)
        self._raw = True
        self._checks = [c for (c,) in struct.iter_unpack("<I", table)]
        self._starts = list(range(0, size, frame))
        self._offsets = self._starts
        self._csizes = [min(frame, size - s) for s in self._starts]
        self.size = size

    def _frame(self, i: int, keep: bool = True) -> bytes:
        """Frame `i`, decompressed and verified; kept in the frame cache if `keep`."""
        key = (self.digest, i)
        data = self._cache.get(key)
        if data is not None:
            return data
        blob = self._pread(self._csizes[i], self._offsets[i])
        if len(blob) != self._csizes[i]:
            raise Corruption(f"object {self.digest}: frame {i} truncated")
        if self._raw:
            data = blob
        else:
            try:
                data = _decompressor().decompress(blob)
            except zstandard.ZstdError as exc:
                _tls.dctx = None  # a fresh context after damage, whatever state it left
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
        if keep:
            self._cache.put(key, data)
        return data

    def pread(self, size: int, offset: int) -> bytes | memoryview:
        """Up to `size` bytes at `offset` (fewer only at the end of the object); a big read of
        a loose raw object comes as a read-only memoryview of the object's map, to save a copy."""
        if offset >= self.size or size <= 0:
            return b""
        end = min(self.size, offset + size)
        i = bisect.bisect_right(self._starts, offset) - 1
        if self._raw and self._fd >= 0 and end - offset >= 2 * FRAME_SIZE:
            return self._pread_raw_span(i, offset, end)
        parts = []
        starts = self._starts
        last = len(starts) - 1
        while offset < end:
            # A frame this read uses whole is not cached: reads that go on from here start in
            # the next one (a small file read whole, a big one read in aligned 1 MiB requests).
            # Caching them only evicted the frames that partial reads come back to.
            frame_end = starts[i + 1] if i < last else self.size
            frame = self._frame(i, keep=offset > starts[i] or end < frame_end)
            lo = offset - starts[i]
            chunk = frame[lo : lo + (end - offset)]
            parts.append(chunk)
            offset += len(chunk)
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _pread_raw_span(self, i: int, offset: int, end: int) -> memoryview:
        """A big read of a loose raw object: the frames it touches verified in a read-only map
        of the object, and the bytes returned as a slice of that map.

        Measured on a 512 MiB sequential read through the mount (1 MiB requests): per-frame
        preads, the frame cache and a join cost the daemon 0.29-0.35 s of CPU with the object
        in the page cache, this 0.25-0.28 s (XXH64 is a third of it, the kernel's copy into the
        FUSE page cache a quarter); from a cold cache 0.47-0.85 s of wall time went to 0.42-0.68
        s with the prefetch below. Big reads are streaming reads, so their frames are not
        cached. The map is safe: objects are never modified in place (written aside, renamed),
        and an unlinked one stays mapped.

        An object none of whose bytes were cached at its first big read is left so: the pages
        _PREFETCH behind each read are dropped (_prefetch), as copy_into drops what it copied.
        The kernel keeps what the reader got in the FUSE page cache; the object's copy would
        be a second one. And the pages freed are the next ones the kernel hands out, to the
        FUSE page cache and the object's readahead: on this VM, a page never used since the
        host took it back costs a host fault at its first touch, which the kernel's copy into
        the FUSE page cache took in the serving thread (perf: 75% of its time in that memcpy).
        Measured in one process, copying 512 MiB from a cached object into a tmpfs file 1 MiB
        at a time: 1.47-1.54 s keeping the object cached, 0.25-0.29 s dropping it behind.
        """
        view = self._mapped()
        j = bisect.bisect_left(self._starts, end)
        if j < len(self._starts):  # (a read to the end, such as read_all, has nothing ahead)
            if self._behind is None:
                self._behind = self._uncached()
            _prefetch(self._fd, self._starts[j], view.obj if self._behind else None)
        for k in range(i, j):
            lo = self._starts[k]
            if _frame_checksum(view[lo : lo + self._csizes[k]]) != self._checks[k]:
                raise Corruption(f"object {self.digest}: frame {k} checksum mismatch")
        return view[offset:end]

    def read_all(self) -> bytes:
        data = self.pread(self.size, 0)
        return data if isinstance(data, bytes) else bytes(data)

    def copy_into(self, fd: int, written: Callable[[int, int], None] | None = None) -> None:
        """Write the whole object, verified, into the host file `fd` at the same offsets.

        For copy-up: the frame cache is bypassed (a big copy would evict what readers use) and
        every frame is checked before its bytes are written. All-zero frames are not written:
        the caller sets the file size, so they read back as holes. `written(offset, length)` is
        told of each stretch written before the last (e.g. to start writing it to the disk).

        A loose object none of whose bytes were cached when the copy began leaves none cached:
        each stretch is dropped once copied. The copy serves the file's reads from now on, and
        the pages dropped are the ones the next stretch reads into. On this VM, whose free
        memory is handed back to the host a few seconds after it is freed, a copy-up that
        takes fresh pages for its source as well as for its copy pays the host's page faults
        twice. The bench's 256 MiB copy-up 4 s after a cache drop, 4 interleaved rounds: 0.62-0.89
        s keeping its source cached, 0.28-0.32 s dropping it, fuse-overlayfs 0.51-0.65 s. With
        benchmarks/probes/copyup_after_pause.sh, 3 rounds: 0.27-0.33 s 0.3 s or 6 s after the
        drop, fuse-overlayfs 0.50-0.55 s (0.60-0.88 s 6 s after it, keeping the source cached).
        """
        if self.size == 0:
            return
        loose = self._fd >= 0
        drop = loose and self._uncached()  # drop the stored pages once copied
        if loose and self._raw:
            self._copy_raw_into(fd, written, drop)
            return
        if loose:
            # Ask for the stored bytes _COPY_AHEAD ahead of the copy: the disk reads them while
            # frames are checked and written, instead of after (the reads do not block).
            os.posix_fadvise(self._fd, 0, _COPY_AHEAD, os.POSIX_FADV_WILLNEED)
        batches = self._raw_batches() if self._raw else self._decompressed_batches()
        for first, frames in batches:
            end = first + len(frames)
            if loose and end < len(self._starts):
                ahead = self._offsets[end] + _COPY_AHEAD - _COPY_READ
                os.posix_fadvise(self._fd, ahead, _COPY_READ, os.POSIX_FADV_WILLNEED)
            self._write_batch(fd, first, frames)
            if drop:  # (to the end of the file after the last batch)
                stored_end = self._offsets[end] if end < len(self._starts) else 0
                _drop_pages(self._fd, self._offsets[first], stored_end)
            if written is not None and end < len(self._starts):
                written(self._starts[first], self._starts[end] - self._starts[first])

    def _copy_raw_into(self, fd: int, written: Callable[[int, int], None] | None,
                       drop: bool) -> None:  # fmt: skip
        """copy_into of a loose raw object, whose bytes sit at their own offsets in its file:
        the kernel copies each stretch (copy_file_range: the disk read and the copy happen in
        the kernel, no byte passes through this process), and then its frames are verified
        where the copy put them: in a map of `fd` itself when it is open for reading and sized
        already, as for a copy-up (the copy's dirty pages are what will reach the disk), else
        in a map of the object. A thread copies the next stretch while this one is verified.

        Measured on the bench's 256 MiB copy-up from a cold cache, fdatasync included, 5 runs:
        reading into a buffer, verifying there and writing it out took 0.46-0.73 s (median
        0.52); this 0.43-0.97 (median 0.46), against kernel overlayfs' 0.50 and fuse-overlayfs'
        0.23 (no fdatasync: the rest is the disk writing the copy). Later, in process and without
        the fdatasync (now after the rename, cowfs/settling.py): the copy took 0.21-0.23 s and
        its verification 0.05 s after it, 0.28-0.30 s in all; with the two overlapped, 0.24-0.36
        s over 9 runs, against 0.23-0.71 s for one copy_file_range of the whole file in the same
        runs (benchmarks/probes/copy_into_phases.py; the disk's speed varies that much)."""
        checks, starts, csizes = self._checks, self._starts, self._csizes
        readable = (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
                    and os.fstat(fd).st_size >= self.size)  # fmt: skip
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        n = len(starts)
        stretches = []  # (first frame, end frame, first byte, end byte)
        k = 0
        while k < n:
            j = bisect.bisect_left(starts, starts[k] + _COPY_STEP, k + 1)
            stretches.append((k, j, starts[k], starts[j] if j < n else self.size))
            k = j
        self._mapped()  # (made here: the copier reads zero frames through it too)
        copy = mmap.mmap(fd, self.size, prot=mmap.PROT_READ) if readable else None
        view = memoryview(copy) if copy is not None else self._mapped()
        copied: SimpleQueue[set[int] | BaseException | None] = SimpleQueue()
        cancel: list[bool] = []
        copying = False
        try:
            if len(stretches) > 1:
                _thread.start_new_thread(self._copy_stretches, (fd, stretches, copied, cancel))
            else:
                self._copy_stretches(fd, stretches, copied, cancel)
            copying = True
            for k, j, first, stop in stretches:
                holes = copied.get()
                if isinstance(holes, BaseException):
                    raise holes
                assert holes is not None  # (the copier stops early only when cancelled)
                for i in range(k, j):
                    lo = starts[i]
                    if i in holes:  # (reading a hole of a tmpfs through a map would fill it)
                        continue
                    if _frame_checksum(view[lo : lo + csizes[i]]) != checks[i]:
                        raise Corruption(f"object {self.digest}: frame {i} checksum mismatch")
                if drop:
                    _drop_pages(self._fd, first, stop)
                if written is not None and stop < self.size:
                    written(first, stop - first)
        finally:
            if copying:  # the copier must be done with fd before the caller closes it
                cancel.append(True)
                while copied.get() is not None:
                    pass
            if copy is not None:
                view.release()
                copy.close()

    def _copy_stretches(self, fd: int, stretches: list[tuple[int, int, int, int]],
                        copied: SimpleQueue[set[int] | BaseException | None],
                        cancel: list[bool]) -> None:  # fmt: skip
        """_copy_raw_into's copier: copy each stretch (frames k..j-1, bytes first..stop-1) into
        `fd` but its zero frames, and tell `copied` which frames those were; then None. Run on
        a thread of its own when there are several stretches, so that the kernel copies the
        next stretch while the caller verifies the last (the copy waits on the disk, the check
        on the CPU)."""
        checks, starts, csizes = self._checks, self._starts, self._csizes
        try:
            for k, j, first, stop in stretches:
                if cancel:
                    break
                run = first  # the start of the stretch not yet copied
                holes = set()
                for i in range(k, j):
                    lo, size = starts[i], csizes[i]
                    if _is_zero_frame(checks[i], self._mapped()[lo : lo + size]):  # a hole
                        self._copy_range(fd, run, lo)
                        run = lo + size
                        holes.add(i)
                self._copy_range(fd, run, stop)
                copied.put(holes)
        except BaseException as exc:
            copied.put(exc)
        finally:
            copied.put(None)

    def _uncached(self) -> bool:
        """Whether none of a loose object's frames are in the page cache (cachestat(2); where
        the kernel cannot tell, as if none were). Up to the page its seek table begins in:
        opening the object read the table."""
        from cowfs.hostdir import cached_pages  # (ctypes: not for commands that copy nothing)

        table = (self._offsets[-1] + self._csizes[-1]) & ~(mmap.PAGESIZE - 1)
        return not table or not cached_pages(self._fd, 0, table)

    def restore_holes(self, fd: int) -> int:
        """Fill the holes of host file `fd` (a copy of this object, maybe written to since)
        with this object's bytes where those are not zeros; return the bytes written.

        After a host crash, a block of a copy that never reached the disk reads back as a hole:
        this puts the object's bytes back there. Data, whether the copy's or written over it
        later, is left as it is (see cowfs/settling.py)."""
        end = min(os.fstat(fd).st_size, self.size)
        restored = pos = 0
        while pos < end:
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if hole >= end:
                break
            try:
                data = min(os.lseek(fd, hole, os.SEEK_DATA), end)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = end  # a hole to the end of the file
            at = hole
            i = bisect.bisect_right(self._starts, at) - 1
            while at < data:  # frame by frame: a frame of zeros stays a hole, as in the copy
                frame_end = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
                chunk = self.pread(min(data, frame_end) - at, at)
                if not chunk:
                    raise Corruption(f"object {self.digest}: shorter than its seek table says")
                if bytes(chunk).count(0) != len(chunk):
                    _pwrite_all(fd, [chunk], at)
                    restored += len(chunk)
                at += len(chunk)
                i += 1
            pos = data
        return restored

    def _copy_range(self, fd: int, start: int, end: int) -> None:
        from cowfs.hostdir import copy_range  # (ctypes: not for commands that copy nothing)

        while start < end:
            copied = copy_range(self._fd, fd, end - start, start)
            if copied <= 0:
                raise Corruption(f"object {self.digest}: shorter than its trailer says")
            start += copied

    def _mapped(self) -> memoryview:
        if self._map is None:
            try:
                m = mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ)
            except ValueError:  # the file is shorter than the map
                raise Corruption(f"object {self.digest}: shorter than its trailer says") from None
            m.madvise(mmap.MADV_SEQUENTIAL)  # a fault reads ahead, as a read() would
            self._map = memoryview(m)
        return self._map

    def _spans(self) -> Iterator[tuple[int, int, int]]:
        """(first frame, end frame, stored bytes) of runs of frames read in one go."""
        i, n = 0, len(self._starts)
        while i < n:
            j, want = i + 1, self._csizes[i]
            while j < n and want + self._csizes[j] <= _COPY_READ:
                want += self._csizes[j]
                j += 1
            yield i, j, want
            i = j

    def _raw_batches(self) -> Iterator[tuple[int, list[memoryview]]]:
        # A packed raw object (a loose one is copied by _copy_raw_into): in memory already.
        view = memoryview(self._blob)  # type: ignore[arg-type]
        for i, j, want in self._spans():
            if len(view) < self._offsets[i] + want:
                raise Corruption(f"object {self.digest}: frame {j - 1} truncated")
            yield i, [view[s : s + n] for s, n in zip(self._offsets[i:j], self._csizes[i:j],
                                                      strict=True)]  # fmt: skip

    def _decompressed_batches(self) -> Iterator[tuple[int, list[bytes]]]:
        dctx = _decompressor()
        for i, j, want in self._spans():
            blob = memoryview(self._pread(want, self._offsets[i]))
            if len(blob) != want:
                raise Corruption(f"object {self.digest}: frame {j - 1} truncated")
            frames, at = [], 0
            for k in range(i, j):
                try:
                    frames.append(dctx.decompress(blob[at : at + self._csizes[k]]))
                except zstandard.ZstdError as exc:
                    raise Corruption(
                        f"object {self.digest}: frame {k} does not decompress ({exc})"
                    ) from None
                at += self._csizes[k]
            yield i, frames

    def _write_batch(self, fd: int, first: int, frames: list[bytes] | list[memoryview]) -> None:
        """Verify each frame (size and checksum), then write the runs of non-zero frames."""
        run: list[bytes | memoryview] = []
        run_at = 0
        for i, data in enumerate(frames, first):
            start = self._starts[i]
            end = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
            if len(data) != end - start:
                raise Corruption(
                    f"object {self.digest}: frame {i} size does not match the seek table"
                )
            check = _frame_checksum(data)
            if check != self._checks[i]:
                raise Corruption(f"object {self.digest}: frame {i} checksum mismatch")
            if _is_zero_frame(check, data):
                _pwrite_all(fd, run, run_at)
                run = []
                continue
            if not run:
                run_at = start
            run.append(data)
        _pwrite_all(fd, run, run_at)

    def close(self) -> None:
        # Dropped, not closed: a reply may still hold a slice; the last reference unmaps it.
        self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def uncached(self) -> ObjectReader:
        """A second reader of the same bytes that bypasses the frame cache (for verification)."""
        if self._blob is not None:
            return ObjectReader(self.digest, -1, FrameCache(0), self._blob)
        return ObjectReader(self.digest, os.dup(self._fd), FrameCache(0))

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PREFETCH = 8 << 20  # how far ahead of a big read of a loose object the disk is asked to read
# ...in hints of this much each. The kernel reads at most max(read_ahead_kb, max_sectors_kb) of
# one WILLNEED hint (force_page_cache_ra): one 8 MiB hint read 2.5 MiB here, and the serving
# thread's page faults read the rest, waiting for the disk (perf: a quarter of its time). With
# 256 KiB hints the bench's 512 MiB cold read went from 0.79-0.90 s to 0.57-0.70 s and the
# serving thread's CPU from 0.38 s to 0.26 s. 256 KiB is below that limit on any disk whose
# max_sectors_kb is 256 or more (2.5 MiB on the bench disk, 8 MiB on this VM's own).
_HINT = 256 << 10
_prefetch_queue: SimpleQueue[tuple[int, int, mmap.mmap | None]] | None = None
_prefetch_lock = _thread.allocate_lock()


def _drop_pages(fd: int, start: int, end: int) -> None:
    """Let the kernel drop the clean, unmapped pages of [start, end) of `fd` (end 0: to the end
    of the file)."""
    os.posix_fadvise(fd, start, end - start if end else 0, os.POSIX_FADV_DONTNEED)


def _prefetch(fd: int, offset: int, behind: mmap.mmap | None = None) -> None:
    """Ask for [offset, offset + _PREFETCH) of `fd` from a helper thread, once per _PREFETCH;
    with `behind` (the object's map), also drop the _PREFETCH of the object that ends
    _PREFETCH before `offset`, which the reader has gone past.

    posix_fadvise(WILLNEED) allocates the page cache and submits the reads in the caller: done
    by the serving thread, that CPU would add to every big read; done here, on another core,
    the reads are under way before the serving thread gets to them. The fd may be closed by the
    time the hint runs: the hint then fails (ignored) or lands on another file (harmless). A
    page dropped that is read again is read from the disk again: slower, never wrong."""
    global _prefetch_queue
    if offset % _PREFETCH >= FRAME_SIZE * 8:
        return
    if _prefetch_queue is None:
        with _prefetch_lock:
            if _prefetch_queue is None:
                q: SimpleQueue[tuple[int, int, mmap.mmap | None]] = SimpleQueue()
                _thread.start_new_thread(_prefetcher, (q,))  # dies with the process
                _prefetch_queue = q
    _prefetch_queue.put((fd, offset + _PREFETCH, behind))


def _prefetcher(q: SimpleQueue[tuple[int, int, mmap.mmap | None]]) -> None:
    while True:
        _prefetch_now(*q.get())


def _prefetch_now(fd: int, offset: int, behind: mmap.mmap | None) -> None:
    try:
        for at in range(offset, offset + _PREFETCH, _HINT):
            os.posix_fadvise(fd, at, _HINT, os.POSIX_FADV_WILLNEED)
        start = (offset - 3 * _PREFETCH) & ~(mmap.PAGESIZE - 1)
        if behind is not None and start >= 0:
            # The map's pages first: the page cache keeps a page while a map holds it.
            behind.madvise(mmap.MADV_DONTNEED, start, _PREFETCH)
            _drop_pages(fd, start, start + _PREFETCH)
    except (OSError, ValueError):
        pass  # a closed fd or map: the reader is gone


_COPY_READ = 1 << 20  # bytes per read and write of a copy_into: more measured slower here
_COPY_AHEAD = 16 << 20  # how far ahead of a copy_into its stored bytes are asked for
_COPY_STEP = 8 << 20  # a raw copy_into verifies, copies and reports `written` this much at a time


def _is_zero_frame(check: int, data: bytes | memoryview) -> bool:
    """Whether a frame (with checksum `check`) is all zeros: the checksum says which frames may
    be, the bytes decide (a frame made to collide is data like any other)."""
    return check == _zero_checksum(len(data)) and data == bytes(len(data))


_ZERO_CHECKSUMS: dict[int, int] = {}  # frame length -> checksum of that many zeros


def _zero_checksum(n: int) -> int:
    check = _ZERO_CHECKSUMS.get(n)
    if check is None:
        check = _ZERO_CHECKSUMS[n] = _frame_checksum(bytes(n))
    return check


def _pwrite_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """pwritev of `parts` at `offset`, continued after a short write."""
    while parts:
        n = os.pwritev(fd, parts, offset)
        offset += n
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts = parts[1:]
        if parts and n:
            parts = [memoryview(parts[0])[n:], *parts[1:]]


_tls = _thread._local()


def _compressor() -> zstandard.ZstdCompressor:
    """One compressor per thread: making a context per object costs more than small objects'
    compression itself, and a context must not be shared between threads."""
    cctx = getattr(_tls, "cctx", None)
    if cctx is None:
        cctx = _tls.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    """One decompressor per thread, as _compressor: a new context per frame cost 24 µs against
    9 µs for a 8 KiB frame here, and a small file is one frame (a cold read of every file of
    an image reads tens of thousands)."""
    dctx = getattr(_tls, "dctx", None)
    if dctx is None:
        dctx = _tls.dctx = zstandard.ZstdDecompressor()
    return dctx


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
def _path(path: str) -> Path:
    from pathlib import Path

    return Path(path)


def _is_digest(text: str) -> bool:
    """32 lowercase hex digits (an xxh128 digest)."""
    return len(text) == 32 and not text.strip("0123456789abcdef")


class ObjectStore:
    """Objects under `root` (loose files and packs/), staged in `tmp`, read through a shared
    frame cache."""

    def __init__(self, root: str | os.PathLike, tmp: str | os.PathLike | None = None) -> None:
        self._root = os.fspath(root).rstrip("/") or "/"
        if tmp is None:
            tmp = os.path.join(os.path.dirname(self._root), "tmp")
        self._tmp = os.fspath(tmp).rstrip("/") or "/"
        os.makedirs(self._root, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        self._packs = os.path.join(self._root, PACK_DIR)
        self.cache = FrameCache()
        self._root_s = f"{self._root}/"
        self._tmp_s = f"{self._tmp}/"
        # The packs' indexes, merged: digest (16 bytes) -> (pack name, offset, length). Loaded on
        # first use, so that a store opened for something else never reads them.
        self._loc: dict[bytes, tuple[str, int, int]] | None = None
        # Opened on first read, then kept for the store's life (readers share them; one that
        # gc removes stays readable through its fd, and what it held is the same elsewhere).
        self._pack_fds: dict[str, int] = {}
        self._pack_digests: dict[str, list[bytes]] = {}
        self.damaged_packs: dict[str, str] = {}  # name -> why its index could not be read
        self._index_lock = _thread.RLock()
        # Before the merged index exists, the first lookups scan the packs' raw indexes
        # (see _scan): (name, raw index, objects end) per readable pack, in name order.
        self._raw: list[tuple[str, bytes, int]] | None = None
        self._scans = 0

    # Paths for callers, as pathlib objects: made when asked for (see the imports above).
    root = property(lambda self: _path(self._root))
    tmp = property(lambda self: _path(self._tmp))
    packs_dir = property(lambda self: _path(self._packs))

    def path(self, digest: str) -> Path:
        if not _is_digest(digest):
            raise NotFound(f"not an object digest: {digest!r}")
        return _path(self._path_s(digest))

    def _path_s(self, digest: str) -> str:
        return f"{self._root_s}{digest[:2]}/{digest[2:]}"

    def has(self, digest: str) -> bool:
        if not _is_digest(digest):
            raise NotFound(f"not an object digest: {digest!r}")
        if self._packed(digest) is not None or os.path.exists(self._path_s(digest)):
            return True
        self.refresh()  # published by another process since the index was loaded?
        return self._packed(digest) is not None

    # -- packs -----------------------------------------------------------------------------

    def _index(self) -> dict[bytes, tuple[str, int, int]]:
        loc = self._loc
        if loc is None:
            with self._index_lock:
                if self._loc is None:
                    self._load_packs()
                loc = self._loc
        return loc

    def _packed(self, digest: str) -> tuple[str, int, int] | None:
        key = bytes.fromhex(digest)
        if self._loc is None and self._scans < _SCAN_LOOKUPS:
            return self._scan(key)
        return self._index().get(key)

    def _scan(self, key: bytes) -> tuple[str, int, int] | None:
        """One lookup without the merged index: the first entry for `key` in the packs' raw
        indexes, packs in name order (as the merged index, built with setdefault, answers).

        A FUSE daemon is started per container and reads a few dozen objects while the
        container starts; merging the indexes of a 50k-object store costs ~25 ms of CPU (far
        more under load) on every start, a scan ~0.1 ms per lookup. Past _SCAN_LOOKUPS
        lookups the merged index is built as before. (runstart helper, minimal edit.)"""
        with self._index_lock:
            if self._loc is not None:  # built meanwhile
                return self._loc.get(key)
            if self._raw is None:
                self._raw = self._read_raw_indexes()
            self._scans += 1
            raws = self._raw
        for name, raw, objects_end in raws:
            i = raw.find(key)
            while i >= 0 and i % _PACK_ENTRY.size:  # a match across two entries: look on
                i = raw.find(key, i + 1)
            if i >= 0:
                _, off, length = _PACK_ENTRY.unpack_from(raw, i)
                if off + length > objects_end:  # as read_pack_index: the pack is damaged
                    with self._index_lock:
                        self.damaged_packs[name] = f"pack {name}: index points past the objects"
                        self._raw = [r for r in self._raw or () if r[0] != name]
                    continue
                return name, off, length
        return None

    def _read_raw_indexes(self) -> list[tuple[str, bytes, int]]:
        try:
            names = sorted(n[: -len(PACK_SUFFIX)] for n in os.listdir(self._packs)
                           if n.endswith(PACK_SUFFIX))  # fmt: skip
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name in self.damaged_packs:
                continue
            try:  # opened for its index only, as _load_packs does: reads open what they read
                fd = os.open(self._pack_s(name), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                raw, objects_end = _read_raw_index(fd, name)
            except Corruption as exc:
                self.damaged_packs[name] = exc.message
                continue
            finally:
                os.close(fd)
            out.append((name, raw, objects_end))
        return out

    def _load_packs(self) -> None:
        """Load the index of every pack not loaded yet; forget packs that are gone."""
        try:
            names = {n[: -len(PACK_SUFFIX)] for n in os.listdir(self._packs)
                     if n.endswith(PACK_SUFFIX)}  # fmt: skip
        except FileNotFoundError:
            names = set()
        # A first load, or a rebuild when packs are gone (rare: gc repacked), fills a new dict
        # that is published whole: other threads read self._loc without the lock, and a
        # half-filled index would answer "missing" for a packed object. New packs are added
        # to the live dict in place, which readers may see entry by entry. The fds are kept
        # either way (a reader may be using one).
        rebuild = self._loc is None or any(n not in names for n in self._pack_digests)
        loc = {} if rebuild else self._loc
        digests = {} if rebuild else self._pack_digests
        assert loc is not None
        for name in sorted(names):
            if name in digests or name in self.damaged_packs:
                continue
            # Opened to read the index only: a process that reads objects opens the packs it
            # reads from (a store may hold more packs than a daemon should keep open).
            try:
                fd = os.open(self._pack_s(name), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                entries = read_pack_index(fd, name)
            except Corruption as exc:
                self.damaged_packs[name] = exc.message
                continue
            finally:
                os.close(fd)
            _merge_pack(loc, digests, name, entries)
        self._loc, self._pack_digests = loc, digests

    def _add_pack(self, name: str, entries: list[tuple[bytes, int, int]]) -> None:
        loc = self._index()
        with self._index_lock:
            _merge_pack(loc, self._pack_digests, name, entries)

    def _pack_fd(self, name: str) -> int:
        fd = self._pack_fds.get(name)
        if fd is None:
            with self._index_lock:
                fd = self._pack_fds.get(name)
                if fd is None:
                    fd = os.open(self._pack_s(name), os.O_RDONLY | os.O_CLOEXEC)
                    self._pack_fds[name] = fd
        return fd

    def refresh(self) -> None:
        """See packs published (or removed) by other processes since the index was loaded."""
        with self._index_lock:
            if self._loc is None:
                self._index()
            else:
                self._load_packs()

    def packs(self) -> dict[str, list[str]]:
        """Every readable pack: name -> the digests it holds, in pack order."""
        self._index()
        return {n: [k.hex() for k in keys] for n, keys in sorted(self._pack_digests.items())}

    def pack_path(self, name: str) -> Path:
        return _path(self._pack_s(name))

    def _pack_s(self, name: str) -> str:
        return f"{self._packs}/{name}{PACK_SUFFIX}"

    def location(self, digest: str) -> tuple[Path, int, int]:
        """(file, offset, length) of the object's stored bytes: a loose file or a span of a pack."""
        loc = self._packed(digest)
        if loc is not None:
            return self.pack_path(loc[0]), loc[1], loc[2]
        path = self.path(digest)
        try:
            return path, 0, path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"object {digest} is missing") from None

    def pack_writer(self) -> PackWriter:
        return PackWriter(self)

    def rewrite_pack(self, name: str, keep: Callable[[str], bool]) -> tuple[int, int]:
        """Replace pack `name` by a new pack of the objects `keep` accepts (none: no new pack);
        the old pack goes once the new one is durable. Returns (objects dropped, bytes freed)."""
        digests = self.packs().get(name)
        if digests is None:
            raise NotFound(f"pack {name} not found")
        old_size = self.pack_path(name).stat().st_size
        index = self._index()
        # A digest the merged index places elsewhere has another copy that serves it.
        kept = [d for d in digests if keep(d) and index[bytes.fromhex(d)][0] == name]
        writer = self.pack_writer()
        try:
            fd = self._pack_fd(name)
            for digest in kept:
                _, off, length = index[bytes.fromhex(digest)]
                writer.append([(digest, os.pread(fd, length, off))])
            new = writer.publish()
        except BaseException:
            writer.discard()
            raise
        new_size = sum(self.pack_path(n).stat().st_size for n in new)
        os.unlink(self.pack_path(name))
        fsync_dir(self._packs)
        with self._index_lock:
            # Not while other threads read this store: gc's own process only.
            fd = self._pack_fds.pop(name, None)
            if fd is not None:
                os.close(fd)
            self._load_packs()
        return len(digests) - len(kept), old_size - new_size

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

    def write_loose(self, digest: str, blob: bytes) -> None:
        """Store an encoded object as a file of its own (unless it is there already)."""
        path = self._path_s(digest)
        if not os.path.exists(path):
            self._write_object(digest, path, blob)

    def _write_object(self, digest: str, path: str, blob: bytes) -> None:
        tmp = f"{self._tmp_s}obj.{os.getpid()}.{_thread.get_ident()}.{digest}"
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
        """Store the rest of a binary stream (read frame by frame: never all in memory).

        A stream whose first _PROBE_FRAMES frames do not compress is stored raw from there on,
        without compressing the rest (media, archives, random data): deciding only at the end
        would compress all of it, then read it back and write it again raw."""
        first = f.read(FRAME_SIZE)
        if len(first) < FRAME_SIZE:  # the common case: a small file
            return self.put_bytes(first)
        hasher = xxhash.xxh3_128()
        cctx = _compressor()
        tmp = self._tmpfile()
        entries: list[bytes] = []
        raw_len = packed_len = 0
        probe: list[bytes] | None = []  # the first frames, kept until compression is judged
        raw_checks: list[int] | None = None  # set once the object is being written raw
        try:
            with open(tmp, "wb") as out:
                frame = first
                while frame:
                    hasher.update(frame)
                    raw_len += len(frame)
                    if raw_checks is not None:
                        out.write(frame)
                        raw_checks.append(_frame_checksum(frame))
                        frame = f.read(FRAME_SIZE)
                        continue
                    c = cctx.compress(frame)
                    out.write(c)
                    entries.append(_SEEK_ENTRY.pack(len(c), len(frame), _frame_checksum(frame)))
                    packed_len += len(c)
                    if probe is not None:
                        probe.append(frame)
                        if len(probe) == _PROBE_FRAMES:
                            if packed_len > raw_len * (1 - MIN_SAVING):
                                out.seek(0)
                                out.truncate()
                                out.write(b"".join(probe))
                                raw_checks = [_frame_checksum(p) for p in probe]
                            probe = None
                    frame = f.read(FRAME_SIZE)
                if raw_checks is not None:
                    out.write(struct.pack(f"<{len(raw_checks)}I", *raw_checks))
                    out.write(_RAW_FOOTER.pack(raw_len, FRAME_SIZE, _RAW_MAGIC))
                else:
                    table = b"".join(entries)
                    footer = _SEEK_FOOTER.pack(len(entries), _CHECKSUM_FLAG, _SEEKABLE_MAGIC)
                    out.write(struct.pack("<II", _SKIPPABLE_MAGIC, len(table) + len(footer)))
                    out.write(table + footer)
            digest = hasher.hexdigest()
            path = self.path(digest)
            if path.exists():
                return digest
            if raw_checks is None and packed_len > raw_len * (1 - MIN_SAVING):
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
        name = f"obj.{os.getpid()}.{_thread.get_ident()}.{os.urandom(6).hex()}"
        return _path(self._tmp_s + name)

    def _publish(self, tmp: Path, path: Path) -> None:
        os.chmod(tmp, 0o444)  # objects are immutable; a stray write should fail loudly
        self._rename_into_place(str(tmp), str(path))

    def sync(self) -> None:
        """Make every object written so far durable (one syncfs for the whole batch)."""
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.syncfs(fd) if hasattr(os, "syncfs") else os.sync()
        finally:
            os.close(fd)

    def open(self, digest: str, size: int = 0) -> ObjectReader:
        """A reader of object `digest`; `size`, its content's size if known: a big one is
        looked for as a loose file first (packs hold small stored forms), which spares a cold
        first open the reading of every pack's index (~10 ms on the bench's store)."""
        if not _is_digest(digest):
            raise NotFound(f"not an object digest: {digest!r}")
        if size > _LOOSE_FIRST:
            reader = self._open_loose(digest)
            if reader is not None:
                return reader
        for attempt in (0, 1):
            loc = self._packed(digest)
            if loc is not None:
                try:
                    return self._open_packed(digest, *loc)
                except FileNotFoundError:
                    pass  # its pack was repacked away: the refreshed index knows where it went
            else:
                reader = self._open_loose(digest)
                if reader is not None:
                    return reader
            if attempt == 0:
                self.refresh()  # published by another process since the index was loaded?
        raise NotFound(f"object {digest} is missing")

    def _open_loose(self, digest: str) -> ObjectReader | None:
        try:
            fd = os.open(self._path_s(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return ObjectReader(digest, fd, self.cache)

    def _open_packed(self, digest: str, name: str, off: int, length: int) -> ObjectReader:
        blob = os.pread(self._pack_fd(name), length, off)
        if len(blob) != length:
            raise Corruption(f"object {digest}: pack {name} is truncated")
        return ObjectReader(digest, -1, self.cache, blob)

    def read(self, digest: str) -> bytes:
        with self.open(digest) as r:
            return r.read_all()

    def verify(self, digest: str) -> None:
        """Check every frame and the content hash; raises Corruption or NotFound."""
        hasher = xxhash.xxh3_128()
        with self.open(digest) as r, r.uncached() as uncached:
            for i in range(len(uncached._starts)):
                hasher.update(uncached._frame(i))
        if hasher.hexdigest() != digest:
            raise Corruption(f"object {digest}: content does not hash to its name")

    def stored_size(self, digest: str) -> int:
        """Bytes the object takes (its file, or its span of a pack)."""
        loc = self._packed(digest)
        if loc is not None:
            return loc[2]
        return self.path(digest).stat().st_size

    def remove(self, digest: str) -> None:
        """Remove a loose object; a packed one goes with a rewrite of its pack."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            pass
        loc = self._packed(digest)
        if loc is not None:
            self.rewrite_pack(loc[0], lambda d: d != digest)

    def packed(self, digest: str) -> bool:
        """Whether a pack holds the object (an in-memory lookup: no system call)."""
        return self._packed(digest) is not None

    def loose(self) -> Iterator[str]:
        """Every digest stored as a file of its own."""
        if not os.path.exists(self._root):
            return
        for sub in sorted(os.listdir(self._root)):
            if len(sub) != 2:
                continue
            for name in sorted(os.listdir(os.path.join(self._root, sub))):
                if len(name) == 30:
                    yield sub + name

    def __iter__(self) -> Iterator[str]:
        """Every stored digest, once: loose ones, then packed ones in pack order."""
        seen = set()
        for digest in self.loose():
            seen.add(digest)
            yield digest
        for digests in self.packs().values():
            for digest in digests:
                if digest not in seen:
                    seen.add(digest)
                    yield digest


# -- packs -----------------------------------------------------------------------------------
#
# A pack holds many small objects back to back, each in exactly the bytes a loose object file
# would hold (seekable zstd or raw, with its frame checksums), in the order they were written:
# an import writes them in tar order, roughly directory by directory, so a cold read of a
# directory's files reads a few large extents instead of one random block per file.
#
#   <object>* <index> <footer>
#   index:  count x (digest: 16 bytes, offset: u64, length: u32), in pack order
#   footer: index offset u64, count u32, xxh64 of the index u64, magic "COWPACK1"
#
# A pack is written whole under tmp/, made durable and renamed into objects/packs/: it is
# visible complete or not at all, and its index travels with it (there is no index file that
# could disagree with its pack).

PACK_DIR = "packs"
PACK_SUFFIX = ".pack"
# Objects whose stored form is at most this large go to packs; larger ones are files of their
# own (a read of them is a large extent already, and gc can drop them one by one).
PACK_MAX_OBJECT = 256 * 1024
# Content bigger than a pack's biggest stored form is mostly stored loose: open() looks there
# first. A compressible one that is packed after all costs one failed open more.
_LOOSE_FIRST = PACK_MAX_OBJECT
PACK_TARGET = 64 << 20  # a pack is closed once it holds this much: gc rewrites whole packs
_PACK_ENTRY = struct.Struct("<16sQI")
_SCAN_LOOKUPS = 64  # lookups answered by ObjectStore._scan before the merged index is built
_PACK_FOOTER = struct.Struct("<QIQ8s")
_PACK_MAGIC = b"COWPACK1"


def _merge_pack(loc: dict[bytes, tuple[str, int, int]], digests: dict[str, list[bytes]],
                name: str, entries: list[tuple[bytes, int, int]]) -> None:  # fmt: skip
    """Add one pack's index to a merged index: the first pack (in name order) holding a digest
    answers for it."""
    for key, off, length in entries:
        loc.setdefault(key, (name, off, length))
    digests[name] = [k for k, _, _ in entries]


def read_pack_index(fd: int, name: str) -> list[tuple[bytes, int, int]]:
    """The (digest, offset, length) entries of an open pack; Corruption if they do not add up."""
    index, index_off = _read_raw_index(fd, name)
    entries = list(_PACK_ENTRY.iter_unpack(index))
    for _, off, length in entries:
        if off + length > index_off:
            raise Corruption(f"pack {name}: index points past the objects")
    return entries


def _read_raw_index(fd: int, name: str) -> tuple[bytes, int]:
    """An open pack's index as stored (checked against its footer and checksum) and where
    its objects end."""
    size = os.fstat(fd).st_size
    if size < _PACK_FOOTER.size:
        raise Corruption(f"pack {name}: too short for a footer")
    index_off, count, check, magic = _PACK_FOOTER.unpack(
        os.pread(fd, _PACK_FOOTER.size, size - _PACK_FOOTER.size)
    )
    index_len = count * _PACK_ENTRY.size
    if magic != _PACK_MAGIC or index_off + index_len + _PACK_FOOTER.size != size:
        raise Corruption(f"pack {name}: footer damaged")
    index = os.pread(fd, index_len, index_off)
    if len(index) != index_len or xxhash.xxh64_intdigest(index) != check:
        raise Corruption(f"pack {name}: index checksum mismatch")
    return index, index_off


class PackWriter:
    """Appends objects to new packs, staged under tmp/; publish() makes them visible.

    append() may be called from several threads; the objects land in the order of the calls.
    Nothing is visible before publish(): a crash leaves only staging files in tmp/ (gc's)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self._lock = _thread.allocate_lock()
        self._fd = -1
        self._tmp = ""
        self._size = 0
        self._entries: list[tuple[bytes, int, int]] = []
        self._sealed: list[str] = []  # complete packs in tmp/, not yet published

    def append(self, items: list[tuple[str, bytes]]) -> None:
        """Add (digest, stored form) pairs, as encode() makes them."""
        if not items:
            return
        with self._lock:
            if self._fd < 0:
                self._tmp = f"{self.objects._tmp_s}pack.{os.getpid()}.{os.urandom(8).hex()}"
                self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                   0o444)  # fmt: skip
                self._size = 0
                self._entries = []
            off = self._size
            for digest, blob in items:
                self._entries.append((bytes.fromhex(digest), off, len(blob)))
                off += len(blob)
            _write_all(self._fd, b"".join(blob for _, blob in items))
            self._size = off
            if self._size >= PACK_TARGET:
                self._seal()

    def _seal(self) -> None:
        if self._fd < 0:
            return
        try:
            index = b"".join(_PACK_ENTRY.pack(*e) for e in self._entries)
            footer = _PACK_FOOTER.pack(self._size, len(self._entries),
                                       xxhash.xxh64_intdigest(index), _PACK_MAGIC)  # fmt: skip
            _write_all(self._fd, index + footer)
        finally:
            os.close(self._fd)
            self._fd = -1
        self._sealed.append(self._tmp)

    def publish(self) -> list[str]:
        """Make every object appended so far durable and visible; returns the new packs' names.
        Loose objects written before are made durable by the same syncfs."""
        with self._lock:
            self._seal()
            sealed, self._sealed = self._sealed, []
        self.objects.sync()  # the packs' bytes are on disk before their names appear
        if not sealed:
            return []
        self.objects.packs_dir.mkdir(exist_ok=True)
        names = []
        for tmp in sealed:
            name = f"{time.time_ns():x}-{os.urandom(6).hex()}"
            os.rename(tmp, self.objects.pack_path(name))
            names.append(name)
        fsync_dir(self.objects.packs_dir)
        for name in names:
            self.objects._add_pack(name, read_pack_index(self.objects._pack_fd(name), name))
        return names

    def discard(self) -> None:
        """Forget everything not published (an import that failed or was not needed)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                self._sealed.append(self._tmp)
            sealed, self._sealed = self._sealed, []
        for tmp in sealed:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
