"""Copy-ups synced after their rename (cowfs/settling.py): the mark, its settling, and the repair
of what a host crash would leave.

A host crash cannot be had in a test; what it leaves can. A copy whose blocks never reached the
disk reads back as holes where the lower had bytes (delayed allocation: no block was allocated,
so none is on the disk). The tests make exactly that state in a real upper, with the marks a
mount leaves, punch the holes, and mount again: the holes are filled from the object, what a
user wrote stays, and the marks are gone. A daemon killed outright (the host still up) is real.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from cowfs import mounting
from cowfs.commit import commit_upper
from cowfs.errors import CowfsError
from cowfs.objects import FRAME_SIZE
from cowfs.rootfs import import_rootfs
from cowfs.settling import (
    MARK_PREFIX,
    PENDING_XATTR,
    Settler,
    boot_id,
    keeps_metadata_in_order,
)
from cowfs.store import Store
from tests.conftest import cowfs_mounted, ext4_mounted, need_fuse, need_root, unmount_or_kill

MiB = 1 << 20
BIG = 3 * MiB + 12345
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch(path: Path, offset: int, length: int) -> None:
    """Make [offset, offset+length) a hole, as blocks that never reached the disk read back."""
    fd = os.open(path, os.O_RDWR)
    try:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def lower_big() -> bytes:
    # Random (stored raw), with a run of zeros a frame long: a hole in the copy, on purpose.
    data = bytearray(random.Random(7).randbytes(BIG))
    data[FRAME_SIZE : 2 * FRAME_SIZE] = bytes(FRAME_SIZE)
    return bytes(data)


def lower_text() -> bytes:
    return b"".join(b"line %07d of a compressible file\n" % i for i in range(100_000))


@pytest.fixture
def image(tmp_path: Path) -> Store:
    need_root()
    need_fuse()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(lower_big())
    (tree / "text.txt").write_bytes(lower_text())
    (tree / "small.txt").write_bytes(b"small\n")
    store = Store(tmp_path / "store")
    import_rootfs(store, tree, "settle:1")
    return store


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """Where a test's upper and work dirs go: a journaled ext4, on which copies are marked."""
    with ext4_mounted(tmp_path / "ext4", journal=True) as fs:
        yield fs / "m"


def pending(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, PENDING_XATTR)
    except OSError:
        return None


