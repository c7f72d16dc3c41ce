"""overlaydir.scan: a kernel-overlayfs-format directory read into a Toc."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import xxhash

from cowfs import overlaydir
from cowfs.errors import InvalidInput, NotFound
from cowfs.toc import DIR, FIFO, REG, SYMLINK
from tests.conftest import need_root


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"hello\n")
    os.link(root / "a" / "f", root / "a" / "g")
    os.link(root / "a" / "f", root / "h")
    (root / "empty").write_bytes(b"")
    os.symlink("a/f", root / "s")
    os.mkfifo(root / "a" / "p")
    os.setxattr(root / "a" / "f", "user.keep", b"1")
    os.chmod(root / "a" / "b", 0o750)


def test_plain_tree(tmp_path: Path) -> None:
    _tree(tmp_path)
    toc = overlaydir.scan(tmp_path)
    assert sorted(toc.entries) == ["", "a", "a/b", "a/f", "a/g", "a/p", "empty", "h", "s"]
    e = toc.entries
    assert e[""].kind == DIR and e["a/b"].mode == 0o750
    assert e["a/f"].kind == REG and e["a/f"].size == 6 and e["a/f"].xattrs == {"user.keep": b"1"}
    assert e["s"].kind == SYMLINK and e["s"].target == "a/f" and e["s"].size == 3
    assert e["a/p"].kind == FIFO
    st = os.stat(tmp_path / "a" / "f")
    assert e["a/f"].mtime == st.st_mtime_ns and e["a/f"].uid == st.st_uid
    # one link group holding exactly the three aliases; the unlinked files are not grouped
    assert e["a/f"].link == e["a/g"].link == e["h"].link == 1
    assert e["empty"].link == 0 and e["a/f"].digest == ""
    assert not toc.whiteouts and not toc.opaque


def test_hash_contents(tmp_path: Path) -> None:
    _tree(tmp_path)
    before = os.stat(tmp_path / "a" / "f").st_atime_ns
    toc = overlaydir.scan(tmp_path, hash_contents=True)
    assert toc.entries["a/f"].digest == xxhash.xxh128(b"hello\n").hexdigest()
    assert toc.entries["h"].digest == toc.entries["a/f"].digest
    assert toc.entries["empty"].digest == ""
    assert os.stat(tmp_path / "a" / "f").st_atime_ns == before


def test_whiteouts_and_opaque(tmp_path: Path) -> None:
    need_root()
    _tree(tmp_path)
    overlaydir_fd = os.open(tmp_path / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        overlaydir.make_whiteout(overlaydir_fd, "gone")
        overlaydir.make_whiteout(overlaydir_fd, "gone2")
    finally:
        os.close(overlaydir_fd)
    b = os.open(tmp_path / "a" / "b", os.O_RDONLY | os.O_DIRECTORY)
    try:
        overlaydir.mark_opaque(b)
    finally:
        os.close(b)
    (tmp_path / "u").mkdir()
    os.setxattr(tmp_path / "u", "user.overlay.opaque", b"y")
    (tmp_path / "x").mkdir()
    os.setxattr(tmp_path / "x", "trusted.overlay.opaque", b"n")  # not opaque
    os.setxattr(tmp_path / "a" / "f", "trusted.overlay.origin", b"\0\1")
    os.setxattr(tmp_path / "a" / "f", "trusted.cowfs.ino", b"42")
    os.setxattr(tmp_path / "a" / "f", "trusted.other", b"kept")
    toc = overlaydir.scan(tmp_path)
    assert toc.whiteouts == {"a/gone", "a/gone2"}
    assert "a/gone" not in toc.entries
    assert toc.opaque == {"a/b", "u"}
    assert toc.entries["a/b"].xattrs is None  # the marker is layering, not file metadata
    assert toc.entries["a/f"].xattrs == {"user.keep": b"1", "trusted.other": b"kept"}
    # kernel overlayfs may hard-link whiteouts to one inode: they are still not a link group
    assert toc.entries["a/f"].link == 1


def test_redirect_is_refused(tmp_path: Path) -> None:
    need_root()
    (tmp_path / "d").mkdir()
    os.setxattr(tmp_path / "d", "trusted.overlay.redirect", b"/old")
    with pytest.raises(InvalidInput, match="redirect"):
        overlaydir.scan(tmp_path)


def test_missing_and_not_a_dir(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        overlaydir.scan(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInput):
        overlaydir.scan(tmp_path / "file")


def test_paths_longer_than_path_max(tmp_path: Path) -> None:
    name = "d" * 250
    depth = 20  # 20 * 251 bytes > PATH_MAX (4096)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(wfd, b"deep")
        os.close(wfd)
    finally:
        os.close(fd)
    toc = overlaydir.scan(tmp_path, hash_contents=True)
    leaf = "/".join([name] * depth + ["leaf"])
    assert len(leaf) > 4096
    assert toc.entries[leaf].size == 4 and toc.entries[leaf].mode == 0o600
    assert toc.entries[leaf].digest == xxhash.xxh128(b"deep").hexdigest()
    shutil.rmtree(tmp_path / name)  # fd-based on Linux: pytest's own cleanup may not cope


def test_non_utf8_names_and_determinism(tmp_path: Path) -> None:
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9"
    with open(raw, "wb") as f:
        f.write(b"x")
    os.link(raw, os.fsencode(str(tmp_path)) + b"/z1")
    (tmp_path / "b").write_bytes(b"y")
    os.link(tmp_path / "b", tmp_path / "z0")
    a = overlaydir.scan(tmp_path)
    name = os.fsdecode(b"caf\xe9")
    assert name in a.entries
    b = overlaydir.scan(tmp_path)
    # (not layer_id: reading a directory may bump its atime under relatime)
    assert {p: e.link for p, e in a.entries.items()} == {p: e.link for p, e in b.entries.items()}
    assert a.entries["b"].link == a.entries["z0"].link == 1
    assert a.entries[name].link == a.entries["z1"].link == 2
    assert stat.S_ISREG(a.entries[name].st_mode)


def test_root_xattrs_and_opaque_root(tmp_path: Path) -> None:
    os.setxattr(tmp_path, "user.root", b"r")
    (tmp_path / "f").write_bytes(b"")
    toc = overlaydir.scan(tmp_path)
    assert toc.entries[""].xattrs == {"user.root": b"r"}
    assert toc.entries["f"].xattrs is None


def test_escaped_overlay_xattrs_are_unescaped(tmp_path: Path) -> None:
    need_root()
    (tmp_path / "f").write_bytes(b"")
    # overlayfs (6.7+) and cowfs store a user's trusted.overlay.X as trusted.overlay.overlay.X
    os.setxattr(tmp_path / "f", "trusted.overlay.overlay.mine", b"1")
    os.setxattr(tmp_path / "f", "trusted.overlay.origin", b"bookkeeping")
    assert overlaydir.scan(tmp_path).entries["f"].xattrs == {"trusted.overlay.mine": b"1"}
    kept = overlaydir.scan(tmp_path, keep_bookkeeping=True).entries["f"].xattrs
    assert kept is not None and "trusted.overlay.origin" in kept
