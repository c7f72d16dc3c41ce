"""`cowfs mount` / `cowfs umount` of stored images, `mount -t fuse.cowfs`, and overlayfs parity."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs import mounting
from cowfs.store import Store
from cowfs.toc import DIR, REG, SYMLINK, Entry
from tests.conftest import need_fuse, need_tool

COWFS = [str(Path(sys.executable).parent / "cowfs")]
BIG = bytes(range(256)) * 4096 * 3  # 3 MiB: several object frames


def cowfs(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*COWFS, "--root", str(root), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.fixture
def image(store_root: Path) -> str:
    """Two stored layers: the top one whites out a file and makes a dir opaque."""
    store = Store(store_root)
    with store.new_layer() as lb:
        lb.add(Entry("", DIR, mode=0o755))
        lb.add(Entry("etc", DIR, mode=0o755))
        lb.add(Entry("etc/passwd", REG, mode=0o644), b"root:x:0:0\n")
        lb.add(Entry("etc/old", REG, mode=0o600, uid=7, gid=8), b"old")
        lb.add(Entry("var", DIR, mode=0o755))
        lb.add(Entry("var/cache", DIR, mode=0o755))
        lb.add(Entry("var/cache/junk", REG), b"junk")
        lb.add(Entry("big", REG, mode=0o644), BIG)
        lb.add(Entry("bin", DIR, mode=0o755))
        lb.add(Entry("bin/sh", REG, mode=0o755, link=1), b"#!shell")
        lb.add(Entry("bin/ash", REG, mode=0o755, link=1))
        lb.add(Entry("sh", SYMLINK, mode=0o777, target="bin/sh"))
        bottom = lb.commit()
    with store.new_layer() as lb:
        lb.add(Entry("etc", DIR, mode=0o755))
        lb.add(Entry("etc/hostname", REG, mode=0o644), b"box\n")
        lb.whiteout("etc/old")
        lb.add(Entry("var/cache", DIR, mode=0o755))
        lb.opaque("var/cache")
        top = lb.commit()
    store.add_image([bottom, top], {"config": {}}, tags=["test:latest"])
    return "test:latest"


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    need_fuse()
    m = tmp_path / "mnt"
    m.mkdir()
    try:
        yield m
    finally:
        if mounting.is_mounted(m):
            mounting.umount(m, lazy=True)


@pytest.mark.parametrize("passthrough", ["1", "0"])
def test_the_daemon_records_what_the_kernel_granted(store_root: Path, image: str, mnt: Path,
                                                    tmp_path: Path, passthrough: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    ) -> None:  # fmt: skip
    """Once its mount is live the daemon records its pid and what INIT granted, which the
    bench reports (it cannot be seen in /proc/mounts). As root on a kernel with FUSE
    passthrough (>= 6.9, as here) the native engine gets it unless COWFS_PASSTHROUGH=0."""
    monkeypatch.setenv("COWFS_FUSE_ENGINE", "native")
    monkeypatch.setenv("COWFS_PASSTHROUGH", passthrough)
    assert mounting.daemon_info(mnt) == {}
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    res = cowfs(store_root, "mount", image, str(mnt), "--upper", str(up), "--work", str(wk))
    assert res.returncode == 0, res.stderr
    info = mounting.daemon_info(mnt)
    assert info == {"pid": info["pid"], "passthrough": passthrough == "1", "writeback": False}
    with open(f"/proc/{info['pid']}/cmdline", "rb") as f:
        assert b"cowfs" in f.read()
    res = cowfs(store_root, "umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert mounting.daemon_info(mnt) == {}


def test_cli_mount_of_an_image_with_upper_and_umount(store_root: Path, image: str, mnt: Path,
                                                     tmp_path: Path) -> None:  # fmt: skip
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    res = cowfs(store_root, "mount", image, str(mnt), "--upper", str(up), "--work", str(wk))
    assert res.returncode == 0, res.stderr
    assert mounting.is_mounted(mnt)  # live when the command returns
    assert sorted(os.listdir(mnt)) == ["big", "bin", "etc", "sh", "var"]
    assert sorted(os.listdir(mnt / "etc")) == ["hostname", "passwd"]
    assert os.listdir(mnt / "var/cache") == []
    assert (mnt / "big").read_bytes() == BIG
    with open(mnt / "big", "rb") as f:  # random access across frames
        f.seek(1_500_000)
        assert f.read(1000) == BIG[1_500_000:1_501_000]
    assert (mnt / "sh").read_text() == "#!shell"
    assert os.lstat(mnt / "bin/sh").st_ino == os.lstat(mnt / "bin/ash").st_ino
    with open(mnt / "bin/ash", "a") as f:
        f.write(" changed")
    assert (mnt / "bin/sh").read_text() == "#!shell changed"
    (mnt / "etc/new").write_text("new\n")
    res = cowfs(store_root, "umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert not mounting.is_mounted(mnt)
    assert (up / "etc/new").read_text() == "new\n"
    assert os.path.samefile(up / "bin/sh", up / "bin/ash")
    # The same upper mounts again with the same view and inode numbers.
    res = cowfs(store_root, "mount", image, str(mnt), "--upper", str(up), "--work", str(wk))
    assert res.returncode == 0, res.stderr
    assert (mnt / "etc/new").read_text() == "new\n"
    assert (mnt / "bin/sh").read_text() == "#!shell changed"


def test_index_is_cached_per_image(store_root: Path, image: str, mnt: Path) -> None:
    pid = mounting.mount(Store(store_root), image, mnt, read_only=True)
    assert pid > 0
    mounting.umount(mnt)
    cached = list((store_root / "cache").glob("index-*"))
    assert len(cached) == 1
    before = cached[0].stat().st_mtime_ns
    mounting.mount(Store(store_root), image, mnt, read_only=True)
    assert (mnt / "etc/hostname").read_text() == "box\n"
    mounting.umount(mnt)
    assert cached[0].stat().st_mtime_ns == before  # loaded, not merged again
    cached[0].write_bytes(b"damaged")  # derived data: a damaged cache is rebuilt
    mounting.mount(Store(store_root), image, mnt, read_only=True)
    assert sorted(os.listdir(mnt / "etc")) == ["hostname", "passwd"]
    mounting.umount(mnt)
    assert cached[0].read_bytes() != b"damaged"


def test_mount_without_upper_uses_a_fresh_dir_and_read_only_refuses(store_root: Path,
                                                                    image: str,
                                                                    mnt: Path) -> None:  # fmt: skip
    assert cowfs(store_root, "mount", image, str(mnt)).returncode == 0
    (mnt / "scratch").write_text("x")
    assert cowfs(store_root, "umount", str(mnt)).returncode == 0
    assert list((store_root / "mounts").glob("*/upper/scratch"))
    assert cowfs(store_root, "mount", "--read-only", image, str(mnt)).returncode == 0
    res = subprocess.run(["touch", str(mnt / "nope")], capture_output=True)
    assert res.returncode != 0
    assert cowfs(store_root, "umount", str(mnt)).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["mount", "127.0.0.1:9/nosuch:image", "MNT"], "Error: "),  # not stored, not pullable
    (["mount", "test:latest", "/nonexistent/dir"], "Error: mount point /nonexistent/dir is"),
    (["mount", "test:latest", "MNT", "--upper", "/tmp"], "Error: --upper and --work go together"),
    (["umount", "MNT"], "is not mounted"),
])  # fmt: skip
def test_bad_input_is_one_error_line(store_root: Path, image: str, mnt: Path,
                                     args: list[str], message: str) -> None:  # fmt: skip
    res = cowfs(store_root, *[str(mnt) if a == "MNT" else a for a in args])
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and message in res.stderr
    assert "Traceback" not in res.stderr


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, data, link)  # fmt: skip
    return out


@pytest.fixture
def dir_lowers(tmp_path: Path) -> tuple[Path, Path]:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    (bottom / "a/b").mkdir(parents=True)
    (bottom / "a/b/f").write_text("bottom")
    (bottom / "a/gone").write_text("gone")
    (bottom / "o").mkdir()
    (bottom / "o/hidden").write_text("h")
    os.symlink("a/b/f", bottom / "l")
    (top / "a").mkdir(parents=True)
    (top / "a/top").write_text("top")
    os.mknod(top / "a/gone", stat.S_IFCHR, 0)
    (top / "o").mkdir()
    os.setxattr(top / "o", "trusted.overlay.opaque", b"y")
    (top / "o/shown").write_text("s")
    return top, bottom


def test_mount_helper_matches_kernel_overlayfs(tmp_path: Path, dir_lowers: tuple[Path, Path],
                                               mnt: Path) -> None:  # fmt: skip
    need_tool("mount", "mount.fuse.cowfs")
    top, bottom = dir_lowers
    ovl = tmp_path / "ovl"
    ovl.mkdir()
    for d in ("u1", "w1", "u2", "w2"):
        (tmp_path / d).mkdir()
    lower = f"lowerdir={top}:{bottom}"
    res = subprocess.run(["mount", "-t", "fuse.cowfs", "cowfs", str(mnt), "-o",
                          f"{lower},upperdir={tmp_path / 'u1'},workdir={tmp_path / 'w1'}"],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    subprocess.run(["mount", "-t", "overlay", "overlay", str(ovl), "-o",
                    f"{lower},upperdir={tmp_path / 'u2'},workdir={tmp_path / 'w2'}"], check=True)
    try:
        assert _tree(mnt) == _tree(ovl)
        for root in (mnt, ovl):  # the same changes on both
            (root / "a/b/f").write_text("changed")
            os.unlink(root / "a/top")
            os.mkdir(root / "n")
            os.chmod(root / "l", 0o600)
        assert _tree(mnt) == _tree(ovl)
    finally:
        subprocess.run(["umount", str(ovl)], check=True)
        mounting.umount(mnt)
    assert _tree(tmp_path / "u1") == _tree(tmp_path / "u2")  # the same upper, overlayfs format


def test_mount_helper_with_lowerdirs_only_is_read_only(dir_lowers: tuple[Path, Path],
                                                       mnt: Path) -> None:  # fmt: skip
    need_tool("mount", "mount.fuse.cowfs")
    top, bottom = dir_lowers
    res = subprocess.run(["mount", "-t", "fuse.cowfs", "cowfs", str(mnt), "-o",
                          f"lowerdir={top}:{bottom}"], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (mnt / "a/b/f").read_text() == "bottom"
    assert subprocess.run(["touch", str(mnt / "x")], capture_output=True).returncode != 0
    assert subprocess.run(["umount", str(mnt)]).returncode == 0


def test_a_volatile_mount_never_syncs_and_marks_its_upper_until_it_ends(
    store_root: Path, image: str, mnt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--volatile` (overlayfs's option; `run --rm` mounts so): copy-up, fsync and the unmount
    force nothing to disk; <work>/volatile exists while mounted, and an upper whose volatile
    mount did not end cleanly is refused, with one line, until that is removed."""
    from cowfs.mounting import build_image_fs

    store = Store(store_root)
    syncs: list[str] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: syncs.append("fdatasync"))
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append("fsync"))
    for volatile in (False, True):
        up, wk = tmp_path / f"up{volatile}", tmp_path / f"wk{volatile}"
        up.mkdir()
        wk.mkdir()
        syncs.clear()
        fs = build_image_fs(store, image, str(up), str(wk), False, volatile)
        assert (wk / "volatile").is_dir() == volatile
        fh, _ = fs.open("big", os.O_RDWR)  # copy-up of a file of several frames
        fs.write(fh, b"X", 0)
        fs.fsync(fh, True)
        fs.release(fh)
        fs.close()
        assert (syncs == []) == volatile, syncs
        assert not (wk / "volatile").exists()  # a clean end
        assert (up / "big").read_bytes() == b"X" + BIG[1:]
    monkeypatch.undo()

    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    res = cowfs(store_root, "mount", "--volatile", image, str(mnt), "--upper", str(up),
                "--work", str(wk))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (wk / "volatile").is_dir()
    (mnt / "etc/new").write_text("new\n")
    assert cowfs(store_root, "umount", str(mnt)).returncode == 0
    assert not (wk / "volatile").exists() and (up / "etc/new").read_text() == "new\n"
    (wk / "volatile").mkdir()  # as a crash would leave it
    res = cowfs(store_root, "mount", image, str(mnt), "--upper", str(up), "--work", str(wk))
    assert res.returncode != 0 and not mounting.is_mounted(mnt)
    assert res.stderr.count("\n") == 1 and "mounted volatile" in res.stderr, res.stderr
    (wk / "volatile").rmdir()
    res = cowfs(store_root, "mount", image, str(mnt), "--upper", str(up), "--work", str(wk))
    assert res.returncode == 0, res.stderr
    assert (mnt / "etc/new").read_text() == "new\n"
