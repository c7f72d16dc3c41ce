"""Load: many processes and threads on one cowfs mount, and an fsx-style checker on one file.

Every worker (a thread of one of several processes) owns a directory that starts in the lower
layer (so its changes are copy-ups) and keeps a model of it: reads, stats and readdirs are
checked against the model after every operation, and all workers also read shared lower files
and list a shared directory whose content they know. After the run the mount is unmounted and
remounted and every model is checked again (what was written survives a clean unmount).

Deadlock shows as a worker that does not finish within its timeout; corruption as a model
mismatch; memory as the daemon's VmRSS before and after (a generous bound; the figures are
printed and appended to $COWFS_FIGURES as JSON lines when that is set, for RELIABILITY.md).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import random
import subprocess
import threading
import time
import traceback
from pathlib import Path

import pytest

from cowfs.rootfs import import_rootfs
from cowfs.store import Store
from tests import fsx
from tests.conftest import cowfs_mounted, need_fuse

PROCS, THREADS = 3, 2
FILES_PER_WORKER = 12
SHARED_FILES = 30
RSS_BOUND_MIB = 150  # growth of the daemon's RSS over a run; it measured a few MiB


def content(name: str, size: int) -> bytes:
    """The deterministic content of a lower file."""
    return random.Random(name).randbytes(size)


def lower_tree(root: Path, workers: int) -> dict[str, bytes]:
    """Build the lower tree; returns shared/ files (relative path -> content)."""
    shared = {}
    (root / "shared").mkdir(parents=True)
    for i in range(SHARED_FILES):
        rel = f"shared/s{i:03d}"
        data = content(rel, [0, 100, 5000, 300_000][i % 4])
        (root / rel).write_bytes(data)
        shared[rel] = data
    for w in range(workers):
        d = root / f"w{w}"
        (d / "sub").mkdir(parents=True)
        for i in range(FILES_PER_WORKER):
            rel = f"w{w}/{'sub/' if i % 3 == 0 else ''}f{i:02d}"
            (root / rel).write_bytes(content(rel, [10, 4000, 140_000][i % 3]))
    return shared


def worker_model(w: int) -> dict[str, bytes | None]:
    """The starting model of worker w's directory: relative name -> content (None: a dir)."""
    model: dict[str, bytes | None] = {"sub": None}
    for i in range(FILES_PER_WORKER):
        name = f"{'sub/' if i % 3 == 0 else ''}f{i:02d}"
        model[name] = content(f"w{w}/{name}", [10, 4000, 140_000][i % 3])
    return model


# -- one worker ------------------------------------------------------------------------------------