def append(path: Path, data: bytes, *, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def wait_settled(path: Path) -> None:
    deadline = time.monotonic() + 30
    while pending(path) is not None:
        assert time.monotonic() < deadline, f"{path} is still marked after 30 s"
        time.sleep(0.02)


def test_a_copy_is_marked_then_settled_and_an_unmount_leaves_no_mark(
        image: Store, base: Path) -> None:  # fmt: skip
    with cowfs_mounted(image, "settle:1", base) as (mnt, _pid):
        append(mnt / "big.bin", b"!")
        copy = base / "upper" / "big.bin"
        marks = [n for n in os.listdir(base / "work") if n.startswith(MARK_PREFIX)]
        assert marks == [MARK_PREFIX + boot_id()]  # made before the first copy, kept while up
        wait_settled(copy)  # the thread syncs it and removes the mark, without an unmount
        assert (mnt / "big.bin").read_bytes() == lower_big() + b"!"
        append(mnt / "small.txt", b"more\n")
    assert os.listdir(base / "work") == []
    for name in ("big.bin", "small.txt"):
        assert pending(base / "upper" / name) is None
    assert (base / "upper" / "big.bin").read_bytes() == lower_big() + b"!"
    assert (base / "upper" / "small.txt").read_bytes() == b"small\nmore\n"


def test_an_fsync_returns_with_the_copy_settled(image: Store, base: Path) -> None:
    with cowfs_mounted(image, "settle:1", base) as (mnt, _pid):
        for name in ("big.bin", "text.txt"):
            fd = os.open(mnt / name, os.O_RDWR)  # the copy-up; its sync has just been queued
            try:
                os.pwrite(fd, b"fsynced", 5)
                os.fsync(fd)
                # An fsync that returned means: no repair will ever touch this file.
                assert pending(base / "upper" / name) is None
            finally:
                os.close(fd)
        assert (mnt / "big.bin").read_bytes()[:12] == lower_big()[:5] + b"fsynced"


def test_an_fsync_settles_a_copy_the_thread_has_not_got_to(image: Store, base: Path) -> None:
    """In process, with a settler whose thread never starts: the copy stays marked until the
    fsync, which must settle it before it returns."""
    upper, work = base / "upper", base / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    fs = mounting.build_image_fs(image, "settle:1", str(upper), str(work), False)
    try:
        fs._settler = Settler(fs._settle_failed, spawn=lambda function, args: None)
        fh, _ = fs.open("big.bin", os.O_RDWR)
        assert pending(upper / "big.bin") is not None  # marked, waiting
        fs.write(fh, b"fsynced", 5)
        fs.fsync(fh, True)
        assert pending(upper / "big.bin") is None
        fh2, _ = fs.open("text.txt", os.O_RDWR)
        assert pending(upper / "text.txt") is not None
        fs.release(fh2)
        fs.release(fh)
    finally:
        fs.close()  # settles the rest
    assert pending(upper / "text.txt") is None
    assert os.listdir(work) == []
    assert (upper / "big.bin").read_bytes()[:12] == lower_big()[:5] + b"fsynced"


def crashed_copy(image: Store, base: Path, *, boot: str) -> Path:
    """An upper as a host crash leaves it after a copy-up of big.bin and text.txt and a
    user's write into big.bin: the copies' marks and the work dir's on the disk, and the
    copies' blocks not, except the user's own write and the first frame of each copy."""
    with cowfs_mounted(image, "settle:1", base) as (mnt, _pid):
        fd = os.open(mnt / "big.bin", os.O_RDWR)
        try:
            os.pwrite(fd, b"USER WRITE", 3 * FRAME_SIZE + 100)
        finally:
            os.close(fd)
        append(mnt / "text.txt", b"appended\n")
    upper = base / "upper"
    for name, content in (("big.bin", lower_big()), ("text.txt", lower_text())):
        digest = xxhash.xxh128_hexdigest(content)  # objects are keyed by their content's xxh128
        os.setxattr(upper / name, PENDING_XATTR, digest.encode())
    (base / "work" / (MARK_PREFIX + boot)).mkdir()
    # What never reached the disk: everything but frame 0 of big.bin, except the user's page.
    punch(upper / "big.bin", FRAME_SIZE, 2 * FRAME_SIZE)
    # (whole blocks, as a crash leaves them: the file's last block to its end)
    punch(upper / "big.bin", 3 * FRAME_SIZE + 4096, -(-BIG // 4096) * 4096 - 3 * FRAME_SIZE - 4096)
    punch(upper / "text.txt", 0, 2 * FRAME_SIZE)
    return upper


def test_after_a_host_crash_the_mount_fills_the_copies_holes_from_their_objects(
        image: Store, base: Path) -> None:  # fmt: skip
    upper = crashed_copy(image, base, boot="00000000-0000-0000-0000-000000000000")
    with cowfs_mounted(image, "settle:1", base) as (mnt, _pid):
        want = bytearray(lower_big())
        want[3 * FRAME_SIZE + 100 : 3 * FRAME_SIZE + 110] = b"USER WRITE"
        assert (mnt / "big.bin").read_bytes() == bytes(want)
        assert (mnt / "text.txt").read_bytes() == lower_text() + b"appended\n"
        assert [n for n in os.listdir(base / "work") if n.startswith(MARK_PREFIX)] == []
        for name in ("big.bin", "text.txt"):
            assert pending(upper / name) is None
        # The lower's run of zeros was not written: it is still a hole.
        fd = os.open(upper / "big.bin", os.O_RDONLY)
        try:
            assert os.lseek(fd, FRAME_SIZE, os.SEEK_HOLE) == FRAME_SIZE
        finally:
            os.close(fd)


def test_after_the_daemon_alone_died_nothing_is_filled(image: Store, base: Path) -> None:
    """The same marks with this boot's id: the host's page cache had every byte, so a hole
    there is one the user made, and stays."""
    upper = crashed_copy(image, base, boot=boot_id())
    with cowfs_mounted(image, "settle:1", base) as (mnt, _pid):
        data = (mnt / "text.txt").read_bytes()
        assert data[: 2 * FRAME_SIZE] == bytes(2 * FRAME_SIZE)
        assert data[2 * FRAME_SIZE :] == (lower_text() + b"appended\n")[2 * FRAME_SIZE :]
        assert pending(upper / "text.txt") is None
        assert os.listdir(base / "work") == []


def test_a_repair_without_its_object_refuses_the_mount(image: Store, base: Path) -> None:
    upper = crashed_copy(image, base, boot="00000000-0000-0000-0000-000000000000")
    os.setxattr(upper / "big.bin", PENDING_XATTR, b"0" * 32)
    (base / "mnt").mkdir(exist_ok=True)
    with pytest.raises(CowfsError, match="repair"):
        mounting.mount(image, "settle:1", base / "mnt", upper, base / "work")
    assert not mounting.is_mounted(base / "mnt")


def test_a_daemon_killed_right_after_copy_ups_loses_nothing(image: Store, base: Path) -> None:
    names = ("big.bin", "text.txt", "small.txt")
    with cowfs_mounted(image, "settle:1", base) as (mnt, pid):
        for name in names:
            append(mnt / name, b"+")
        os.kill(pid, signal.SIGKILL)  # likely before the thread synced them all
        unmount_or_kill(mnt, pid)
    with cowfs_mounted(image, "settle:1", base) as (mnt, _pid):
        assert (mnt / "big.bin").read_bytes() == lower_big() + b"+"
        assert (mnt / "text.txt").read_bytes() == lower_text() + b"+"
        assert (mnt / "small.txt").read_bytes() == b"small\n+"
        for name in names:
            assert pending(base / "upper" / name) is None
        assert os.listdir(base / "work") == []


def test_a_volatile_mount_marks_nothing(image: Store, base: Path) -> None:
    for d in ("mnt", "upper", "work"):
        (base / d).mkdir(parents=True)
    pid = mounting.mount(image, "settle:1", base / "mnt", base / "upper", base / "work",
                         volatile=True)  # fmt: skip
    try:
        append(base / "mnt" / "big.bin", b"v")
        assert pending(base / "upper" / "big.bin") is None
        assert [n for n in os.listdir(base / "work") if n.startswith(MARK_PREFIX)] == []
    finally:
        unmount_or_kill(base / "mnt", pid)


def delayed(path: Path) -> bool:
    """Whether any block of `path` still waits for its allocation: data not yet on the disk
    (ext4's delayed allocation; `filefrag -v` flags such extents)."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert "found" in out
    return "delalloc" in out


def test_without_a_journal_copies_are_synced_before_their_rename(
        image: Store, tmp_path: Path) -> None:  # fmt: skip
    """ext4 without its journal writes metadata back in any order: a mark could reach the disk
    after the rename it guards. There a copy is on the disk before its rename, as overlayfs
    does it, and nothing is marked."""
    with ext4_mounted(tmp_path / "ext4", journal=False) as fs:
        base = fs / "m"
        with cowfs_mounted(image, "settle:1", base) as (mnt, _pid):
            fd = os.open(mnt / "big.bin", os.O_RDWR)  # the copy-up, and nothing written
            try:
                copy = base / "upper" / "big.bin"
                assert pending(copy) is None
                assert not delayed(copy)
                assert [n for n in os.listdir(base / "work") if n.startswith(MARK_PREFIX)] == []
            finally:
                os.close(fd)
            assert (mnt / "big.bin").read_bytes() == lower_big()


def test_which_filesystems_keep_their_metadata_in_order(tmp_path: Path) -> None:
    for journal in (True, False):
        with ext4_mounted(tmp_path / f"ext4-{journal}", journal=journal) as fs:
            fd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
            try:
                assert keeps_metadata_in_order(fd) is journal
            finally:
                os.close(fd)
    fd = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert not keeps_metadata_in_order(fd)  # not known to: taken not to
    finally:
        os.close(fd)


# -- the Settler alone ----------------------------------------------------------------------------


def test_the_settler_settles_more_copies_than_it_holds_fds_for(tmp_path: Path) -> None:
    need_root()  # trusted.* xattrs
    failures: list[tuple[int, OSError]] = []
    settler = Settler(lambda ino, exc: failures.append((ino, exc)))
    before = len(os.listdir("/proc/self/fd"))
    files = []
    for i in range(600):  # past MAX_WAITING: the rest are settled as they come
        p = tmp_path / f"f{i}"
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, b"x" * 100)
        os.setxattr(fd, PENDING_XATTR, b"d")
        settler.add(os.fstat(fd).st_ino, fd)
        files.append(p)
    settler.settle(os.stat(files[-1]).st_ino)
    assert pending(files[-1]) is None
    settler.close()
    assert failures == []
    assert [p for p in files if pending(p) is not None] == []
    assert len(os.listdir("/proc/self/fd")) == before
    assert not settler.waiting


def test_a_failed_settle_is_reported_and_keeps_nothing_open(tmp_path: Path) -> None:
    failures: list[tuple[int, OSError]] = []
    settler = Settler(lambda ino, exc: failures.append((ino, exc)))
    before = len(os.listdir("/proc/self/fd"))
    fd = os.open(tmp_path / "unmarked", os.O_RDWR | os.O_CREAT, 0o600)
    ino = os.fstat(fd).st_ino
    settler.add(ino, fd)  # no mark to remove: ENODATA
    settler.close()
    assert [i for i, _ in failures] == [ino]
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_marked_copy_is_not_read_past_its_repair(image: Store, base: Path) -> None:
    """A read-only mount and `commit --upper` read the upper without a work dir, so they cannot
    repair a copy a host crash may have cut short: they refuse it, with one line."""
    with cowfs_mounted(image, "settle:1", base) as (mnt, _pid):
        append(mnt / "big.bin", b"!")
    upper = base / "upper"
    os.setxattr(upper / "big.bin", PENDING_XATTR, xxhash.xxh128_hexdigest(lower_big()).encode())
    refused = r"/big.bin: a copy-up not yet synced"
    with pytest.raises(CowfsError, match=refused):
        mounting.mount(image, "settle:1", base / "mnt", upper, base / "work", True)
    assert not mounting.is_mounted(base / "mnt")
    with pytest.raises(CowfsError, match=refused):
        commit_upper(image, "settle:1", upper, "settle:2")
    assert "settle:2" not in image.tags()
    # A writable mount settles it (this boot's mark: nothing to repair); then both read it.
    (base / "work" / (MARK_PREFIX + boot_id())).mkdir()
    with cowfs_mounted(image, "settle:1", base):
        pass
    assert pending(upper / "big.bin") is None
    with cowfs_mounted(image, "settle:1", base, read_only=True) as (mnt, _pid):
        assert (mnt / "big.bin").read_bytes() == lower_big() + b"!"
    commit_upper(image, "settle:1", upper, "settle:2")
    assert "settle:2" in image.tags()
