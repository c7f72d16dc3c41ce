"""The union filesystem's semantics, one test per item of DESIGN.md, through real FUSE mounts.

Lowers are plain directories in kernel-overlayfs format (DESIGN decision 6), so every test sees
exactly what it built. The `union` fixture always unmounts, even when the test fails.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cowfs import mounting
from cowfs.errors import CowfsError, MountError
from tests.conftest import need_fuse, need_tool

OPAQUE = "trusted.overlay.opaque"


@dataclass
class Union:
    base: Path
    lowers: list[Path]  # top first, like lowerdir=
    upper: Path
    work: Path
    mnt: Path

    def m(self, rel: str) -> str:
        return str(self.mnt / rel)

    def u(self, rel: str) -> str:
        return str(self.upper / rel)

    def mount(self, *, read_only: bool = False) -> None:
        mounting.mount_dirs([str(d) for d in self.lowers], self.mnt,
                           None if read_only else self.upper,
                           None if read_only else self.work)  # fmt: skip

    def umount(self) -> None:
        if mounting.is_mounted(self.mnt):
            mounting.umount(self.mnt)

    def remount(self) -> None:
        self.umount()
        self.mount()


def _build_lowers(base: Path) -> list[Path]:
    """bottom l1 and top l2; l2 holds a whiteout and an opaque dir, overlayfs style."""
    l1, l2 = base / "l1", base / "l2"
    for p in ("d/sub", "gone", "opq", "empty-ish", "big"):
        (l1 / p).mkdir(parents=True)
    (l1 / "d/a").write_text("lower a\n")
    (l1 / "d/sub/deep").write_text("deep\n")
    (l1 / "gone/x").write_text("x")
    (l1 / "opq/hidden").write_text("hidden")
    (l1 / "empty-ish/w1").write_text("1")
    (l1 / "ro").write_text("read only\n")
    os.chmod(l1 / "ro", 0o444)
    (l1 / "none").write_text("no perms\n")
    os.chmod(l1 / "none", 0o000)
    (l1 / "h1").write_text("linked\n")
    os.link(l1 / "h1", l1 / "d/h2")
    os.symlink("d/a", l1 / "sym")
    os.setxattr(l1 / "d/a", "user.color", b"blue")
    os.setxattr(l1 / "d/a", "trusted.t", b"tv")
    os.chown(l1 / "d/a", 1234, 5678)
    os.utime(l1 / "d/a", ns=(1_000_000_000_123, 2_000_000_000_456))
    with open(l1 / "big/sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    os.mkfifo(l1 / "fifo")
    os.mknod(l1 / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    l2.mkdir()
    (l2 / "d").mkdir()
    (l2 / "d/b").write_text("upper b\n")
    (l2 / "opq").mkdir()
    os.setxattr(l2 / "opq", OPAQUE, b"y")
    (l2 / "opq/visible").write_text("v")
    os.mknod(l2 / "gone", stat.S_IFCHR, 0)  # whiteout of l1's gone/
    (l2 / "empty-ish").mkdir()
    os.mknod(l2 / "empty-ish/w1", stat.S_IFCHR, 0)
    return [l2, l1]


@pytest.fixture(params=["native", "libfuse"])
def union(tmp_path: Path, request: pytest.FixtureRequest,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Union]:  # fmt: skip
    """Every test runs on both FUSE engines (cowfs.fuse.engine; the daemon inherits the env)."""
    need_fuse()
    monkeypatch.setenv("COWFS_FUSE_ENGINE", request.param)
    base = tmp_path / "u"
    base.mkdir()
    u = Union(base, _build_lowers(base), base / "upper", base / "work", base / "mnt")
    for p in (u.upper, u.work, u.mnt):
        p.mkdir()
    u.mount()
    try:
        yield u
    finally:
        if mounting.is_mounted(u.mnt):
            try:
                mounting.umount(u.mnt)
            except Exception:
                mounting.umount(u.mnt, lazy=True)


def read(path: str) -> str:
    return Path(path).read_text()


def is_whiteout(path: str) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def lower_untouched(u: Union) -> None:
    assert (u.lowers[1] / "d/a").read_text() == "lower a\n"
    assert (u.lowers[1] / "h1").read_text() == "linked\n"


# -- lookup and readdir ---------------------------------------------------------------------------


def test_merged_readdir_applies_whiteouts_and_opaque_dirs(union: Union) -> None:
    assert sorted(os.listdir(union.m(""))) == [
        "big", "d", "empty-ish", "fifo", "h1", "none", "null", "opq", "ro", "sym",
    ]  # fmt: skip
    assert sorted(os.listdir(union.m("d"))) == ["a", "b", "h2", "sub"]
    assert os.listdir(union.m("opq")) == ["visible"]
    assert os.listdir(union.m("empty-ish")) == []
    assert not os.path.exists(union.m("gone"))


def test_readdir_is_deterministic_with_dot_entries_and_d_ino(union: Union) -> None:
    first = os.listdir(union.m("d"))
    union.remount()
    assert os.listdir(union.m("d")) == first == sorted(first)
    out = subprocess.run(["ls", "-a", "-1", "-f", union.m("d")], capture_output=True, text=True)
    assert out.stdout.split()[:2] == [".", ".."]
    with os.scandir(union.m("d")) as it:
        for e in it:
            assert e.inode() == os.lstat(e.path).st_ino


# -- copy-up --------------------------------------------------------------------------------------


def test_copy_up_on_write_keeps_metadata_and_leaves_lower_alone(union: Union) -> None:
    before = os.lstat(union.m("d/a"))
    with open(union.m("d/a"), "a") as f:
        f.write("more\n")
    assert read(union.m("d/a")) == "lower a\nmore\n"
    up = os.lstat(union.u("d/a"))
    assert (up.st_uid, up.st_gid, stat.S_IMODE(up.st_mode)) == (1234, 5678, 0o644)
    assert os.getxattr(union.u("d/a"), "user.color") == b"blue"
    assert os.getxattr(union.u("d/a"), "trusted.t") == b"tv"
    assert os.lstat(union.m("d/a")).st_ino == before.st_ino
    lower_untouched(union)


@pytest.mark.parametrize("change", ["truncate", "chmod", "chown", "utime", "setxattr",
                                    "removexattr", "link"])  # fmt: skip
def test_every_kind_of_change_copies_up(union: Union, change: str) -> None:
    path = union.m("d/a")
    if change == "truncate":
        os.truncate(path, 3)
    elif change == "chmod":
        os.chmod(path, 0o600)
    elif change == "chown":
        os.chown(path, 42, 43)
    elif change == "utime":
        os.utime(path, ns=(5, 6_000_000_007))
    elif change == "setxattr":
        os.setxattr(path, "user.new", b"1")
    elif change == "removexattr":
        os.removexattr(path, "user.color")
    elif change == "link":
        os.link(path, union.m("d/a-link"))
    assert os.path.isfile(union.u("d/a")) and not is_whiteout(union.u("d/a"))
    st = os.lstat(union.u("d/a"))
    if change == "truncate":
        assert read(path) == "low"
    if change == "chmod":
        assert stat.S_IMODE(st.st_mode) == 0o600
    if change == "chown":
        assert (st.st_uid, st.st_gid) == (42, 43)
    if change == "utime":
        assert st.st_mtime_ns == 6_000_000_007
    elif change != "truncate":
        assert st.st_mtime_ns == 2_000_000_000_456  # times survive the copy
    if change == "link":
        assert os.path.samefile(union.u("d/a"), union.u("d/a-link"))
        assert os.lstat(path).st_nlink == 2
    lower_untouched(union)


def test_copy_up_keeps_sparse_holes_and_copies_parents_first(union: Union) -> None:
    lower_dir = os.lstat(union.lowers[1] / "big")
    with open(union.m("big/sparse"), "r+b") as f:
        f.seek(0)
        f.write(b"head")
    st = os.lstat(union.u("big/sparse"))
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20  # holes kept: nowhere near 64 MiB allocated
    with open(union.m("big/sparse"), "rb") as f:
        f.seek(32 << 20)
        assert f.read(6) == b"middle"
    up_dir = os.lstat(union.u("big"))
    assert up_dir.st_mtime_ns == lower_dir.st_mtime_ns
    assert stat.S_IMODE(up_dir.st_mode) == stat.S_IMODE(lower_dir.st_mode)


def test_copy_up_of_0444_and_0000_files(union: Union) -> None:
    with open(union.m("ro"), "a") as f:
        f.write("root may\n")
    with open(union.m("none"), "a") as f:
        f.write("root may\n")
    assert stat.S_IMODE(os.lstat(union.m("none")).st_mode) == 0
    assert read(union.u("none")) == "no perms\nroot may\n"
    assert stat.S_IMODE(os.lstat(union.u("ro")).st_mode) == 0o444


def test_no_leftovers_in_the_work_dir(union: Union) -> None:
    for name in ("d/a", "ro", "d/sub/deep"):
        with open(union.m(name), "a") as f:
            f.write("x")
    os.rename(union.m("d"), union.m("d2"))
    assert os.listdir(union.work) == []


# -- whiteouts and opaque dirs --------------------------------------------------------------------


def test_unlink_and_rmdir_of_lower_entries_leave_whiteouts(union: Union) -> None:
    os.unlink(union.m("d/a"))
    os.unlink(union.m("d/sub/deep"))
    os.rmdir(union.m("d/sub"))
    assert sorted(os.listdir(union.m("d"))) == ["b", "h2"]
    assert is_whiteout(union.u("d/a")) and is_whiteout(union.u("d/sub"))
    union.remount()
    assert sorted(os.listdir(union.m("d"))) == ["b", "h2"]


def test_unlink_of_a_copied_up_file_replaces_it_by_a_whiteout(union: Union) -> None:
    with open(union.m("d/a"), "a") as f:
        f.write("x")
    os.unlink(union.m("d/a"))
    assert is_whiteout(union.u("d/a"))
    assert not os.path.exists(union.m("d/a"))


def test_mkdir_over_a_whiteout_is_opaque(union: Union) -> None:
    shutil.rmtree(union.m("d"))
    os.mkdir(union.m("d"))
    assert os.listdir(union.m("d")) == []
    assert os.getxattr(union.u("d"), OPAQUE) == b"y"
    assert OPAQUE not in os.listxattr(union.m("d"))
    union.remount()
    assert os.listdir(union.m("d")) == []


def test_rmdir_of_a_dir_that_only_looks_empty(union: Union) -> None:
    os.rmdir(union.m("empty-ish"))  # its only lower child is whited out in l2
    assert not os.path.exists(union.m("empty-ish"))
    assert is_whiteout(union.u("empty-ish"))
    os.mkdir(union.m("d/new"))
    (Path(union.m("d/new/f"))).write_text("1")
    os.unlink(union.m("d/new/f"))
    os.rmdir(union.m("d/new"))
    assert not os.path.lexists(union.u("d/new"))


def test_rmdir_of_a_non_empty_merged_dir_fails(union: Union) -> None:
    with pytest.raises(OSError) as exc:
        os.rmdir(union.m("d"))
    assert exc.value.errno == errno.ENOTEMPTY


# -- rename ---------------------------------------------------------------------------------------


def test_rename_lower_file_and_merged_dir_without_exdev(union: Union) -> None:
    os.rename(union.m("d/a"), union.m("a-moved"))
    assert read(union.m("a-moved")) == "lower a\n"
    assert not os.path.exists(union.m("d/a")) and is_whiteout(union.u("d/a"))
    os.rename(union.m("d"), union.m("d-moved"))  # merged: parts in l1, l2 and the upper
    assert sorted(os.listdir(union.m("d-moved"))) == ["b", "h2", "sub"]
    assert read(union.m("d-moved/sub/deep")) == "deep\n"
    assert not os.path.exists(union.m("d"))
    union.remount()
    assert sorted(os.listdir(union.m("d-moved"))) == ["b", "h2", "sub"]
    assert not os.path.exists(union.m("d"))
    lower_untouched(union)


def test_rename_a_dir_onto_a_lower_dir_name_hides_the_old_content(union: Union) -> None:
    os.mkdir(union.m("newdir"))
    (Path(union.m("newdir/only"))).write_text("1")
    shutil.rmtree(union.m("opq"))
    os.rename(union.m("newdir"), union.m("opq"))
    assert os.listdir(union.m("opq")) == ["only"]
    union.remount()
    assert os.listdir(union.m("opq")) == ["only"]


def test_rename_follows_posix_rules(union: Union) -> None:
    def code(a: str, b: str) -> int:
        try:
            os.rename(union.m(a), union.m(b))
        except OSError as exc:
            return exc.errno
        return 0

    assert code("d/a", "d/sub") == errno.EISDIR
    assert code("d/sub", "d/a") == errno.ENOTDIR
    assert code("big", "d") == errno.ENOTEMPTY
    assert code("d", "d/sub/inside") == errno.EINVAL
    assert code("nothing", "x") == errno.ENOENT
    assert code("d/a", "d/a") == 0
    assert code("h1", "d/h2") == 0  # two links of one file: nothing happens
    assert os.path.exists(union.m("h1")) and os.path.exists(union.m("d/h2"))
    os.mkdir(union.m("emptydir"))
    assert code("big", "emptydir") == 0
    assert os.path.isfile(union.m("emptydir/sparse"))
    assert code("d/a", "ro") == 0
    assert read(union.m("ro")) == "lower a\n"


def test_rename_exchange_swaps_lower_and_upper_names(union: Union) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def exchange(a: str, b: str) -> None:
        if libc.renameat2(-100, union.m(a).encode(), -100, union.m(b).encode(), 2) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    exchange("d/a", "d/b")  # lower file <-> file of the top lower
    assert (read(union.m("d/a")), read(union.m("d/b"))) == ("upper b\n", "lower a\n")
    exchange("d", "opq")  # merged dir <-> opaque dir
    assert sorted(os.listdir(union.m("opq"))) == ["a", "b", "h2", "sub"]
    assert os.listdir(union.m("d")) == ["visible"]
    union.remount()
    assert sorted(os.listdir(union.m("opq"))) == ["a", "b", "h2", "sub"]
    assert os.listdir(union.m("d")) == ["visible"]
    assert read(union.m("opq/b")) == "lower a\n"


# -- hard links and inode numbers -----------------------------------------------------------------


def test_lower_hard_links_are_one_inode_and_stay_linked_after_copy_up(union: Union) -> None:
    a, b = os.lstat(union.m("h1")), os.lstat(union.m("d/h2"))
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    with open(union.m("h1"), "a") as f:
        f.write("changed\n")
    assert read(union.m("d/h2")) == "linked\nchanged\n"
    assert os.path.samefile(union.u("h1"), union.u("d/h2"))
    assert os.lstat(union.m("d/h2")).st_ino == a.st_ino
    os.link(union.m("d/h2"), union.m("h3"))
    assert os.lstat(union.m("h1")).st_nlink == 3
    os.unlink(union.m("h3"))
    os.unlink(union.m("d/h2"))
    assert os.lstat(union.m("h1")).st_nlink == 1


def test_names_of_a_linked_file_agree_with_a_handle_opened_before_the_link(union: Union) -> None:
    """One inode under two names, as in kernel overlayfs: a write through a handle opened
    before `ln` (passed through to the host file, where the kernel grants it) is what the new
    name reads and stats at once, through a handle opened after, and through its mapping."""
    with open(union.m("new"), "w") as f:
        f.write("aaaa")
    before = os.open(union.m("new"), os.O_RDWR)
    try:
        os.link(union.m("new"), union.m("alias"))
        after = os.open(union.m("alias"), os.O_RDWR)
        try:
            assert os.pread(after, 100, 0) == b"aaaa"
            assert os.fstat(after).st_size == 4
            os.pwrite(before, b"bbbbcc", 0)
            assert os.pread(after, 100, 0) == b"bbbbcc"
            assert os.fstat(after).st_size == os.stat(union.m("alias")).st_size == 6
            with mmap.mmap(after, 6) as view:
                assert view[:] == b"bbbbcc"
            os.pwrite(after, b"X", 0)
            assert os.pread(before, 100, 0) == b"Xbbbcc"
        finally:
            os.close(after)
    finally:
        os.close(before)
    assert read(union.m("new")) == read(union.m("alias")) == "Xbbbcc"


def test_unlinking_one_lower_alias_updates_nlink(union: Union) -> None:
    os.unlink(union.m("d/h2"))
    assert os.lstat(union.m("h1")).st_nlink == 1


def test_directory_nlink(union: Union) -> None:
    assert os.lstat(union.m("d")).st_nlink == 3  # ., .. and sub
    os.mkdir(union.m("d/more"))
    assert os.lstat(union.m("d")).st_nlink == 4
    os.rmdir(union.m("d/sub")) if False else shutil.rmtree(union.m("d/sub"))
    assert os.lstat(union.m("d")).st_nlink == 3


def test_st_ino_is_stable_across_copy_up_and_remount(union: Union) -> None:
    names = ["d", "d/a", "d/b", "sym", "h1", "d/sub/deep"]
    before = {n: os.lstat(union.m(n)).st_ino for n in names}
    with open(union.m("d/sub/deep"), "a") as f:
        f.write("x")
    os.chmod(union.m("sym"), 0o755)  # follows the link: copies up d/a
    (Path(union.m("fresh"))).write_text("new")
    fresh = os.lstat(union.m("fresh")).st_ino
    assert {n: os.lstat(union.m(n)).st_ino for n in names} == before
    union.remount()
    assert {n: os.lstat(union.m(n)).st_ino for n in names} == before
    assert os.lstat(union.m("fresh")).st_ino == fresh


# -- special files and xattrs ---------------------------------------------------------------------


def test_symlinks_fifos_sockets_and_devices(union: Union) -> None:
    assert os.readlink(union.m("sym")) == "d/a"
    assert read(union.m("sym")) == "lower a\n"
    assert stat.S_ISFIFO(os.lstat(union.m("fifo")).st_mode)
    assert os.lstat(union.m("null")).st_rdev == os.makedev(1, 3)
    os.symlink("../target", union.m("d/newlink"))
    assert os.readlink(union.m("d/newlink")) == "../target"
    os.mkfifo(union.m("d/newfifo"))
    os.mknod(union.m("d/blk"), stat.S_IFBLK | 0o600, os.makedev(7, 0))
    assert os.lstat(union.m("d/blk")).st_rdev == os.makedev(7, 0)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(union.m("d/sock"))
        assert stat.S_ISSOCK(os.lstat(union.m("d/sock")).st_mode)
    finally:
        sock.close()
    with open(union.m("null"), "w") as f:  # a device node is the device, not a file
        f.write("discarded")
    assert stat.S_ISFIFO(os.lstat(union.u("d/newfifo")).st_mode)
    union.remount()
    assert os.readlink(union.m("d/newlink")) == "../target"


def test_xattrs_in_every_namespace(union: Union) -> None:
    assert os.getxattr(union.m("d/a"), "user.color") == b"blue"
    assert set(os.listxattr(union.m("d/a"))) == {"user.color", "trusted.t"}
    for name in ("user.k", "trusted.k", "security.k"):
        os.setxattr(union.m("d/b"), name, b"v-" + name.encode())
        assert os.getxattr(union.m("d/b"), name) == b"v-" + name.encode()
    os.removexattr(union.m("d/b"), "user.k")
    with pytest.raises(OSError) as exc:
        os.getxattr(union.m("d/b"), "user.k")
    assert exc.value.errno == errno.ENODATA
    # As overlayfs does, a user's trusted.overlay.* is stored escaped: it cannot make a dir opaque.
    os.setxattr(union.m("d"), OPAQUE, b"y")
    assert os.getxattr(union.m("d"), OPAQUE) == b"y"
    assert sorted(os.listdir(union.m("d"))) == ["a", "b", "h2", "sub"]
    assert os.getxattr(union.u("d"), "trusted.overlay.overlay.opaque") == b"y"
    with pytest.raises(OSError) as exc:
        os.setxattr(union.m("d/b"), "trusted.cowfs.origin", b"1")
    assert exc.value.errno == errno.EPERM


# -- open files, sync, statfs, mmap ---------------------------------------------------------------


def test_open_then_unlinked_files_keep_working(union: Union) -> None:
    with open(union.m("d/a"), "r+") as f:
        os.unlink(union.m("d/a"))
        f.seek(0, os.SEEK_END)
        f.write("after unlink\n")
        f.flush()
        f.seek(0)
        assert f.read() == "lower a\nafter unlink\n"
        assert os.fstat(f.fileno()).st_size == len("lower a\nafter unlink\n")
        os.fchmod(f.fileno(), 0o600)
        assert stat.S_IMODE(os.fstat(f.fileno()).st_mode) == 0o600
        assert not any(n.startswith(".fuse_hidden") for n in os.listdir(union.m("d")))
    with open(union.m("d/sub/deep")) as f:
        os.unlink(union.m("d/sub/deep"))
        assert f.read() == "deep\n"
    assert not os.path.exists(union.m("d/a"))
    assert sorted(os.listdir(union.upper / "d")) == ["a", "sub"]  # a: whiteout
    assert sorted(os.listdir(union.work)) == []


def test_rename_over_an_open_file_keeps_it_readable(union: Union) -> None:
    with open(union.m("d/b")) as f:
        os.rename(union.m("d/a"), union.m("d/b"))
        assert f.read() == "upper b\n"
        assert os.fstat(f.fileno()).st_size == len("upper b\n")
    assert read(union.m("d/b")) == "lower a\n"
    assert sorted(os.listdir(union.m("d"))) == ["b", "h2", "sub"]
    assert sorted(os.listdir(union.upper / "d")) == ["a", "b"]  # a: whiteout, b: the file


def test_fsync_statfs_and_mmap(union: Union) -> None:
    fd = os.open(union.m("d/new"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"\0" * 8192)
        os.fsync(fd)
        os.fdatasync(fd)
        with mmap.mmap(fd, 8192) as mm:
            mm[100:105] = b"hello"
            mm.flush()
    finally:
        os.close(fd)
    assert Path(union.u("d/new")).read_bytes()[100:105] == b"hello"
    with open(union.m("d/a"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:7] == b"lower a"
    sv = os.statvfs(union.m(""))
    assert sv.f_namemax == 255 and sv.f_blocks > 0


# -- errors and limits ----------------------------------------------------------------------------


def test_posix_errors(union: Union) -> None:
    def code(fn, *args) -> int:  # noqa: ANN001
        try:
            fn(*args)
        except OSError as exc:
            return exc.errno
        return 0

    long = "n" * 256
    assert code(os.lstat, union.m(long)) == errno.ENAMETOOLONG
    assert code(os.mkdir, union.m(long)) == errno.ENAMETOOLONG
    assert code(open, union.m(long), "w") == errno.ENAMETOOLONG
    assert code(os.mkdir, union.m("n" * 255)) == 0
    assert code(os.lstat, union.m("d/nothing")) == errno.ENOENT
    assert code(os.lstat, union.m("d/a/below")) == errno.ENOTDIR
    assert code(os.mkdir, union.m("d")) == errno.EEXIST
    assert code(os.unlink, union.m("d")) == errno.EISDIR
    assert code(os.rmdir, union.m("d/a")) == errno.ENOTDIR
    assert code(os.link, union.m("d"), union.m("dlink")) == errno.EPERM


def test_paths_longer_than_path_max(union: Union) -> None:
    comp = "c" * 200
    fd = os.open(union.m(""), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(30):  # 30 * 201 bytes: well past PATH_MAX
            os.mkdir(comp, dir_fd=fd)
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(wfd, b"deep")
        os.close(wfd)
        os.setxattr(f"/proc/self/fd/{fd}/leaf", "user.x", b"1")
        os.rename("leaf", "leaf2", src_dir_fd=fd, dst_dir_fd=fd)
        assert os.stat("leaf2", dir_fd=fd).st_size == 4
    finally:
        os.close(fd)
    union.remount()
    fd = os.open(union.m(""), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(30):
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert os.listdir(fd) == ["leaf2"]
    finally:
        os.close(fd)


def test_permissions_are_checked_as_the_kernel_does(union: Union) -> None:
    need_tool("setpriv")
    # pytest's tmp dirs are 0700: another user needs a mount point it can reach.
    union.umount()
    public = Path(tempfile.mkdtemp(prefix="cowfs-perm-", dir="/tmp"))
    os.chmod(public, 0o755)
    union.mnt = public
    try:
        union.mount()
        _check_permissions(union)
    finally:
        union.umount()
        public.rmdir()


def _check_permissions(union: Union) -> None:

    def as_nobody(*cmd: str) -> int:
        return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               *cmd], capture_output=True).returncode  # fmt: skip

    assert as_nobody("cat", union.m("d/b")) == 0  # allow_other: other users see the mount
    assert as_nobody("cat", union.m("none")) != 0  # mode 0000
    assert as_nobody("sh", "-c", f"echo x >> {union.m('d/b')}") != 0
    assert as_nobody("touch", union.m("d/newfile")) != 0
    assert not os.path.exists(union.m("d/newfile"))
    os.chmod(union.m("d"), 0o777)
    assert as_nobody("touch", union.m("d/newfile")) == 0
    st = os.lstat(union.m("d/newfile"))
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_read_only_mount_refuses_changes(union: Union) -> None:
    union.umount()
    union.mount(read_only=True)
    with pytest.raises(OSError) as exc:
        os.open(union.m("d/a"), os.O_WRONLY)
    assert exc.value.errno == errno.EROFS
    assert read(union.m("d/a")) == "lower a\n"
    assert os.listdir(union.upper) == []
    assert os.statvfs(union.m("")).f_blocks > 0  # the space of the lower's filesystem


# -- concurrency and loop variants ---------------------------------------------------------------


def _worker(mnt: str, n: int) -> dict[str, str]:
    """One process's share of the stress test: its own dir, plus copy-ups of shared lower files."""
    import random

    rng = random.Random(n)
    mine = Path(mnt) / f"w{n}"
    mine.mkdir()
    expect: dict[str, str] = {}
    for i in range(300):
        op = rng.choice(["create", "append", "rename", "unlink", "mkdir", "lower"])
        names = sorted(expect)
        if op == "create" or not names:
            name = f"w{n}/f{i}"
            Path(mnt, name).write_text(f"{n}-{i}")
            expect[name] = f"{n}-{i}"
        elif op == "append":
            name = rng.choice(names)
            with open(Path(mnt, name), "a") as f:
                f.write("+")
            expect[name] += "+"
        elif op == "rename":
            name = rng.choice(names)
            new = f"w{n}/r{i}"
            os.rename(Path(mnt, name), Path(mnt, new))
            expect[new] = expect.pop(name)
        elif op == "unlink":
            name = rng.choice(names)
            os.unlink(Path(mnt, name))
            del expect[name]
        elif op == "mkdir":
            os.mkdir(mine / f"d{i}")
        else:  # everyone copies up and reads the same lower files
            for lower in ("d/a", "d/sub/deep", "h1"):
                assert Path(mnt, lower).read_text().startswith(("lower a", "deep", "linked"))
            os.utime(Path(mnt, "d/a"))
    return expect


