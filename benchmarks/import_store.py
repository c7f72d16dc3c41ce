"""Import throughput and store size on a real tree.

    python -m benchmarks.import_store [--tree DIR ...] [--max-mb N] [--work DIR] [--out FILE]

Builds one uncompressed layer tar of the given host trees (default: the host's Python standard
library and /usr/share, capped at --max-mb of file content, files taken in sorted order), and its
gzip form (`gzip -6 -n`, as docker and umoci write layers). Then, each into a fresh store:

* import of the uncompressed tar, and of the gzip tar, through layertar.import_layer (the path
  `cowfs image import` and `cowfs pull` take); throughput is MB/s of *uncompressed* tar input,
  wall clock, including the final syncfs and TOC publication; and MB per CPU-second of the
  importing process (all its threads), which is what to compare on a shared machine;
* the same read without the store (contents hashed, not stored), to split the cost between
  parsing and storing;
* store size: bytes of objects/ and layers/ after the import (file sizes, and blocks allocated
  on disk), against the uncompressed rootfs (sum of file sizes; and blocks its files take on
  disk), and against the gzip tar; objects stored, how many of them are loose files, and packs.

Targets (issue 2): >= 100 MB/s; store <= 0.45x the uncompressed rootfs. `run()` returns the
figures as a dict for `cowfs bench`; the script prints them as JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 1_000_000
DEFAULT_TREES = sorted(glob.glob("/usr/lib/python3.*")) + ["/usr/share"]


def collect(trees: list[str], max_bytes: int) -> tuple[list[str], int, int, int]:
    """Paths (relative to /) of entries of `trees` in sorted order until max_bytes of content;
    (paths, content bytes, bytes allocated on disk for them, entries)."""
    paths: list[str] = []
    total = 0
    allocated = 0
    inodes: set[tuple[int, int]] = set()  # hard links are content once, in a tar and a store
    for top in trees:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            paths.append(os.path.relpath(dirpath, "/"))
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if total >= max_bytes:
                    return paths, total, allocated, len(paths)
                paths.append(os.path.relpath(p, "/"))
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in inodes:
                    inodes.add((st.st_dev, st.st_ino))
                    total += st.st_size
                    allocated += st.st_blocks * 512
    return paths, total, allocated, len(paths)


def make_tars(trees: list[str], max_bytes: int, work: Path) -> dict[str, Any]:
    paths, content, allocated, entries = collect(trees, max_bytes)
    listing = work / "files.txt"
    listing.write_text("\n".join(paths) + "\n")
    tar = work / "layer.tar"
    subprocess.run(["tar", "--no-recursion", "--numeric-owner", "--format=posix",
                    "--pax-option=delete=atime,delete=ctime", "-C", "/", "-cf", str(tar),
                    "-T", str(listing)], check=True, stderr=subprocess.DEVNULL)  # fmt: skip
    gz = work / "layer.tar.gz"
    with open(gz, "wb") as out:
        subprocess.run(["gzip", "-6", "-n", "-c", str(tar)], check=True, stdout=out)
    return {"tar": tar, "gzip": gz, "rootfs_bytes": content, "rootfs_disk_bytes": allocated,
            "entries": entries,
            "tar_bytes": tar.stat().st_size, "gzip_bytes": gz.stat().st_size}  # fmt: skip


def disk_usage(*dirs: Path) -> tuple[int, int]:
    """(allocated bytes, apparent bytes) of everything under `dirs`."""
    alloc = apparent = 0
    for d in dirs:
        for dirpath, _, filenames in os.walk(d):
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                alloc += st.st_blocks * 512
                apparent += st.st_size
    return alloc, apparent


def import_once(blob: Path, work: Path, name: str) -> dict[str, Any]:
    from cowfs.layertar import import_layer
    from cowfs.store import Store

    root = work / f"store-{name}"
    if root.exists():
        shutil.rmtree(root)
    store = Store(root)
    load = os.getloadavg()[0]  # wall clock means little when the machine is busy
    r0 = resource.getrusage(resource.RUSAGE_SELF)  # the store's worker threads count too
    t0 = time.perf_counter()
    layer_id = import_layer(store, blob)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    alloc, apparent = disk_usage(root / "objects", root / "layers")
    toc = store.load_toc(layer_id)
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
            "load_before": load, "store_bytes": alloc,
            "store_apparent_bytes": apparent,
            "objects": sum(1 for _ in store.objects),
            "loose_objects": sum(1 for _ in store.objects.loose()),
            "packs": len(store.objects.packs()), "toc_entries": len(toc)}  # fmt: skip


class _HashOnlyBuilder:
    """Stands in for the store's LayerBuilder: contents are read and hashed, not stored. What
    an import costs beyond this is the store's share."""

    def __init__(self) -> None:
        from cowfs.toc import Toc

        self.toc = Toc()

    def add(self, entry, data=None):  # the LayerBuilder.add contract, minus the storing
        import xxhash

        if data is not None:
            h = xxhash.xxh3_128()
            size = 0
            while chunk := data.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
            entry.digest, entry.size = (h.hexdigest() if size else ""), size
        self.toc.add(entry)
        return entry


