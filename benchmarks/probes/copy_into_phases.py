"""The bench's 256 MiB copy-up in process, from a cold cache: ObjectReader.copy_into against one
copy_file_range of the whole object (what fuse-overlayfs' copy-up does), interleaved, with the
time copy_into spent copying and verifying.

    python3 -m benchmarks.probes.copy_into_phases DATA [ROUNDS]

DATA as for creates_by_cpu.sh (the bench's data dir, `full` profile); the copies go to DATA/..
(the same filesystem as the store) and are removed. Needs root (drop_caches).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.dataset import COPYUP_BIG
from cowfs import objects
from cowfs.mounting import image_index
from cowfs.store import Store


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(0.3)


def main() -> None:
    data = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    store = Store(data / "store")
    entry = image_index(store, store.resolve("bench:latest")).entries[COPYUP_BIG]
    out = data.parent / "probe-copy-into"
    out.mkdir(exist_ok=True)
    spent: Counter[str] = Counter()

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[name] += time.perf_counter() - t

        return wrapper

    objects._frame_checksum = timed("verify", objects._frame_checksum)
    objects.ObjectReader._copy_range = timed("copy", objects.ObjectReader._copy_range)

    def whole_file() -> None:
        src = os.open(store.objects.path(entry.digest), os.O_RDONLY)
        dst = os.open(out / "plain", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            pos = 0
            while pos < entry.size:
                pos += os.copy_file_range(src, dst, entry.size - pos, pos, pos)
        finally:
            os.close(src)
            os.close(dst)

    def cowfs_copy() -> None:
        dst = os.open(out / "cowfs", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(dst, entry.size)
            with store.objects.open(entry.digest) as reader:
                reader.copy_into(dst)
        finally:
            os.close(dst)

    try:
        for _ in range(rounds):
            for name, fn in (("copy_file_range", whole_file), ("copy_into", cowfs_copy)):
                drop_caches()
                spent.clear()
                t = time.perf_counter()
                fn()
                took = time.perf_counter() - t
                parts = " ".join(f"{k} {v:.3f}" for k, v in sorted(spent.items()))
                print(f"{name:16} {took:.3f} s  {parts}")
    finally:
        for name in ("plain", "cowfs"):
            (out / name).unlink(missing_ok=True)
        out.rmdir()


if __name__ == "__main__":
    main()
