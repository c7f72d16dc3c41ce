"""The filesystems under test, each able to give a fresh merged view of the same dataset.

Every measurement mounts a system afresh over the dataset's lower layers with an empty upper and
work dir, and unmounts it afterwards, so no system carries caches or upper-layer state from one
sample to the next. "native" is the merged tree itself on the host filesystem: the floor.

Options are left at each tool's defaults; what each mount ends up with is read back from
/proc/self/mounts and written into the report, so any option one system has and another lacks is
visible there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import proc
from benchmarks.dataset import IMAGE_TAG, Dataset
from cowfs.errors import MountError

MOUNT_TIMEOUT = 120.0  # seconds for a mount to go live (cowfs builds its index on first mount)


@dataclass
class View:
    """A mounted (or native) merged tree for one measurement."""

    system: System
    path: Path  # the merged root
    run_dir: Path  # this measurement's private scratch: upper, work, mountpoint
    shared_lowers: bool = False  # True for native: changes to lower files must be undone
    proc: subprocess.Popen | None = None  # a foreground daemon we started ourselves
    info: dict[str, str] = field(default_factory=dict)


def cowfs_command() -> list[str]:
    """The cowfs CLI of this installation (the venv's console script, else the module)."""
    script = Path(sys.executable).with_name("cowfs")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from cowfs.cli import main; main()"]


def cli_missing(command: str) -> str | None:
    """Why `cowfs COMMAND` cannot be used (not built yet), or None."""
    probe = subprocess.run([*cowfs_command(), command, "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`cowfs {command}` is not available: {probe.stderr.strip()[-120:]}"
    return None


def mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].replace("\\040", " ") == target for line in f)


def mount_options(path: Path) -> str:
    """fstype and options of the mount at path, as the kernel reports them."""
    target = str(path)
    found = ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, fstype, opts = line.split()[:4]
            if mnt.replace("\\040", " ") == target:
                found = f"{fstype} {opts}"
    return found


def _wait_mounted(path: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not mounted(path):
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise MountError(f"{path}: daemon exited with {proc.returncode}: {err[-200:]}")
        if time.monotonic() > deadline:
            raise MountError(f"{path}: not mounted after {MOUNT_TIMEOUT:.0f} s")
        time.sleep(0.005)


def _daemons_of(path: Path) -> list[int]:
    """Processes whose command line names this (unique, per-measurement) mountpoint."""
    needle = str(path).encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        quoted = b'"' + needle + b'"'  # cowfs daemons carry their spec as JSON
        if any(a == needle or a.endswith(b"=" + needle) or quoted in a for a in args):
            pids.append(int(entry.name))
    return pids


def reap(base: Path) -> None:
    """After a timed-out command: detach every mount under base and kill the daemons serving it.

    The daemons are found by base (a path unique to this benchmark run) in their command line and
    killed by pid, so nothing outside this run is touched.
    """
    base_s = str(base)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4].replace("\\040", " ") for line in f]
    for mnt in sorted(mounts, key=len, reverse=True):
        if mnt.startswith(base_s + "/"):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    needle = base_s.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle in f.read():
                    os.kill(int(entry.name), 9)
        except OSError:
            continue