def test_many_processes_at_once(union: Union) -> None:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(_worker, [str(union.mnt)] * 4, range(4)))
    for _ in range(2):
        for expect in results:
            for name, content in expect.items():
                assert read(union.m(name)) == content
            files = {f"{Path(dp).relative_to(union.mnt)}/{f}" for dp, _, fs in
                     os.walk(union.mnt) for f in fs}  # fmt: skip
            assert set(expect) <= files
        assert read(union.m("d/a")) == "lower a\n"
        union.remount()
    assert os.listdir(union.work) == []


@pytest.mark.parametrize("threads, writeback", [(True, False), (False, True)])
def test_loop_variants_serve_the_same_tree(union: Union, threads: bool, writeback: bool) -> None:
    union.umount()
    mounting.mount_dirs([str(d) for d in union.lowers], union.mnt, union.upper, union.work,
                        threads=threads, writeback=writeback)  # fmt: skip
    with open(union.m("d/a"), "a") as f:
        f.write("x")
    with open(union.m("d/a"), "r+b") as f:
        f.seek(2)
        f.write(b"W")
    assert read(union.m("d/a")) == "loWer a\nx"
    Path(union.m("d/new")).write_bytes(b"n" * 100_000)
    os.rename(union.m("d"), union.m("d2"))
    union.remount()
    assert read(union.m("d2/a")) == "loWer a\nx"
    assert Path(union.m("d2/new")).read_bytes() == b"n" * 100_000


