"""What is timed. Each workload measures one sample on one system and returns seconds.

A sample is: mount the system afresh (empty upper), do the untimed set-up, make the caches what
the workload says — "cold": sync and drop the page, dentry and inode caches after the fresh mount,
the same for every system — then time the operation, then undo and unmount. Read-only workloads
measure "cold" and then "warm" on the same mount: the cold pass is the warm pass's warm-up, which
halves their cost. Timing is wall clock (time.perf_counter) around the operation only.

Workloads that change lower files undo their changes on "native" (whose tree is shared between
samples); on the union filesystems the upper dir is thrown away with the mount.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import proc
from benchmarks.dataset import BENCH_DIR, COPYUP_BIG, COPYUP_SMALL, SEQ_FILE, Dataset, spaced
from benchmarks.profile import MiB, Profile
from benchmarks.systems import CowfsStore, System, View, cli_missing, reap, release
from cowfs.errors import BenchError

SCRATCH = "bench-scratch"  # where workloads create new files inside a view
RENAMED = ".bench-renamed"
PAIR = "cold+warm"  # one mount: timed cold (after drop_caches), then timed again warm
CONTAINER_TIMEOUT = 120.0


@dataclass
class Context:
    ds: Dataset
    profile: Profile
    work: Path  # per-sample run dirs live here
    bundle_template: dict | None = None  # runc config.json, made once


@dataclass
class Sample:
    values: dict[str, float]  # metric name -> seconds
    notes: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    cache: str  # "cold", "warm" or "-"


_libc = ctypes.CDLL(None, use_errno=True)


def drop_caches(*paths: Path) -> None:
    """Write back the filesystems under test, then drop clean page cache, dentries and inodes.

    syncfs(2) of the filesystems holding paths rather than sync(2): a global sync would wait on
    every mount of the machine, including another user's stuck FUSE mount.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _libc.syncfs(fd)
        finally:
            os.close(fd)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _check(cmd: list[str], what: str, timeout: float = proc.DEFAULT_TIMEOUT) -> None:
    proc.run(cmd, what, timeout=timeout, error=BenchError)


class Workload:
    """One timed operation; subclasses fill in set-up, the operation and its undo."""

    name = ""
    cache = "-"
    once = False  # True: measured once per suite by measure_once(), not per system and run
    only: tuple[str, ...] | None = None  # system names it applies to; None = all

    def metrics(self, profile: Profile) -> list[Metric]:
        if self.cache == PAIR:
            t = self.title(profile)
            return [
                Metric(f"{self.name}-cold", f"{t}, cold", "cold"),
                Metric(f"{self.name}-warm", f"{t}, warm", "warm"),
            ]
        return [Metric(self.name, self.title(profile), self.cache)]

    def title(self, profile: Profile) -> str:
        return self.name

    def applies_to(self, system: System) -> bool:
        return self.only is None or system.name in self.only

    def measure(self, ctx: Context, system: System, run_dir: Path) -> Sample:
        view = system.mount(ctx.ds, run_dir)
        try:
            self.setup(ctx, view)
            if self.cache in ("cold", PAIR):
                drop_caches(view.path, ctx.work, ctx.ds.root)
            t0 = time.perf_counter()
            notes = self.operate(ctx, view)
            seconds = time.perf_counter() - t0
            if self.cache != PAIR:
                return Sample({self.name: seconds}, notes or {})
            t0 = time.perf_counter()
            self.operate(ctx, view)
            warm = time.perf_counter() - t0
            return Sample({f"{self.name}-cold": seconds, f"{self.name}-warm": warm}, notes or {})
        finally:
            try:
                if view.shared_lowers:
                    self.undo(ctx, view)
            finally:
                release(view)

    def measure_once(self, ctx: Context) -> dict[str, object]:
        raise NotImplementedError

    def setup(self, ctx: Context, view: View) -> None:
        pass

    def operate(self, ctx: Context, view: View) -> dict[str, object] | None:
        raise NotImplementedError

    def undo(self, ctx: Context, view: View) -> None:
        """Put native's shared tree back the way it was."""
        shutil.rmtree(view.path / SCRATCH, ignore_errors=True)