def _wait_gone(pids: list[int], timeout: float = 60.0) -> None:
    """Wait for daemons to exit so one sample's flush never overlaps the next sample."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            try:  # reap it if it is our child; otherwise just poll
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.01)


def _run(cmd: list[str], what: str) -> None:
    proc.run(cmd, what, timeout=MOUNT_TIMEOUT, error=MountError)


def _fresh_dirs(run_dir: Path) -> tuple[Path, Path, Path]:
    upper, work, mnt = run_dir / "upper", run_dir / "work", run_dir / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    return upper, work, mnt


class System:
    name = ""
    label = ""
    kind = "fuse"  # "native", "kernel" or "fuse": how the report describes its cache handling

    def unavailable(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def prepare(self, ds: Dataset, data_dir: Path, log) -> None:  # noqa: B027 - optional hook
        """One-time set-up outside any timing (e.g. importing the dataset into a store)."""

    def mount(self, ds: Dataset, run_dir: Path) -> View:
        raise NotImplementedError

    def unmount(self, view: View) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """How this system is set up, for the report."""
        return ""


class Native(System):
    name = "native"
    label = "native"
    kind = "native"

    def mount(self, ds: Dataset, run_dir: Path) -> View:
        run_dir.mkdir(parents=True)
        return View(self, ds.tree, run_dir, shared_lowers=True)

    def unmount(self, view: View) -> None:
        pass

    def describe(self) -> str:
        return "the merged tree as a plain directory on the host filesystem (no union)"


class KernelOverlay(System):
    name = "overlayfs"
    label = "kernel overlayfs"
    kind = "kernel"

    def unavailable(self) -> str | None:
        with open("/proc/filesystems") as f:
            if "overlay" in f.read():
                return None
        probe = subprocess.run(["modprobe", "overlay"], capture_output=True)
        return None if probe.returncode == 0 else "kernel has no overlayfs"

    def mount(self, ds: Dataset, run_dir: Path) -> View:
        upper, work, mnt = _fresh_dirs(run_dir)
        opts = f"lowerdir={ds.lowerdir()},upperdir={upper},workdir={work}"
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], "overlayfs mount")
        return View(self, mnt, run_dir)

    def unmount(self, view: View) -> None:
        _run(["umount", str(view.path)], "overlayfs umount")

    def describe(self) -> str:
        return "`mount -t overlay` with the kernel's default options"


class FuseOverlayfs(System):
    name = "fuse-overlayfs"
    label = "fuse-overlayfs"

    def unavailable(self) -> str | None:
        if shutil.which("fuse-overlayfs") is None:
            return "fuse-overlayfs is not installed (Debian package fuse-overlayfs)"
        return None

    def mount(self, ds: Dataset, run_dir: Path) -> View:
        upper, work, mnt = _fresh_dirs(run_dir)
        opts = f"lowerdir={ds.lowerdir()},upperdir={upper},workdir={work}"
        # Foreground, so the daemon is our child and unmount can wait for it to exit.
        proc = subprocess.Popen(
            ["fuse-overlayfs", "-f", "-o", opts, str(mnt)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_mounted(mnt, proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return View(self, mnt, run_dir, proc=proc)

    def unmount(self, view: View) -> None:
        _run(["fusermount3", "-u", str(view.path)], "fuse-overlayfs umount")
        if view.proc is not None:
            try:
                view.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                view.proc.kill()
                view.proc.wait()
            if view.proc.stderr:
                view.proc.stderr.close()

    def describe(self) -> str:
        return (
            "`fuse-overlayfs -f -o lowerdir=…,upperdir=…,workdir=…`, nothing else: its own "
            "defaults (libfuse multi-threaded loop, its default cache timeouts)"
        )


class CowfsDirs(System):
    """cowfs over the same plain-directory lowers as overlayfs (mount -t fuse.cowfs)."""

    name = "cowfs-dirs"
    label = "cowfs (dir lowers)"

    def unavailable(self) -> str | None:
        if not os.path.exists("/sbin/mount.fuse.cowfs"):
            return "/sbin/mount.fuse.cowfs is not installed (make setup)"
        return None

    def mount(self, ds: Dataset, run_dir: Path) -> View:
        upper, work, mnt = _fresh_dirs(run_dir)
        opts = f"lowerdir={ds.lowerdir()},upperdir={upper},workdir={work}"
        _run(["mount", "-t", "fuse.cowfs", "cowfs", "-o", opts, str(mnt)], "cowfs mount")
        _wait_mounted(mnt)
        return View(self, mnt, run_dir)

    def unmount(self, view: View) -> None:
        daemons = _daemons_of(view.path)
        _run([*cowfs_command(), "umount", str(view.path)], "cowfs umount")
        _wait_gone(daemons)

    def describe(self) -> str:
        return (
            "`mount -t fuse.cowfs cowfs MNT -o lowerdir=…,upperdir=…,workdir=…`; "
            + cowfs_fuse_options()
        )


class CowfsStore(System):
    """cowfs the normal way: the dataset imported as an image, mounted from the store."""

    name = "cowfs"
    label = "cowfs (store)"
    ref = f"{IMAGE_TAG}:latest"

    def __init__(self) -> None:
        self.store_root: Path | None = None

    def unavailable(self) -> str | None:
        return cli_missing("mount")

    def prepare(self, ds: Dataset, data_dir: Path, log) -> None:
        self.store_root = ds.root / "store"
        # The store is imported by the cowfs that is measured (the pinned copy, see pin.py), and
        # again whenever that changes: a store written by other code might not even mount.
        code = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or "working tree"
        marker = self.store_root / "bench-imported"
        if marker.exists() and marker.read_text() == code:
            return
        log(f"importing the dataset into a cowfs store with {code}")
        if self.store_root.exists():
            shutil.rmtree(self.store_root)
        cmd = [*self.cli(), "image", "import", f"{ds.oci}:{IMAGE_TAG}", self.ref]
        proc.run(cmd, "cowfs image import", timeout=3600, error=MountError)
        marker.write_text(code)

    def cli(self) -> list[str]:
        return [*cowfs_command(), "--root", str(self.store_root)]

    def mount(self, ds: Dataset, run_dir: Path) -> View:
        upper, work, mnt = _fresh_dirs(run_dir)
        cmd = [*self.cli(), "mount", self.ref, str(mnt), "--upper", str(upper), "--work", str(work)]
        _run(cmd, "cowfs mount")
        _wait_mounted(mnt)
        return View(self, mnt, run_dir)

    def unmount(self, view: View) -> None:
        daemons = _daemons_of(view.path)
        _run([*self.cli(), "umount", str(view.path)], "cowfs umount")
        _wait_gone(daemons)

    def describe(self) -> str:
        return (
            "`cowfs mount bench:latest MNT --upper U --work W` (layers imported into the cowfs "
            "store from the same OCI layout); " + cowfs_fuse_options()
        )


class CowfsTuned(CowfsStore):
    """cowfs (store) with a FUSE setting the CLI does not expose: for deciding the defaults.

    Not in the default set; pick with `cowfs bench --system cowfs --system cowfs-threads`.
    """

    def __init__(self, name: str, label: str, **settings: bool) -> None:
        super().__init__()
        self.name = name
        self.label = label
        self.settings = settings

    def unavailable(self) -> str | None:
        try:
            from cowfs import mounting  # noqa: F401
        except ImportError as exc:
            return f"cowfs.mounting is not importable: {exc}"
        return None

    def mount(self, ds: Dataset, run_dir: Path) -> View:
        from cowfs import mounting
        from cowfs.store import Store

        upper, work, mnt = _fresh_dirs(run_dir)
        assert self.store_root is not None
        mounting.mount(Store(self.store_root), self.ref, mnt, upper, work, **self.settings)
        _wait_mounted(mnt)
        return View(self, mnt, run_dir)

    def unmount(self, view: View) -> None:
        from cowfs import mounting

        mounting.umount(view.path)

    def describe(self) -> str:
        changed = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"as cowfs (store), mounted through cowfs.mounting.mount with {changed}"


def cowfs_fuse_options() -> str:
    """The FUSE settings cowfs gives itself (not visible in /proc/mounts), read from the code."""
    try:
        import inspect

        from cowfs import fuse, mounting

        params = inspect.signature(mounting.mount).parameters
        threads = params["threads"].default if "threads" in params else "?"
        writeback = params["writeback"].default if "writeback" in params else "?"
        timeout = f"{fuse.CACHE_TIMEOUT:.0f} s"
        engine = fuse.engine(threads is True)
    except (ImportError, AttributeError, KeyError) as exc:
        return f"(FUSE settings unknown: {exc})"
    # Whether the kernel granted passthrough is what the daemon recorded: the options column.
    passthrough = "passthrough for upper files if granted, " if engine == "native" else ""
    return (
        f"FUSE settings from cowfs/fuse.py: {engine} engine, entry/attr/negative timeouts "
        f"{timeout}, use_ino, keep_cache on lower files, readdirplus, 1 MiB readahead; "
        f"{passthrough}threads={threads}, writeback cache={writeback} (mounting.mount defaults)"
    )


class CowfsEngine(CowfsTuned):
    """cowfs (store) served by one FUSE engine ($COWFS_FUSE_ENGINE of the daemon): for
    comparing the engines in one interleaved run."""

    def __init__(self, engine: str) -> None:
        super().__init__(f"cowfs-{engine}", f"cowfs ({engine})")
        self.engine = engine

    def mount(self, ds: Dataset, run_dir: Path) -> View:
        old = os.environ.get("COWFS_FUSE_ENGINE")
        os.environ["COWFS_FUSE_ENGINE"] = self.engine  # the daemon inherits it
        try:
            return super().mount(ds, run_dir)
        finally:
            if old is None:
                del os.environ["COWFS_FUSE_ENGINE"]
            else:
                os.environ["COWFS_FUSE_ENGINE"] = old

    def describe(self) -> str:
        return f"as cowfs (store), served by the {self.engine} FUSE engine (COWFS_FUSE_ENGINE)"


def all_systems() -> list[System]:
    """The systems every run compares."""
    return [Native(), KernelOverlay(), FuseOverlayfs(), CowfsStore(), CowfsDirs()]


def variant_systems() -> list[System]:
    """cowfs with other FUSE settings, only when asked for by name (--system)."""
    return [
        CowfsTuned("cowfs-threads", "cowfs (threads)", threads=True),
        CowfsTuned("cowfs-writeback", "cowfs (writeback)", writeback=True),
        CowfsEngine("native"),
        CowfsEngine("libfuse"),
    ]


def release(view: View) -> None:
    """Unmount a view whatever state it is in; used on the error path."""
    try:
        if mounted(view.path) or view.proc is not None:
            view.system.unmount(view)
    except Exception:
        subprocess.run(["umount", "-l", str(view.path)], capture_output=True)
        if view.proc is not None and view.proc.poll() is None:
            view.proc.kill()
            view.proc.wait()