class Worker:
    """Random operations on its own directory, each checked against its model."""

    def __init__(self, mnt: Path, w: int, shared: dict[str, bytes], seed: int) -> None:
        self.root = mnt / f"w{w}"
        self.mnt = mnt
        self.model = worker_model(w)
        self.shared = shared
        self.rng = random.Random(seed)
        self.ops = 0
        self.serial = 0

    def files(self) -> list[str]:
        return [n for n, v in self.model.items() if v is not None]

    def check(self, what: str, got: object, want: object) -> None:
        if got != want:
            raise AssertionError(f"{self.root}: {what} after {self.ops} ops: got "
                                 f"{_short(got)}, want {_short(want)}")  # fmt: skip

    def step(self) -> None:
        op = self.rng.choice(["read", "read", "write", "append", "pwrite", "rename",
                              "rename_over", "unlink", "readdir", "stat", "truncate",
                              "shared", "shared_dir", "mkdir"])  # fmt: skip
        files = self.files()
        name = self.rng.choice(files) if files else None
        if op in ("read", "append", "pwrite", "unlink", "stat", "truncate", "rename",
                  "rename_over") and name is None:  # fmt: skip
            op = "write"
        getattr(self, "op_" + op)(name)
        self.ops += 1

    def fresh(self) -> str:
        self.serial += 1
        return f"{'sub/' if self.rng.random() < 0.3 else ''}n{self.serial}"

    def op_read(self, name: str) -> None:
        self.check(f"content of {name}", (self.root / name).read_bytes(), self.model[name])

    def op_write(self, name: str | None) -> None:
        name = name if name and self.rng.random() < 0.5 else self.fresh()
        data = self.rng.randbytes(self.rng.choice([0, 1, 700, 9000, 70_000]))
        (self.root / name).write_bytes(data)
        self.model[name] = data

    def op_append(self, name: str) -> None:
        data = self.rng.randbytes(self.rng.randrange(1, 3000))
        with open(self.root / name, "ab") as f:
            f.write(data)
        self.model[name] = self.model[name] + data  # type: ignore[operator]

    def op_pwrite(self, name: str) -> None:
        old = bytearray(self.model[name] or b"")
        off = self.rng.randrange(len(old) + 1)
        data = self.rng.randbytes(self.rng.randrange(1, 5000))
        fd = os.open(self.root / name, os.O_WRONLY)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        old[off : off + len(data)] = data
        self.model[name] = bytes(old)

    def op_truncate(self, name: str) -> None:
        size = self.rng.randrange(len(self.model[name] or b"") + 100)
        os.truncate(self.root / name, size)
        old = self.model[name] or b""
        self.model[name] = old[:size] + bytes(max(0, size - len(old)))

    def op_rename(self, name: str) -> None:
        new = self.fresh()
        os.rename(self.root / name, self.root / new)
        self.model[new] = self.model.pop(name)

    def op_rename_over(self, name: str) -> None:
        others = [n for n in self.files() if n != name]
        if not others:
            return self.op_rename(name)
        target = self.rng.choice(others)
        os.rename(self.root / name, self.root / target)
        self.model[target] = self.model.pop(name)

    def op_unlink(self, name: str) -> None:
        os.unlink(self.root / name)
        del self.model[name]

    def op_readdir(self, _name: str | None) -> None:
        for d in ("", "sub"):
            want = sorted(n.rpartition("/")[2] for n in self.model
                          if n.rpartition("/")[0] == d)  # fmt: skip
            self.check(f"listing of '{d}'", sorted(os.listdir(self.root / d)), want)

    def op_stat(self, name: str) -> None:
        self.check(f"size of {name}", (self.root / name).stat().st_size,
                   len(self.model[name] or b""))  # fmt: skip

    def op_shared(self, _name: str | None) -> None:
        rel = self.rng.choice(sorted(self.shared))
        with open(self.mnt / rel, "rb") as f:
            size = len(self.shared[rel])
            off = self.rng.randrange(size + 1)
            f.seek(off)
            got = f.read(self.rng.randrange(1, 200_000))
        self.check(f"content of {rel}", got, self.shared[rel][off : off + len(got)])
        self.check(f"length read from {rel}", len(got) > 0 or off == size, True)

    def op_shared_dir(self, _name: str | None) -> None:
        got = sorted(os.listdir(self.mnt / "shared"))
        self.check("listing of shared", got, sorted(p.split("/")[1] for p in self.shared))

    def op_mkdir(self, _name: str | None) -> None:
        self.serial += 1
        d = self.root / f"d{self.serial}"
        d.mkdir()
        if self.rng.random() < 0.7:
            d.rmdir()
        else:
            self.model[f"d{self.serial}"] = None

    def verify_all(self) -> None:
        self.op_readdir(None)
        for name in self.files():
            self.op_read(name)


def _short(v: object) -> str:
    if isinstance(v, bytes):
        return f"<{len(v)} bytes {v[:8].hex()}...>"
    return repr(v)[:300]