def test_an_unknown_fuse_engine_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_fuse()
    (tmp_path / "l").mkdir()
    (tmp_path / "m").mkdir()
    monkeypatch.setenv("COWFS_FUSE_ENGINE", "nope")
    with pytest.raises(CowfsError) as exc:
        mounting.mount_dirs([str(tmp_path / "l")], tmp_path / "m")
    assert "COWFS_FUSE_ENGINE=nope: not one of" in exc.value.message
    assert "\n" not in exc.value.message
    assert not mounting.is_mounted(tmp_path / "m")


# -- FUSE passthrough (native engine) ------------------------------------------------------------


def _finishes(fn: Callable[[], object], seconds: float) -> bool:
    """Whether fn() returns within `seconds` (it keeps running in its thread otherwise)."""
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    threading.Thread(target=run, daemon=True, name="probe").start()
    return done.wait(seconds)


def _join_probes() -> None:
    for t in threading.enumerate():
        if t.name == "probe":
            t.join(10)


@contextlib.contextmanager
def _mounted_dirs(lowers: list[Path], upper: Path, work: Path,
                  mnt: Path) -> Iterator[tuple[int, list[int]]]:  # fmt: skip
    """cowfs on plain-directory lowers (dirs made here); yields (daemon pid, a list for the
    test's fds). The fds are closed, then the mount unmounted, even if the test fails."""
    for p in (upper, work, mnt):
        p.mkdir()
    pid = mounting.mount_dirs([str(d) for d in lowers], mnt, upper, work)
    fds: list[int] = []
    try:
        yield pid, fds
    finally:
        for fd in fds:
            os.close(fd)
        mounting.umount(mnt)