def parse_once(blob: Path) -> dict[str, Any]:
    """The import path without the store: decompress, hash, parse the tar, read every file."""
    from cowfs.layertar import read_layer

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with open(blob, "rb") as f:
        read_layer(_HashOnlyBuilder(), f, blob_size=blob.stat().st_size)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}


def run(trees: list[str] | None = None, max_mb: int = 400,
        work: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure; returns the figures (a dict ready for JSON)."""
    trees = [t for t in (trees or DEFAULT_TREES) if os.path.isdir(t)]
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="cowfs-import-bench.", dir=work or "/var/tmp"))
    try:
        t = make_tars(trees, max_mb * MB, work)
        out: dict[str, Any] = {
            "trees": trees, "entries": t["entries"], "rootfs_bytes": t["rootfs_bytes"],
            "rootfs_disk_bytes": t["rootfs_disk_bytes"],
            "tar_bytes": t["tar_bytes"], "gzip_bytes": t["gzip_bytes"],
        }  # fmt: skip
        for name in ("tar", "gzip"):
            r = import_once(t[name], work, name)
            r["mb_per_s"] = round(t["tar_bytes"] / MB / r["seconds"], 1)
            # On a shared machine wall time measures the neighbours; CPU time measures cowfs.
            r["mb_per_cpu_s"] = round(t["tar_bytes"] / MB / r["cpu_seconds"], 1)
            out[f"import_{name}"] = r
            p = parse_once(t[name])
            p["mb_per_cpu_s"] = round(t["tar_bytes"] / MB / p["cpu_seconds"], 1)
            out[f"parse_only_{name}"] = p
        # Like with like: bytes of content against bytes of content, disk against disk (small
        # files cost a whole 4 KiB block in the store as they do in the rootfs).
        store = out["import_tar"]["store_apparent_bytes"]
        disk = out["import_tar"]["store_bytes"]
        out["store_vs_rootfs"] = round(store / t["rootfs_bytes"], 3)
        out["store_disk_vs_rootfs_disk"] = round(disk / t["rootfs_disk_bytes"], 3)
        out["store_disk_vs_rootfs"] = round(disk / t["rootfs_bytes"], 3)
        out["store_vs_gzip"] = round(store / t["gzip_bytes"], 3)
        out["targets"] = {"mb_per_s": 100, "store_vs_rootfs": 0.45}
        return out
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", help="host directory to import (repeatable)")
    ap.add_argument("--max-mb", type=int, default=400, help="cap on file content (MB)")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir)")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args(argv)
    res = run(args.tree, args.max_mb, args.work)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    r = res
    print(f"{r['entries']} entries, {r['rootfs_bytes'] / MB:.0f} MB of files: import "
          f"{r['import_tar']['mb_per_s']} MB/s (tar), {r['import_gzip']['mb_per_s']} MB/s (gzip); "
          f"store {r['store_vs_rootfs']}x rootfs ({r['store_disk_vs_rootfs_disk']}x on disk), "
          f"{r['store_vs_gzip']}x gzip; {r['import_tar']['objects']} objects "
          f"({r['import_tar']['loose_objects']} loose), {r['import_tar']['packs']} packs",
          file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