def _process(mnt: str, p: int, shared: dict[str, bytes], seconds: float, seed: int,
             out: multiprocessing.Queue) -> None:  # fmt: skip
    """One process: THREADS workers for `seconds`; puts (ops, error text or None, models)."""
    results: list[tuple[int, str | None, dict]] = []

    def run(w: int) -> None:
        worker = Worker(Path(mnt), w, shared, seed * 1000 + w)
        error = None
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                worker.step()
            worker.verify_all()
        except Exception:
            error = traceback.format_exc(limit=3)
        results.append((worker.ops, error, {w: worker.model}))

    threads = [threading.Thread(target=run, args=(p * THREADS + t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(results)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def record_figure(name: str, **values: object) -> None:
    """Print a measured figure; with $COWFS_FIGURES, append it there as a JSON line."""
    line = json.dumps({"figure": name, **values})
    print(line)
    path = os.environ.get("COWFS_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture
def load_image(tmp_path: Path) -> tuple[Store, dict[str, bytes]]:
    need_fuse()
    tree = tmp_path / "tree"
    shared = lower_tree(tree, PROCS * THREADS)
    store = Store(tmp_path / "store")
    import_rootfs(store, tree, "load:latest")
    return store, shared


def _mixed_load(tmp_path: Path, load_image: tuple[Store, dict[str, bytes]], seconds: float,
                threads: bool) -> None:  # fmt: skip
    store, shared = load_image
    ctx = multiprocessing.get_context("fork")
    base = tmp_path / "m"
    with cowfs_mounted(store, "load:latest", base, threads=threads) as (mnt, pid):
        os.listdir(mnt / "shared")  # the daemon has served a request: a fair baseline
        rss_before = rss_kib(pid)
        out: multiprocessing.Queue = ctx.Queue()
        procs = [ctx.Process(target=_process, args=(str(mnt), p, shared, seconds, p + 1, out))
                 for p in range(PROCS)]  # fmt: skip
        for proc in procs:
            proc.start()
        results = []
        try:
            for _ in procs:  # a worker stuck in the mount is a deadlock: fail, do not wait on
                try:
                    results.extend(out.get(timeout=seconds + 120))
                except queue.Empty:
                    pytest.fail(f"deadlock: a worker process did not finish {seconds + 120} s "
                                f"after its {seconds} s of work")  # fmt: skip
        finally:
            for proc in procs:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        rss_after = rss_kib(pid)
    errors = [e for _, e, _ in results if e]
    assert not errors, "\n".join(errors)
    ops = sum(n for n, _, _ in results)
    record_figure("mixed_load", seconds=seconds, workers=PROCS * THREADS, ops=ops,
                  threads=threads, rss_before_kib=rss_before, rss_after_kib=rss_after)  # fmt: skip
    assert rss_after - rss_before < RSS_BOUND_MIB * 1024, (rss_before, rss_after)

    # What the workers left is still there after a clean unmount and a remount.
    models = {w: m for _, _, d in results for w, m in d.items()}
    with cowfs_mounted(store, "load:latest", base) as (mnt, _pid):
        for w, model in models.items():
            for name, data in model.items():
                p = mnt / f"w{w}" / name
                if data is None:
                    assert p.is_dir(), p
                else:
                    assert p.read_bytes() == data, f"{p} changed across the remount"
            names = sorted(n for n in model if "/" not in n)
            assert sorted(os.listdir(mnt / f"w{w}")) == names


def test_mixed_load_on_one_mount(tmp_path: Path, load_image) -> None:
    _mixed_load(tmp_path, load_image, seconds=12, threads=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("threads", [False, True], ids=["single", "threaded"])
def test_mixed_load_for_minutes(tmp_path: Path, load_image, threads: bool) -> None:
    _mixed_load(tmp_path, load_image, seconds=240, threads=threads)


# -- fsx -------------------------------------------------------------------------------------------


def _fsx_on_cowfs(tmp_path: Path, ops: int, seed: int, threads: bool = False) -> None:
    need_fuse()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "victim").write_bytes(content("victim", 200_000))  # the first write copies it up
    store = Store(tmp_path / "store")
    import_rootfs(store, tree, "fsx:latest")
    with cowfs_mounted(store, "fsx:latest", tmp_path / "m", threads=threads) as (mnt, pid):
        rss_before = rss_kib(pid)
        start = time.monotonic()
        stats = fsx.run_fsx(str(mnt / "victim"), ops, seed=seed)
        elapsed = time.monotonic() - start
        rss_after = rss_kib(pid)
    record_figure("fsx", ops=stats.ops, seconds=round(elapsed, 1), threads=threads,
                  rss_before_kib=rss_before, rss_after_kib=rss_after)  # fmt: skip
    assert stats.ops == ops
    assert rss_after - rss_before < RSS_BOUND_MIB * 1024, (rss_before, rss_after)


def test_fsx_on_cowfs(tmp_path: Path) -> None:
    _fsx_on_cowfs(tmp_path, 10_000, seed=7)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("threads", [False, True], ids=["single", "threaded"])
def test_fsx_on_cowfs_100k(tmp_path: Path, threads: bool) -> None:
    _fsx_on_cowfs(tmp_path, 100_000, seed=8, threads=threads)


def test_fsx_checker_itself_on_kernel_overlayfs(tmp_path: Path) -> None:
    """The checker passes on the reference filesystem and catches a byte changed behind it."""
    need_fuse()
    low, up, work, mnt = (tmp_path / n for n in ("low", "up", "work", "mnt"))
    for d in (low, up, work, mnt):
        d.mkdir()
    (low / "victim").write_bytes(content("victim", 200_000))
    opts = f"lowerdir={low},upperdir={up},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        stats = fsx.run_fsx(str(mnt / "victim"), 3000, seed=9)
        assert stats.ops == 3000 and stats.counts["mapwrite"] > 0 and stats.counts["truncate"] > 0
        with fsx.Fsx(str(mnt / "victim"), seed=10) as checker:
            checker.run(200)
            with open(mnt / "victim", "r+b") as f:  # a change the model does not know of
                f.seek(max(0, len(checker.model) // 2))
                f.write(bytes([checker.model[len(checker.model) // 2] ^ 0xFF])
                        if checker.model else b"x")  # fmt: skip
            with pytest.raises(fsx.FsxError, match="first difference|st_size"):
                checker.check_whole("tampered")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