@contextlib.contextmanager
def _daemon_stopped(pid: int) -> Iterator[None]:
    """The daemon stopped (SIGSTOP) for the block; continued, and the probes the block started
    joined (before the test closes their fds), even if it fails."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        _join_probes()


@pytest.fixture
def host_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory on a fresh tmpfs ("tmpfs") or inside a kernel overlayfs ("overlayfs"), for
    the upper: the test does not depend on what the machine's /tmp is."""
    host = tmp_path / "host"
    host.mkdir()
    if request.param == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "tmpfs", str(host)]
    else:
        for d in ("ol", "ou", "ow"):
            (tmp_path / d).mkdir()
        opts = f"lowerdir={tmp_path / 'ol'},upperdir={tmp_path / 'ou'},workdir={tmp_path / 'ow'}"
        cmd = ["mount", "-t", "overlay", "overlay", "-o", opts, str(host)]
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        yield host
    finally:
        subprocess.run(["umount", "-l", str(host)], check=True, capture_output=True)


@pytest.mark.parametrize(
    "host_fs, passthrough, direct",
    [("tmpfs", "1", True), ("tmpfs", "0", False), ("overlayfs", "1", False)],
    indirect=["host_fs"],
)
def test_upper_files_are_read_and_written_by_the_kernel_directly(
    tmp_path: Path, host_fs: Path, monkeypatch: pytest.MonkeyPatch, passthrough: str,
    direct: bool,
) -> None:  # fmt: skip
    """An upper file's reads and writes go from the kernel to the host file (FUSE passthrough):
    its reads go on while the daemon is stopped. With COWFS_PASSTHROUGH=0, or an upper the
    kernel cannot pass through to (on overlayfs: stacked too deep), the same read waits for the
    daemon, and all still works. Lower files never pass through: their reads are verified by
    the daemon. (A write still asks the daemon one thing first, the kernel's security.capability
    check, so it is not the probe.)"""
    need_fuse()
    monkeypatch.setenv("COWFS_FUSE_ENGINE", "native")
    monkeypatch.setenv("COWFS_PASSTHROUGH", passthrough)
    lowers = _build_lowers(tmp_path)
    upper, mnt = host_fs / "upper", tmp_path / "mnt"
    with _mounted_dirs(lowers, upper, host_fs / "work", mnt) as (pid, fds):
        new = os.open(mnt / "new", os.O_RDWR | os.O_CREAT, 0o644)  # CREATE
        fds.append(new)
        copied = os.open(mnt / "d/a", os.O_RDWR)  # OPEN with copy-up
        fds.append(copied)
        # A big one: a small lower file's first open stores it in the page cache (_prefill).
        lower = os.open(mnt / "big/sparse", os.O_RDONLY)
        fds.append(lower)
        assert os.pwrite(new, b"direct", 0) == 6
        assert os.pwrite(copied, b"L", 0) == 1
        # Opened again: without passthrough an upper file's open drops its page cache, so the
        # reads below must reach the daemon.
        new2 = os.open(mnt / "new", os.O_RDONLY)
        fds.append(new2)
        copied2 = os.open(mnt / "d/a", os.O_RDONLY)
        fds.append(copied2)
        got: list[bytes] = []
        with _daemon_stopped(pid):
            read = _finishes(lambda: got.extend((os.pread(new2, 6, 0), os.pread(copied2, 8, 0))),
                             2.0 if direct else 0.5)  # fmt: skip
            assert read == direct
            assert not _finishes(lambda: os.pread(lower, 6, 32 << 20), 0.3)
        assert os.pread(lower, 6, 32 << 20) == b"middle"
        assert os.pread(new, 6, 0) == b"direct"
        assert os.pread(copied, 8, 0) == b"Lower a\n"
        assert (upper / "new").read_bytes() == b"direct"
        assert (upper / "d/a").read_text() == "Lower a\n"
        assert os.fstat(new).st_size == os.stat(mnt / "new").st_size == 6