# ------------------------------------------------------------------------------------ metadata


class StatWalk(Workload):
    cache = PAIR

    def __init__(self, tool: str) -> None:
        self.tool = tool
        self.name = f"stat-walk-{tool}"

    def title(self, profile: Profile) -> str:
        cmd = "find -printf '%s %m %U'" if self.tool == "find" else "ls -lR"
        return f"stat-walk `{cmd}` of the tree"

    def operate(self, ctx: Context, view: View) -> None:
        if self.tool == "find":
            cmd = ["find", str(view.path), "-printf", "%s %m %U\n"]
        else:
            cmd = ["ls", "-lR", str(view.path)]
        _check(cmd, self.name)


class ReadAll(Workload):
    name = "read-all"
    cache = PAIR

    def title(self, profile: Profile) -> str:
        return "read every file of the tree (find | xargs cat)"

    def operate(self, ctx: Context, view: View) -> None:
        root = str(view.path)
        script = 'find "$1" -path "$1/$2" -prune -o -type f -print0 | xargs -0 -r cat > /dev/null'
        _check(["sh", "-c", script, "sh", root, BENCH_DIR], self.name)


# ------------------------------------------------------------------------------------ data I/O


class SeqRead(Workload):
    name = "seq-read"
    cache = PAIR

    def title(self, profile: Profile) -> str:
        return f"sequential read {profile.seq_bytes // MiB} MiB (1 MiB reads)"

    def operate(self, ctx: Context, view: View) -> dict[str, object]:
        fd = os.open(view.path / SEQ_FILE, os.O_RDONLY)
        total = 0
        try:
            while chunk := os.read(fd, MiB):
                total += len(chunk)
        finally:
            os.close(fd)
        if total != ctx.profile.seq_bytes:
            expected = ctx.profile.seq_bytes
            raise BenchError(f"{self.name}: read {total} bytes, expected {expected}")
        return {}


