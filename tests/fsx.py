"""fsx-style checker: random reads, writes, truncates and mmap I/O on one file, checked against
an in-memory model after every operation.

Usable against any path on any filesystem (cowfs, kernel overlayfs, a plain directory):

    python -m tests.fsx FILE [--ops N] [--seed S] [--max-len BYTES]

The file may already exist (on a layered mount: a lower file, so the first write copies it up);
its current content is the model's starting point. Every read, and every mmap read, is compared
with the model; a mismatch raises FsxError naming the operation, the first bad offset and the
last operations, so a failure can be replayed with the same seed. Now and then the file is
closed and reopened (a fresh FUSE open: a lower handle becomes an upper one) and checked whole.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
from collections import deque
from dataclasses import dataclass, field

PAGE = mmap.PAGESIZE


class FsxError(AssertionError):
    """The file's content differs from the model."""


@dataclass
class FsxStats:
    ops: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    max_size: int = 0


class Fsx:
    """One file, one model. `step()` does one random operation and checks it."""

    # (operation, weight): fsync and reopen are rarer, they cost a disk flush or a whole read.
    OPS = (("read", 20), ("write", 20), ("append", 8), ("truncate", 8), ("mapread", 10),
           ("mapwrite", 10), ("reopen", 3), ("fsync", 1))  # fmt: skip

    def __init__(self, path: str, seed: int = 0, max_len: int = 256 * 1024,
                 mmap_ops: bool = True) -> None:  # fmt: skip
        self.path = path
        self.rng = random.Random(seed)
        self.max_len = max_len
        self.mmap_ops = mmap_ops
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.model = bytearray(_read_all(self.fd))
        self.log: deque[str] = deque(maxlen=12)
        self.stats = FsxStats()
        self._names = [name for name, _ in self.OPS]
        self._weights = [w for _, w in self.OPS]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Fsx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one operation -----------------------------------------------------------------------------

    def step(self) -> None:
        op = self.rng.choices(self._names, self._weights)[0]
        if op.startswith("map") and not self.mmap_ops:
            op = op[3:]
        getattr(self, "_" + op)()
        self.stats.ops += 1
        self.stats.counts[op] = self.stats.counts.get(op, 0) + 1
        self.stats.max_size = max(self.stats.max_size, len(self.model))

    def run(self, n: int) -> FsxStats:
        for _ in range(n):
            self.step()
        self.check_whole("end")
        return self.stats

    def _span(self, limit: int) -> tuple[int, int]:
        """A random (offset, length) within [0, limit], biased toward small lengths."""
        if limit <= 0:
            return 0, 0
        off = self.rng.randrange(limit)
        length = min(limit - off, int(self.rng.expovariate(1 / 4096)) + 1)
        return off, length

    def _read(self) -> None:
        off, length = self._span(len(self.model))
        self.log.append(f"read {off}+{length}")
        got = os.pread(self.fd, length, off)
        self._compare(got, off, length, "read")

    def _write(self) -> None:
        off = self.rng.randrange(self.max_len)
        length = min(self.max_len - off, int(self.rng.expovariate(1 / 4096)) + 1)
        data = self.rng.randbytes(length)
        self.log.append(f"write {off}+{length}")
        n = os.pwrite(self.fd, data, off)
        if n != length:
            raise self._fail(f"short write {n} of {length}")
        self._model_write(off, data)

    def _append(self) -> None:
        room = self.max_len - len(self.model)
        if room <= 0:
            return self._truncate()
        data = self.rng.randbytes(min(room, self.rng.randrange(1, 8192)))
        self.log.append(f"append {len(self.model)}+{len(data)}")
        os.pwrite(self.fd, data, len(self.model))
        self.model += data

    def _truncate(self) -> None:
        size = self.rng.randrange(self.max_len + 1)
        self.log.append(f"truncate {size}")
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model += bytes(size - len(self.model))
        st = os.fstat(self.fd)
        if st.st_size != size:
            raise self._fail(f"st_size {st.st_size} after truncate to {size}")

    def _mapread(self) -> None:
        off, length = self._span(len(self.model))
        if not length:
            return self._read()
        start = off - off % PAGE
        self.log.append(f"mapread {off}+{length}")
        with mmap.mmap(self.fd, off + length - start, mmap.MAP_SHARED, mmap.PROT_READ,
                       offset=start) as m:  # fmt: skip
            got = m[off - start : off - start + length]
        self._compare(got, off, length, "mapread")

    def _mapwrite(self) -> None:
        # Shared writable mappings cannot grow a file: write within the current size.
        off, length = self._span(len(self.model))
        if not length:
            return self._write()
        start = off - off % PAGE
        data = self.rng.randbytes(length)
        self.log.append(f"mapwrite {off}+{length}")
        with mmap.mmap(self.fd, off + length - start, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=start) as m:  # fmt: skip
            m[off - start : off - start + length] = data
            if self.rng.random() < 0.05:  # msync costs a disk flush: sometimes, not always
                m.flush()
        self._model_write(off, data)

    def _fsync(self) -> None:
        self.log.append("fsync")
        os.fsync(self.fd)

    def _reopen(self) -> None:
        self.log.append("reopen")
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)
        self.check_whole("reopen")

    # -- model -------------------------------------------------------------------------------------

    def _model_write(self, off: int, data: bytes) -> None:
        if off > len(self.model):
            self.model += bytes(off - len(self.model))
        self.model[off : off + len(data)] = data

    def _compare(self, got: bytes, off: int, length: int, what: str) -> None:
        want = bytes(self.model[off : off + length])
        if got != want:
            bad = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                       min(len(got), len(want)))  # fmt: skip
            raise self._fail(f"{what} {off}+{length}: got {len(got)} bytes, want {len(want)}; "
                             f"first difference at file offset {off + bad}")  # fmt: skip

    def check_whole(self, why: str) -> None:
        st = os.fstat(self.fd)
        if st.st_size != len(self.model):
            raise self._fail(f"{why}: st_size {st.st_size}, model {len(self.model)}")
        self._compare(_read_all(self.fd), 0, len(self.model), f"{why} whole-file read")

    def _fail(self, message: str) -> FsxError:
        ops = "; ".join(self.log)
        return FsxError(f"fsx {self.path} after {self.stats.ops} ops: {message} (last: {ops})")


def _read_all(fd: int) -> bytes:
    chunks, off = [], 0
    while chunk := os.pread(fd, 1 << 20, off):
        chunks.append(chunk)
        off += len(chunk)
    return b"".join(chunks)


def run_fsx(path: str, ops: int, seed: int = 0, max_len: int = 256 * 1024,
            mmap_ops: bool = True) -> FsxStats:  # fmt: skip
    """Run `ops` random operations on `path`; raises FsxError on the first wrong byte."""
    with Fsx(path, seed=seed, max_len=max_len, mmap_ops=mmap_ops) as fsx:
        return fsx.run(ops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--ops", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=256 * 1024)
    p.add_argument("--no-mmap", action="store_true")
    a = p.parse_args(argv)
    try:
        stats = run_fsx(a.file, a.ops, a.seed, a.max_len, not a.no_mmap)
    except FsxError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"{stats.ops} ops ok, max size {stats.max_size}, {stats.counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