@pytest.mark.parametrize("prefill, passthrough", [("256", "1"), ("256", "0"), ("0", "1")])
def test_a_small_lower_file_is_in_the_page_cache_once_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefill: str, passthrough: str,
) -> None:  # fmt: skip
    """The first open of a small lower file stores its whole (verified) content in the
    kernel's page cache before it is answered, so the reads after it need no request: they go
    on while the daemon is stopped. With COWFS_PREFILL_KIB=0 the same read waits for the daemon.
    A file bigger than the limit, and an upper file, are read as before."""
    need_fuse()
    monkeypatch.setenv("COWFS_FUSE_ENGINE", "native")
    monkeypatch.setenv("COWFS_PREFILL_KIB", prefill)
    monkeypatch.setenv("COWFS_PASSTHROUGH", passthrough)
    lowers = _build_lowers(tmp_path)
    (lowers[1] / "d/page").write_bytes(bytes(range(256)) * 64)  # 16 KiB, several pages
    mnt = tmp_path / "mnt"
    with _mounted_dirs(lowers, tmp_path / "upper", tmp_path / "work", mnt) as (pid, fds):
        small = os.open(mnt / "d/page", os.O_RDONLY)
        fds.append(small)
        big = os.open(mnt / "big/sparse", os.O_RDONLY)
        fds.append(big)
        got: list[bytes] = []
        with _daemon_stopped(pid):
            read = _finishes(lambda: got.append(os.pread(small, 1 << 20, 0)), 2.0)
            assert read == (prefill != "0")
            assert not _finishes(lambda: os.pread(big, 6, 32 << 20), 0.3)
        assert os.pread(small, 1 << 20, 0) == bytes(range(256)) * 64
        assert got in ([], [bytes(range(256)) * 64])
        assert os.pread(big, 6, 32 << 20) == b"middle"
        # Opened again, and after a copy-up (whose open drops the pages of the lower file).
        with open(mnt / "d/page", "rb") as f:
            assert f.read() == bytes(range(256)) * 64
        with open(mnt / "d/page", "r+b") as f:
            f.write(b"new")
        with open(mnt / "d/page", "rb") as f:
            assert f.read() == b"new" + (bytes(range(256)) * 64)[3:]