class SeqWrite(Workload):
    name = "seq-write"

    def title(self, profile: Profile) -> str:
        return f"sequential write {profile.seq_bytes // MiB} MiB + fsync, new file"

    def setup(self, ctx: Context, view: View) -> None:
        (view.path / SCRATCH).mkdir()
        self.buf = os.urandom(MiB)

    def operate(self, ctx: Context, view: View) -> None:
        fd = os.open(view.path / SCRATCH / "seq-write.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            for _ in range(ctx.profile.seq_bytes // MiB):
                os.write(fd, self.buf)
            os.fsync(fd)
        finally:
            os.close(fd)


class RandRead(Workload):
    name = "rand-read-4k-cold"
    cache = "cold"

    def title(self, profile: Profile) -> str:
        ops = profile.rand_io_bytes // 4096
        tool = "fio psync" if shutil.which("fio") else "pread"
        return f"random 4 KiB reads ({ops} reads, {tool}) over {profile.seq_bytes // MiB} MiB, cold"

    def operate(self, ctx: Context, view: View) -> dict[str, object]:
        path = view.path / SEQ_FILE
        p = ctx.profile
        if shutil.which("fio") is None:
            return self._pread(path, p)
        cmd = ["fio", "--name=randread", f"--filename={path}", "--readonly", "--rw=randread",
               "--bs=4k", "--ioengine=psync", f"--size={p.seq_bytes}",
               f"--io_size={p.rand_io_bytes}", "--randrepeat=1", "--invalidate=1",
               "--output-format=json"]  # fmt: skip
        out = proc.run(cmd, f"{self.name}: fio", error=BenchError, stdout=subprocess.PIPE)
        job = json.loads(out[out.index("{") :])["jobs"][0]["read"]
        return {"iops": round(job["iops"]), "fio_runtime_ms": job["runtime"]}

    @staticmethod
    def _pread(path: Path, p: Profile) -> dict[str, object]:
        rng = random.Random(42)
        blocks = p.seq_bytes // 4096
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(p.rand_io_bytes // 4096):
                os.pread(fd, 4096, rng.randrange(blocks) * 4096)
        finally:
            os.close(fd)
        return {}


# ------------------------------------------------------------------------------------- copy-up


class _Appends(Workload):
    """Append one byte to lower files: the first write to each copies it up."""

    cache = "cold"

    def targets(self, ctx: Context) -> list[str]:
        raise NotImplementedError

    def setup(self, ctx: Context, view: View) -> None:
        self.saved = {}
        if view.shared_lowers:
            for rel in self.targets(ctx):
                self.saved[rel] = os.stat(view.path / rel)

    def operate(self, ctx: Context, view: View) -> None:
        for rel in self.targets(ctx):
            fd = os.open(view.path / rel, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)

    def undo(self, ctx: Context, view: View) -> None:
        for rel, st in self.saved.items():
            os.truncate(view.path / rel, st.st_size)
            os.utime(view.path / rel, ns=(st.st_atime_ns, st.st_mtime_ns))


class CopyUp(_Appends):
    def __init__(self, which: str) -> None:
        self.which = which
        self.name = f"copy-up-{which}"

    def title(self, profile: Profile) -> str:
        size = profile.copyup_small if self.which == "small" else profile.copyup_big
        return f"copy-up latency: append 1 byte to a {size // MiB} MiB lower file, cold"

    def targets(self, ctx: Context) -> list[str]:
        return [COPYUP_SMALL if self.which == "small" else COPYUP_BIG]


class CopyUpStorm(_Appends):
    name = "copy-up-storm"

    def title(self, profile: Profile) -> str:
        return f"copy-up storm: append 1 byte to {profile.storm_files} small lower files, cold"

    def targets(self, ctx: Context) -> list[str]:
        return spaced(ctx.ds.samples["storm"], ctx.profile.storm_files)


# ----------------------------------------------------------------------------- metadata churn


class CreateUnlink(Workload):
    """Create small files in new directories, then unlink them: two metrics from one sample."""

    name = "small-files"

    def metrics(self, profile: Profile) -> list[Metric]:
        n = profile.small_files
        return [
            Metric("create-small", f"create {n} files of 1 KiB in 100 new dirs", "-"),
            Metric("unlink-small", f"unlink those {n} files and their dirs", "-"),
        ]

    def measure(self, ctx: Context, system: System, run_dir: Path) -> Sample:
        view = system.mount(ctx.ds, run_dir)
        try:
            base = view.path / SCRATCH
            base.mkdir()
            n = ctx.profile.small_files
            per_dir = max(1, n // 100)
            data = b"s" * 1024
            t0 = time.perf_counter()
            for i in range(n):
                d = base / f"d{i // per_dir}"
                if i % per_dir == 0:
                    d.mkdir()
                fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data)
                os.close(fd)
            t1 = time.perf_counter()
            for i in range(n):
                os.unlink(base / f"d{i // per_dir}" / f"f{i}")
                if i % per_dir == per_dir - 1 or i == n - 1:
                    os.rmdir(base / f"d{i // per_dir}")
            t2 = time.perf_counter()
            return Sample({"create-small": t1 - t0, "unlink-small": t2 - t1})
        finally:
            try:
                if view.shared_lowers:
                    self.undo(ctx, view)
            finally:
                release(view)


class Untar(Workload):
    name = "untar"

    def title(self, profile: Profile) -> str:
        return "untar a real tree into the mount (tar -xf, uncompressed)"

    def setup(self, ctx: Context, view: View) -> None:
        (view.path / SCRATCH).mkdir()
        with open(ctx.ds.untar, "rb") as f:  # the source tar is warm for every system
            while f.read(8 * MiB):
                pass

    def operate(self, ctx: Context, view: View) -> None:
        _check(["tar", "-xf", str(ctx.ds.untar), "-C", str(view.path / SCRATCH)], self.name)


class RenameChurn(Workload):
    """Renames of new files across dirs, of lower files, and of lower directories (and back)."""

    name = "rename-churn"

    def title(self, profile: Profile) -> str:
        p = profile
        return (
            f"rename churn: {p.rename_new}×5 renames of new files across dirs, "
            f"{p.rename_lower_files} lower files and {p.rename_lower_dirs} lower dirs and back"
        )

    def setup(self, ctx: Context, view: View) -> None:
        base = view.path / SCRATCH
        for d in range(6):
            (base / f"d{d}").mkdir(parents=True)
        for i in range(ctx.profile.rename_new):
            (base / "d0" / f"f{i}").write_bytes(b"r")

    def operate(self, ctx: Context, view: View) -> dict[str, object]:
        base = view.path / SCRATCH
        for i in range(ctx.profile.rename_new):
            for d in range(5):
                os.rename(base / f"d{d}" / f"f{i}", base / f"d{d + 1}" / f"f{i}")
        exdev = 0
        for rel in self.lower_targets(ctx):
            src = view.path / rel
            dst = view.path / (rel + RENAMED)
            exdev += _rename(src, dst)
            exdev += _rename(dst, src)
        return {"exdev_fallbacks": exdev} if exdev else {}

    def undo(self, ctx: Context, view: View) -> None:
        super().undo(ctx, view)
        for rel in self.lower_targets(ctx):
            if os.path.lexists(view.path / (rel + RENAMED)):
                os.rename(view.path / (rel + RENAMED), view.path / rel)

    @staticmethod
    def lower_targets(ctx: Context) -> list[str]:
        p, samples = ctx.profile, ctx.ds.samples
        return spaced(samples["rename_files"], p.rename_lower_files) + spaced(
            samples["rename_dirs"], p.rename_lower_dirs
        )


def _rename(src: Path, dst: Path) -> int:
    """rename(2), falling back to copy + delete on EXDEV as mv(1) does; returns 1 on fallback."""
    try:
        os.rename(src, dst)
        return 0
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # Kernel overlayfs without redirect_dir refuses to rename lower directories.
    shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
    shutil.rmtree(src)
    return 1


# --------------------------------------------------------------------------- mount and runtime


class MountTime(Workload):
    name = "mount-time"
    cache = "cold"
    only = ("overlayfs", "fuse-overlayfs", "cowfs", "cowfs-dirs")

    def title(self, profile: Profile) -> str:
        return "mount the image until its root is listed, cold caches"

    def measure(self, ctx: Context, system: System, run_dir: Path) -> Sample:
        drop_caches(ctx.work, ctx.ds.root)
        t0 = time.perf_counter()
        view = system.mount(ctx.ds, run_dir)
        try:
            os.listdir(view.path)
            return Sample({self.name: time.perf_counter() - t0})
        finally:
            release(view)


class ContainerRun(Workload):
    """`cowfs run --rm IMAGE true` against runc on each other system's mount of the same tree.

    For runc the time includes mounting and unmounting the rootfs, since `cowfs run` does both.
    Each sample first runs the same start once, untimed, as `hyperfine --warmup 1` would: the
    row is the start time of a runtime already on the machine's page cache, not how long the
    disk takes to load the runtime (`runc` is one Go binary, `cowfs` an interpreter and ~150
    modules, and other rows' drop_caches run in between). The rootfs is no warmer for it: each
    run mounts afresh, and a FUSE mount starts with an empty page cache.
    """

    name = "container-run"

    def title(self, profile: Profile) -> str:
        return ("`run --rm IMAGE true`, start to exit, after one untimed run (cowfs run; runc "
                "run on the others)")  # fmt: skip

    def applies_to(self, system: System) -> bool:
        if isinstance(system, CowfsStore):
            return _has_cowfs_run()
        return shutil.which("runc") is not None

    def measure(self, ctx: Context, system: System, run_dir: Path) -> Sample:
        if isinstance(system, CowfsStore):
            start: Callable[[Path], None] = lambda _: self._cowfs_run(system)  # noqa: E731
            runtime = "cowfs run"
        else:
            start = lambda d: self._runc_run(ctx, system, d)  # noqa: E731
            runtime = "runc run"
        start(run_dir / "warmup")
        t0 = time.perf_counter()
        start(run_dir / "timed")
        return Sample({self.name: time.perf_counter() - t0}, {"runtime": runtime})

    @staticmethod
    def _cowfs_run(system: CowfsStore) -> None:
        try:
            _check([*system.cli(), "run", "--rm", system.ref, "true"], "cowfs run",
                   timeout=CONTAINER_TIMEOUT)  # fmt: skip
        except BenchError:
            assert system.store_root is not None
            reap(system.store_root)
            raise

    @staticmethod
    def _runc_run(ctx: Context, system: System, run_dir: Path) -> None:
        bundle = run_dir.with_name(run_dir.name + "-bundle")
        bundle.mkdir(parents=True)
        try:
            view = system.mount(ctx.ds, run_dir)
            try:
                config = _runc_config(ctx, view.path)
                (bundle / "config.json").write_text(json.dumps(config))
                cid = f"cowfs-bench-{os.getpid()}-{run_dir.parent.name}-{run_dir.name}"
                try:
                    _check(["runc", "run", "--bundle", str(bundle), cid], "runc run",
                           timeout=CONTAINER_TIMEOUT)  # fmt: skip
                except BenchError:
                    subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
                    raise
            finally:
                release(view)
        finally:
            shutil.rmtree(bundle, ignore_errors=True)


_COWFS_RUN: bool | None = None


def _has_cowfs_run() -> bool:
    global _COWFS_RUN
    if _COWFS_RUN is None:
        _COWFS_RUN = cli_missing("run") is None
    return _COWFS_RUN


def _runc_config(ctx: Context, root: Path) -> dict:
    """runc's default spec (`runc spec`), running `true` without a terminal on this root."""
    if ctx.bundle_template is None:
        tmp = ctx.work / "runc-spec"
        tmp.mkdir(parents=True, exist_ok=True)
        _check(["runc", "spec", "--bundle", str(tmp)], "runc spec")
        ctx.bundle_template = json.loads((tmp / "config.json").read_text())
        shutil.rmtree(tmp)
    config = json.loads(json.dumps(ctx.bundle_template))
    config["process"]["terminal"] = False
    config["process"]["args"] = ["true"]
    config["root"] = {"path": str(root), "readonly": False}
    return config


class ImportStore(Workload):
    """Import throughput and store size (benchmarks/import_store.py) on the dataset's rootfs.

    Not a per-system comparison: it runs once, before the interleaved runs, and its figures go to
    their own section of the report.
    """

    name = "import"
    once = True

    def metrics(self, profile: Profile) -> list[Metric]:
        return []

    def applies_to(self, system: System) -> bool:
        return False

    def measure_once(self, ctx: Context) -> dict[str, object]:
        from benchmarks import import_store

        tree = ctx.ds.tree
        trees = sorted(
            str(p)
            for p in tree.iterdir()
            if p.is_dir() and not p.is_symlink() and p.name != BENCH_DIR  # usrmerge: bin -> usr/bin
        )
        max_mb = 1 + ctx.ds.bytes // 1_000_000  # the whole rootfs
        work = ctx.work / "import"
        work.mkdir(parents=True, exist_ok=True)
        try:
            return import_store.run(trees, max_mb=max_mb, work=work)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def all_workloads() -> list[Workload]:
    return [
        StatWalk("find"),
        StatWalk("ls"),
        ReadAll(),
        SeqRead(),
        SeqWrite(),
        RandRead(),
        CopyUp("small"),
        CopyUp("big"),
        CopyUpStorm(),
        CreateUnlink(),
        Untar(),
        RenameChurn(),
        MountTime(),
        ContainerRun(),
        ImportStore(),
    ]


def select(workloads: list[Workload], names: list[str]) -> list[Workload]:
    """Workloads whose name (or one of whose metric keys) starts with one of names."""
    if not names:
        return workloads
    from benchmarks.profile import FULL

    chosen = [
        w
        for w in workloads
        if any(
            w.name.startswith(n) or any(m.key.startswith(n) for m in w.metrics(FULL)) for n in names
        )
    ]
    return chosen
