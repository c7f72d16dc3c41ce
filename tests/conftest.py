"""Shared test fixtures.

Tests that need root, /dev/fuse or a Debian tool call `need(...)`: outside CI a missing part
skips the test with the reason; under CI=true it fails, because CI's own set-up must provide it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, why: str) -> None:
    """Skip (or under CI, fail) when a precondition of the test is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing under CI: {why}")
    pytest.skip(why)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")


def need_fuse() -> None:
    need_root()
    need(os.path.exists("/dev/fuse"), "needs /dev/fuse")
    need(shutil.which("fusermount3") is not None, "needs fuse3 (fusermount3)")


def need_tool(*names: str) -> None:
    for name in names:
        need(shutil.which(name) is not None, f"needs {name} (Debian package)")


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    """A fresh, empty cowfs store root."""
    root = tmp_path / "store"
    root.mkdir()
    return root


def _mounted_under(base: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == str(base) or mnt.startswith(str(base) + "/"):
                out.append(mnt)
    return out


@pytest.fixture(autouse=True)
def _no_leaked_mounts(tmp_path: Path) -> Iterator[None]:
    """Unmount anything a test left mounted under its tmp_path, even when the test failed."""
    yield
    for mnt in sorted(_mounted_under(tmp_path), key=len, reverse=True):
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        subprocess.run(["umount", "-l", mnt], capture_output=True)


@pytest.fixture(scope="session")
def busybox_rootfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root filesystem made of Debian's static busybox and its applet symlinks (built once)."""
    need(os.path.isfile("/bin/busybox"), "needs busybox-static")
    from cowfs.rootfs import busybox_rootfs

    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    busybox_rootfs(root)
    return root


@pytest.fixture
def busybox_image(store_root: Path, busybox_rootfs_dir: Path) -> tuple[Path, str]:
    """(store root, "busybox:latest"): a fresh store holding a one-layer busybox image."""
    from cowfs.rootfs import import_rootfs
    from cowfs.store import Store

    import_rootfs(Store(store_root), busybox_rootfs_dir, "busybox:latest")
    return store_root, "busybox:latest"


@contextlib.contextmanager
def cowfs_mounted(store: Any, ref: str, base: Path, *, threads: bool = False,
                  read_only: bool = False) -> Iterator[tuple[Path, int]]:  # fmt: skip
    """Mount image `ref` of `store` at base/mnt with upper base/upper and work base/work (kept
    across mounts, so a test can remount); yields (mountpoint, daemon pid). On the way out the
    mount is unmounted, or, if its daemon died or hangs, detached and the daemon killed by pid."""
    from cowfs import mounting

    mnt, upper, work = base / "mnt", base / "upper", base / "work"
    for d in (mnt, upper, work):
        d.mkdir(parents=True, exist_ok=True)
    pid = mounting.mount(store, ref, mnt, upper, work, read_only, threads=threads)
    try:
        yield mnt, pid
    finally:
        unmount_or_kill(mnt, pid)


def unmount_or_kill(mnt: Path, pid: int) -> None:
    """Unmount `mnt` served by daemon `pid`; a dead or stuck daemon is killed and the mount
    detached (fusermount3 -u -z), so that no test leaves a mount or a process behind."""
    from cowfs import mounting

    alive = True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        alive = False
    if alive and mounting.is_mounted(mnt):
        try:
            subprocess.run([sys.executable, "-c", "import sys; from cowfs import mounting; "
                            "mounting.umount(sys.argv[1])", str(mnt)],
                           timeout=60, capture_output=True)  # fmt: skip
        except subprocess.TimeoutExpired:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if mounting.is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    proc = mounting._DAEMONS.pop(pid, None)
    if proc is not None:
        proc.wait()
    # A killed daemon could not remove its pid file.
    pidfile = Path(mounting._pidfile(str(mnt)))
    try:
        if json.loads(pidfile.read_text()).get("pid") == pid:
            pidfile.unlink()
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def ext4_mounted(base: Path, *, journal: bool, mib: int = 64) -> Iterator[Path]:
    """A fresh ext4 filesystem of `mib` MiB, with or without its journal, loop-mounted at
    base/fs for the test (an image file under base); unmounted on the way out."""
    need_root()
    need_tool("mkfs.ext4", "losetup")
    need(os.path.exists("/dev/loop-control"), "needs loop devices")
    image, mnt = base / "ext4.img", base / "fs"
    mnt.mkdir(parents=True)
    with open(image, "wb") as f:
        f.truncate(mib << 20)
    features = [] if journal else ["-O", "^has_journal"]
    subprocess.run(["mkfs.ext4", "-q", "-F", *features, str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for inner in sorted(_mounted_under(mnt), key=len, reverse=True)[:-1]:  # a failed test's
            subprocess.run(["fusermount3", "-u", "-z", inner], capture_output=True)
        subprocess.run(["umount", str(mnt)], check=True)  # the loop device goes with it
