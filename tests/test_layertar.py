"""Tar layers in and out of the store, with GNU tar as the oracle for what a tar means."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from cowfs import layertar
from cowfs.errors import DigestMismatch, InvalidInput
from cowfs.store import Store
from cowfs.toc import CHR, DIR, FIFO, REG, SYMLINK
from tests.conftest import need_root, need_tool

LONG = "l" * 120 + "/" + "o" * 200 + "/" + "n" * 250


def listing(root: Path) -> dict[str, tuple]:
    """Everything about a tree a layer must keep: type, mode, owner, size, content hash, link
    target, device, xattrs (no times: tools disagree on them), and hard-link partners."""
    out: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            digest = target = ""
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(p)
            xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                  for k in os.listxattr(p, follow_symlinks=False)))  # fmt: skip
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, size, digest, target,
                        rdev, xattrs)  # fmt: skip
    for names in inodes.values():
        for n in names:
            out[n] = (*out[n], tuple(sorted(names)))
    return out


def make_tree(root: Path) -> None:
    """A tree with every kind of entry a layer can hold."""
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/file").write_bytes(b"hello\n")
    (root / "dir/big").write_bytes(os.urandom(300_000) + b"\0" * 700_000)
    (root / "empty").write_bytes(b"")
    (root / "exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "exec", 0o4755)
    os.chmod(root / "dir/sub", 0o1777)
    os.symlink("../etc/passwd", root / "dir/rel-link")
    os.symlink("/abs/target", root / "abs-link")
    os.link(root / "dir/file", root / "hardlink")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chown(root / "dir/file", 1000, 1000)
    os.setxattr(root / "dir/big", "user.note", b"\xff\x00binary")
    os.setxattr(root / "exec", "trusted.x", b"t")
    (root / LONG).parent.mkdir(parents=True)
    (root / LONG).write_bytes(b"long name\n")
    (root / "caf\udce9").write_bytes(b"not utf-8 name\n")


def gnu_tar(src: Path, out: Path, *extra: str, xattrs: bool = True) -> None:
    flags = ["--xattrs", "--xattrs-include=*"] if xattrs else []
    subprocess.run(["tar", *flags, "--numeric-owner", *extra,
                    "-C", str(src), "-cf", str(out), "."], check=True)  # fmt: skip


def gnu_untar(blob: Path, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-p",
                    "-C", str(dest), "-xf", str(blob)], check=True)  # fmt: skip


@pytest.fixture
def store(store_root: Path) -> Store:
    return Store(store_root)


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def ti(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def import_bytes(store: Store, tmp_path: Path, data: bytes, **kw) -> str:
    blob = tmp_path / f"blob.{hashlib.sha256(data).hexdigest()[:8]}"
    blob.write_bytes(data)
    return layertar.import_layer(store, blob, **kw)


# -- a real tree through GNU tar, cowfs and back ---------------------------------------------


def test_round_trip_against_gnu_tar(store: Store, tmp_path: Path) -> None:
    need_root()  # chown, mknod
    need_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    blob = tmp_path / "in.tar"
    gnu_tar(src, blob, "--format=posix")
    layer_id = layertar.import_layer(store, blob)

    toc = store.load_toc(layer_id)
    assert toc.entries["dir"].kind == DIR
    assert toc.entries["dir/sub"].mode == 0o1777
    assert toc.entries["exec"].mode == 0o4755
    assert toc.entries["dir/rel-link"].kind == SYMLINK
    assert toc.entries["dir/rel-link"].target == "../etc/passwd"
    assert toc.entries["fifo"].kind == FIFO
    assert toc.entries["null"].kind == CHR and toc.entries["null"].rdev == os.makedev(1, 3)
    assert toc.entries["dir/big"].xattrs == {"user.note": b"\xff\x00binary"}
    assert (toc.entries["dir/file"].uid, toc.entries["dir/file"].gid) == (1000, 1000)
    assert toc.entries["hardlink"].link == toc.entries["dir/file"].link != 0
    assert toc.entries["hardlink"].digest == toc.entries["dir/file"].digest
    assert toc.entries[LONG].size == 10
    assert "caf\udce9" in toc.entries
    assert store.objects.read(toc.entries["dir/big"].digest) == (src / "dir/big").read_bytes()
    meta = store.layer_meta(layer_id)
    sha = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    assert meta.diff_id == sha and meta.blobs == {sha: layertar.MEDIA_TAR}

    out = tmp_path / "out.tar.gz"
    info = layertar.export_layer(store, layer_id, out, compression="gzip")
    assert info.digest == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
    assert info.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(out.read_bytes())).hexdigest()
    assert info.size == out.stat().st_size
    gnu_untar(out, tmp_path / "back")
    assert listing(tmp_path / "back") == listing(src)

    # The export is a layer too: importing it gives the same layer.
    assert layertar.import_layer(store, out) == layer_id


def test_compressions_give_one_layer(store: Store, tmp_path: Path) -> None:
    data = tar_bytes((ti("a"), b"x" * 5000), (ti("d", tarfile.DIRTYPE), None))
    plain = tmp_path / "l.tar"
    plain.write_bytes(data)
    gz = tmp_path / "l.tar.gz"
    gz.write_bytes(gzip.compress(data))
    zst = tmp_path / "l.tar.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(data))
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    ids = set()
    for blob in (plain, gz, zst):
        # Only the blob digest is given: a blob is read (and its digest recorded) unless that
        # very blob is known; a known diff_id alone would skip it (see the next test).
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        ids.add(layertar.import_layer(store, blob, expect_digest=digest))
    assert len(ids) == 1
    layer_id = ids.pop()
    meta = store.layer_meta(layer_id)
    assert meta.diff_id == diff_id
    assert set(meta.blobs.values()) == {layertar.MEDIA_TAR, layertar.MEDIA_GZIP,
                                        layertar.MEDIA_ZSTD}  # fmt: skip
    assert store.layer_by_digest("sha256:" + hashlib.sha256(gz.read_bytes()).hexdigest()) \
        == layer_id  # fmt: skip


def test_known_layer_is_not_read_again(store: Store, tmp_path: Path) -> None:
    data = tar_bytes((ti("a"), b"abc"))
    layer_id = import_bytes(store, tmp_path, data)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    # The path does not even exist: a layer known by its diff_id is recognised without it.
    again = layertar.import_layer(store, tmp_path / "gone", expect_diff_id=diff_id)
    assert again == layer_id


def test_digest_mismatches(store: Store, tmp_path: Path) -> None:
    data = tar_bytes((ti("a"), b"abc"))
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch, match="blob is sha256:"):
        import_bytes(store, tmp_path, data, expect_digest=wrong)
    with pytest.raises(DigestMismatch, match="diff_id is sha256:"):
        import_bytes(store, tmp_path, gzip.compress(data), expect_diff_id=wrong)
    assert store.layers() == []


def test_sparse_files(store: Store, tmp_path: Path) -> None:
    need_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(5 << 20)
        f.write(b"middle")
        f.truncate(12 << 20)
    want = (src / "sparse").read_bytes()
    for fmt in ("gnu", "posix"):  # old GNU sparse headers and PAX sparse 1.0
        blob = tmp_path / f"{fmt}.tar"
        gnu_tar(src, blob, "--sparse", f"--format={fmt}", xattrs=fmt == "posix")
        assert blob.stat().st_size < 1 << 20  # the holes are not in the archive
        toc = store.load_toc(layertar.import_layer(store, blob))
        e = toc.entries["sparse"]
        assert e.size == 12 << 20
        assert store.objects.read(e.digest) == want


def test_duplicates_later_entry_wins(store: Store, tmp_path: Path) -> None:
    data = tar_bytes(
        (ti("f"), b"first"),
        (ti("f"), b"second"),
        (ti("d", tarfile.DIRTYPE), None),
        (ti("d/child"), b"c"),
        (ti("d"), b"a file replaces the directory"),
        (ti("x", tarfile.SYMTYPE, linkname="f"), None),
        (ti("x", tarfile.DIRTYPE), None),
    )
    toc = store.load_toc(import_bytes(store, tmp_path, data))
    assert store.objects.read(toc.entries["f"].digest) == b"second"
    assert toc.entries["d"].kind == REG
    assert "d/child" not in toc.entries
    assert toc.entries["x"].kind == DIR


def test_whiteouts_and_opaque(store: Store, tmp_path: Path) -> None:
    data = tar_bytes(
        (ti("a", tarfile.DIRTYPE), None),
        (ti("a/.wh..wh..opq"), b""),
        (ti("a/new"), b"n"),
        (ti(".wh.gone"), b""),
        (ti("b/.wh.old"), b""),
        (ti(".wh.back", tarfile.REGTYPE), b""),
        (ti("back", tarfile.DIRTYPE), None),  # whiteout + new dir in one layer: opaque
        (ti(".wh.file"), b""),
        (ti("file"), b"replaced"),
    )
    toc = store.load_toc(import_bytes(store, tmp_path, data))
    assert toc.whiteouts == {"gone", "b/old"}
    assert toc.opaque == {"a", "back"}
    assert set(toc.entries) == {"a", "a/new", "back", "file"}


def test_hard_links_share_one_group(store: Store, tmp_path: Path) -> None:
    data = tar_bytes(
        (ti("f", mode=0o600, uid=7), b"content"),
        (ti("g", tarfile.LNKTYPE, linkname="f", mode=0o777), None),
        (ti("h", tarfile.LNKTYPE, linkname="./f"), None),
        (ti("s", tarfile.SYMTYPE, linkname="f"), None),
        (ti("s2", tarfile.LNKTYPE, linkname="s"), None),  # a hard link to a symlink
    )
    toc = store.load_toc(import_bytes(store, tmp_path, data))
    f, g, h = (toc.entries[p] for p in "fgh")
    assert f.link == g.link == h.link == 1
    assert (g.mode, g.uid, g.digest) == (0o600, 7, f.digest)  # one inode: the target's metadata
    assert toc.entries["s2"].kind == SYMLINK and toc.entries["s2"].link == 2


def test_export_layout_of_special_entries(store: Store, tmp_path: Path) -> None:
    data = tar_bytes(
        (ti("z", tarfile.DIRTYPE), None),
        (ti("z/a"), b"a"),
        (ti("z/.wh..wh..opq"), b""),
        (ti("z/.wh.old"), b""),
        (ti("f"), b"f"),
        (ti("g", tarfile.LNKTYPE, linkname="f"), None),
    )
    layer_id = import_bytes(store, tmp_path, data)
    out = tmp_path / "out.tar"
    first = layertar.export_layer(store, layer_id, out, compression=None)
    with tarfile.open(out) as tar:
        members = [(m.name, m.type) for m in tar.getmembers()]
    assert members == [
        ("f", tarfile.REGTYPE), ("g", tarfile.LNKTYPE), ("z", tarfile.DIRTYPE),
        ("z/.wh..wh..opq", tarfile.REGTYPE), ("z/.wh.old", tarfile.REGTYPE),
        ("z/a", tarfile.REGTYPE),
    ]  # fmt: skip
    for compression in (None, "gzip", "zstd"):  # the same layer gives the same bytes
        a = layertar.export_layer(store, layer_id, tmp_path / "a", compression=compression)
        b = layertar.export_layer(store, layer_id, tmp_path / "b", compression=compression)
        assert a == b
        assert a.diff_id == first.diff_id


def test_bad_compression_name(store: Store, tmp_path: Path) -> None:
    layer_id = import_bytes(store, tmp_path, tar_bytes((ti("a"), b"a")))
    with pytest.raises(InvalidInput, match="unknown compression"):
        layertar.export_layer(store, layer_id, tmp_path / "x", compression="lz4")


def test_gnu_long_names_and_links(store: Store, tmp_path: Path) -> None:
    need_tool("tar")
    src = tmp_path / "src"
    (src / LONG).parent.mkdir(parents=True)
    (src / LONG).write_bytes(b"long\n")
    os.link(src / LONG, src / LONG[:-1])  # a hard link with a long target name
    os.symlink("t" * 300, src / "longlink")
    blob = tmp_path / "gnu.tar"
    gnu_tar(src, blob, "--format=gnu", xattrs=False)  # ././@LongLink entries
    toc = store.load_toc(layertar.import_layer(store, blob))
    assert toc.entries[LONG].link == toc.entries[LONG[:-1]].link == 1
    assert toc.entries["longlink"].target == "t" * 300
    out = tmp_path / "out.tar"
    layertar.export_layer(store, toc.layer_id(), out, compression=None)
    gnu_untar(out, tmp_path / "back")
    assert listing(tmp_path / "back") == listing(src)


def test_rootfs_dir_import(store: Store, tmp_path: Path) -> None:
    import socket

    from cowfs.rootfs import import_dir_layer

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/a").write_bytes(b"a" * 1000)
    os.link(src / "d/a", src / "b")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "sock"))
        layer_id = import_dir_layer(store, src)
    finally:
        sock.close()
    toc = store.load_toc(layer_id)
    assert set(toc.entries) == {"", "b", "d", "d/a"}  # the socket is left out
    assert toc.entries["b"].link == toc.entries["d/a"].link == 1
    assert toc.entries["b"].digest == toc.entries["d/a"].digest
    # The diff_id it records is the sha256 of exactly the tar export_layer writes.
    out = tmp_path / "out.tar"
    info = layertar.export_layer(store, layer_id, out, compression=None)
    assert store.layer_meta(layer_id).diff_id == info.diff_id
    # Reading the files changes their atimes; the layer does not change with them.
    os.utime(src / "d/a", ns=(12345, os.stat(src / "d/a").st_mtime_ns))
    st = os.stat(src)
    (src / "sock").unlink()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert import_dir_layer(store, src) == layer_id


LINKS = {"bin": "usr/bin", "lib": "/usr/lib", "up": "../../..", "loop": "loop", "ab": "a/b",
         "a": "x", "x/b": "/usr"}  # fmt: skip


@pytest.mark.parametrize(("path", "want"), [
    ("bin/sh", "usr/bin/sh"),          # a relative link
    ("lib/x.so", "usr/lib/x.so"),      # an absolute one starts at the image root
    ("up/etc/passwd", "etc/passwd"),   # '..' stops at the root
    ("ab/c", "usr/c"),                 # a link through a link
    ("bin", "bin"),                    # the last component is not followed
    ("usr/bin/sh", "usr/bin/sh"),
])  # fmt: skip
def test_resolve_parents(path: str, want: str) -> None:
    from cowfs.toc import Entry

    def lookup(p: str) -> Entry | None:
        return Entry(p, SYMLINK, target=LINKS[p]) if p in LINKS else None

    assert layertar.resolve_parents(path, lookup) == want


def test_resolve_parents_loop() -> None:
    from cowfs.errors import UnsafePath
    from cowfs.toc import Entry

    with pytest.raises(UnsafePath, match="too many levels"):
        layertar.resolve_parents("loop/x", lambda p: Entry(p, SYMLINK, target="loop"))


def test_rebase_layers_imported_apart(store: Store, tmp_path: Path) -> None:
    """Layers imported without their lowers (a parallel pull) are rebased afterwards."""
    base = import_bytes(store, tmp_path, tar_bytes(
        (ti("usr", tarfile.DIRTYPE), None), (ti("usr/bin", tarfile.DIRTYPE), None),
        (ti("usr/bin/ls"), b"ls"), (ti("bin", tarfile.SYMTYPE, linkname="usr/bin"), None)))
    top = import_bytes(store, tmp_path, tar_bytes((ti("bin/foo"), b"foo")))
    plain = import_bytes(store, tmp_path, tar_bytes((ti("etc", tarfile.DIRTYPE), None),
                                                    (ti("etc/x"), b"x")))  # fmt: skip
    layers = layertar.rebase_layers(store, [base, top, plain])
    assert layers[0] == base and layers[2] == plain and layers[1] != top
    rebased = store.load_toc(layers[1])
    assert set(rebased.entries) == {"usr/bin/foo"}
    assert store.objects.read(rebased.entries["usr/bin/foo"].digest) == b"foo"
    assert layertar.rebase_layers(store, layers) == layers  # idempotent