def test_passthrough_and_cached_opens_of_one_file_mix(union: Union) -> None:
    """The kernel refuses a cached open of a file with passthrough opens and the reverse
    (ETXTBSY); the daemon picks the mode per file so that every open of every order works."""
    # A lower file open for reading (cached), then opened for writing: copy-up, no passthrough.
    with open(union.m("d/sub/deep"), "rb") as r:
        assert r.read(2) == b"de"
        with open(union.m("d/sub/deep"), "ab") as w:
            w.write(b"more\n")
        with open(union.m("d/sub/deep"), "rb") as again:
            assert again.read() == b"deep\nmore\n"
    # An upper file open for writing (passthrough), then opened again and mapped.
    with open(union.m("fresh"), "wb+") as w:
        w.write(b"a" * 8192)
        w.flush()
        with open(union.m("fresh"), "r+b") as r, mmap.mmap(r.fileno(), 8192) as m:
            m[0:4] = b"bbbb"
            m.flush()
            assert os.pread(w.fileno(), 4, 0) == b"bbbb"
            w.seek(4)
            w.write(b"cc")
            w.flush()
            assert m[4:6] == b"cc"
    # Once all are closed, a cached open is possible again, and so is the next passthrough one.
    with open(union.m("fresh"), "rb") as r:
        assert r.read(6) == b"bbbbcc"
    # Hard links: a write through one name is seen through the other, open at the same time.
    os.link(union.m("fresh"), union.m("fresh2"))
    with open(union.m("fresh"), "r+b", buffering=0) as a, open(union.m("fresh2"), "rb") as b:
        assert os.pread(b.fileno(), 4, 0) == b"bbbb"
        a.write(b"zzzz")
        assert os.pread(b.fileno(), 4, 0) == b"zzzz"


