"""A/B of the FUSE engines (and fuse-overlayfs) on the benchmark image: daemon CPU and wall time.

    python scripts/fuse_engines_ab.py [--rounds 3] [--only find,seq,readall,churn,xattr,open]
        [--systems native,libfuse,fov] [--data benchmarks/results/data/full]

Each round mounts every system afresh (cowfs from DATA/store with a temporary upper, the
same image as `cowfs bench`; fuse-overlayfs on DATA/layers), runs the workloads, and reads the
daemon's CPU time from /proc (user + system, all threads). The order of systems alternates per
round; the medians are printed with the load average. The store is only read (a missing
merged-index cache is written, as any mount does).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cowfs import mounting  # noqa: E402
from cowfs.store import Store  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def small_files(tree: Path, n: int) -> list[str]:
    found = []
    for d, _, files in os.walk(tree):
        if d.startswith(str(tree / "bench")):
            continue
        for f in files:
            st = os.lstat(os.path.join(d, f))
            if st.st_mode & 0o170000 == 0o100000 and 0 < st.st_size < 16384:
                found.append(os.path.relpath(os.path.join(d, f), tree))
    random.seed(1)
    return random.sample(found, min(n, len(found)))


def workloads(mnt: str, only: set[str], small: list[str]) -> list[tuple[str, Callable[[], None]]]:
    def sh(script: str) -> Callable[[], None]:
        return lambda: subprocess.run(["sh", "-c", script, "sh", mnt], check=True,
                                      stdout=subprocess.DEVNULL)  # fmt: skip

    def xattrs() -> None:
        for _ in range(20000):
            try:
                os.getxattr(f"{mnt}/etc/passwd", "user.none")
            except OSError:
                pass

    def open_read() -> None:
        for rel in small:
            with open(os.path.join(mnt, rel), "rb") as f:
                f.read()

    def seq() -> None:
        fd = os.open(f"{mnt}/bench/seq.bin", os.O_RDONLY)
        while os.read(fd, 1 << 20):
            pass
        os.close(fd)

    def create() -> None:
        for d in range(100):
            os.mkdir(f"{mnt}/c{d}")
            for i in range(100):
                with open(f"{mnt}/c{d}/f{i}", "wb") as f:
                    f.write(b"x" * 1024)

    def unlink() -> None:
        for d in range(100):
            for i in range(100):
                os.unlink(f"{mnt}/c{d}/f{i}")
            os.rmdir(f"{mnt}/c{d}")

    find = sh('find "$1" -path "$1/bench" -prune -o -printf "%s %m %U\\n"')
    read_all = sh('find "$1" -path "$1/bench" -prune -o -type f -print0 | xargs -0 -r cat')
    table = {
        "xattr": [("getxattr-20k", xattrs)],
        "open": [("open-read-5k", open_read)],
        "find": [("find-cold", find), ("find-warm", find)],
        "seq": [("seq-read-512M", seq)],
        "readall": [("read-all-cold", read_all), ("read-all-warm", read_all)],
        "churn": [("create-10k", create), ("unlink-10k", unlink)],
    }
    return [w for key, ws in table.items() if key in only for w in ws]


def run_once(system: str, data: Path, only: set[str], small: list[str]) -> dict[str, tuple]:
    base = Path(tempfile.mkdtemp(prefix="cowfs-ab-"))
    mnt, upper, work = base / "m", base / "u", base / "w"
    for d in (mnt, upper, work):
        d.mkdir()
    proc = None
    if system == "fov":
        lowers = ":".join(str(data / "layers" / str(i)) for i in (3, 2, 1, 0))
        opts = f"lowerdir={lowers},upperdir={upper},workdir={work}"
        proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o", opts, str(mnt)])
        while not mounting.is_mounted(mnt):
            time.sleep(0.02)
        pid = proc.pid
    else:
        os.environ["COWFS_FUSE_ENGINE"] = system  # the daemon inherits it
        try:
            pid = mounting.mount(Store(data / "store"), "bench:latest", mnt, upper, work)
        except BaseException:
            shutil.rmtree(base)
            raise
    out = {}
    try:
        os.stat(mnt / "etc")
        for name, fn in workloads(str(mnt), only, small):
            c0, t0 = cpu(pid), time.perf_counter()
            fn()
            out[name] = (cpu(pid) - c0, time.perf_counter() - t0)
    finally:
        if proc is not None:
            subprocess.run(["umount", str(mnt)], check=False)
            proc.wait()
        else:
            mounting.umount(mnt)
        shutil.rmtree(base)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="find,seq,readall,churn")
    ap.add_argument("--systems", default="native,libfuse,fov")
    repo = Path(__file__).resolve().parents[1]
    ap.add_argument("--data", type=Path, default=repo / "benchmarks/results/data/full")
    args = ap.parse_args()
    only = set(args.only.split(","))
    systems = args.systems.split(",")
    small = small_files(args.data / "tree", 5000) if "open" in only else []
    results: dict[str, dict[str, list[tuple]]] = {s: {} for s in systems}
    for r in range(args.rounds):
        for s in systems if r % 2 == 0 else systems[::-1]:
            for name, v in run_once(s, args.data, only, small).items():
                results[s].setdefault(name, []).append(v)
    print(f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, {args.rounds} rounds, "
          "medians: daemon CPU s / wall s")  # fmt: skip
    for name in results[systems[0]]:
        cols = []
        for s in systems:
            runs = results[s][name]
            cols.append(f"{s} {statistics.median(c for c, _ in runs):.2f}/"
                        f"{statistics.median(w for _, w in runs):.2f}")  # fmt: skip
        print(f"{name:15} " + "  ".join(cols))


if __name__ == "__main__":
    main()