def test_an_unexpected_handler_failure_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cowfs import fuse

    try:
        raise ValueError("boom")
    except ValueError:
        fuse.log_failure("READ")
    assert "FUSE READ failed" in caplog.text
    assert "ValueError: boom" in caplog.text


def _absent(path: str, name: str = "user.k") -> bool:
    try:
        os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        return exc.errno == errno.ENODATA
    return False


def test_an_xattr_found_absent_is_seen_once_set_through_any_name(union: Union) -> None:
    """The native engine remembers absent xattrs (ls -l asks for two per file, every time);
    setting one anywhere, through a hard link's other name too, must show at once."""
    deep = union.m("d/sub/deep")
    assert _absent(deep) and _absent(deep)
    os.setxattr(deep, "user.k", b"v")
    assert os.getxattr(deep, "user.k") == b"v"
    os.removexattr(deep, "user.k")
    assert _absent(deep)
    Path(union.m("hl1")).write_text("x")
    os.link(union.m("hl1"), union.m("hl2"))
    assert _absent(union.m("hl2"))
    os.setxattr(union.m("hl1"), "user.k", b"w")
    assert os.getxattr(union.m("hl2"), "user.k") == b"w"
    Path(union.m("r1")).write_text("1")
    Path(union.m("r2")).write_text("2")
    os.setxattr(union.m("r2"), "user.k", b"r2")
    assert _absent(union.m("r1"))
    os.rename(union.m("r2"), union.m("r1"))
    assert os.getxattr(union.m("r1"), "user.k") == b"r2"
    os.unlink(union.m("r1"))
    Path(union.m("r1")).write_text("again")
    assert _absent(union.m("r1"))


def test_umount_of_a_mount_in_use_fails_and_keeps_it(union: Union) -> None:
    """EBUSY is retried briefly (a path walk in flight right after mounting), but a mount that
    a process really uses (its cwd) is refused with a one-line error and stays mounted."""
    proc = subprocess.Popen(["sleep", "60"], cwd=union.m("d"))
    try:
        with pytest.raises(MountError, match="Device or resource busy"):
            mounting.umount(union.mnt)
        assert mounting.is_mounted(union.mnt)
        assert read(union.m("d/a")) == "lower a\n"
    finally:
        proc.kill()
        proc.wait()
    mounting.umount(union.mnt)  # once it is free
    assert not mounting.is_mounted(union.mnt)
