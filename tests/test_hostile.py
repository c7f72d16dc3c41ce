"""Hostile layers: every row either fails with a clear InvalidInput/UnsafePath or has a
documented safe reading (see cowfs/layertar.py), and in no case does anything change outside the
store, nor does a half-imported image become visible.

Each row is imported twice: as a bare layer, and as the top layer of an OCI image over a good
base layer (the base is then stored, but no image may appear). A canary directory next to the
store, which the hostile names aim at, and the store's own tmp/, images/ and tags are snapshotted
before and after and must be identical.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from cowfs import blobstream, layertar, oci
from cowfs.errors import InvalidInput, UnsafePath
from cowfs.store import Store
from cowfs.toc import BLK, CHR, REG, Toc
from tests.conftest import need_tool

MiB = 1 << 20


def ti(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def f(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return ti(name), data


def d(name: str) -> tuple[tarfile.TarInfo, None]:
    return ti(name, tarfile.DIRTYPE), None


def sym(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return ti(name, tarfile.SYMTYPE, linkname=target), None


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return ti(name, tarfile.LNKTYPE, linkname=target), None


def flip(data: bytes, at: float = 0.5) -> bytes:
    b = bytearray(data)
    i = int(len(b) * at)
    for j in range(i, min(i + 16, len(b))):
        b[j] ^= 0x5A
    return bytes(b)


def zeros_tar(size: int) -> Callable[[], bytes]:
    """A tar holding one file of `size` zero bytes, written as a stream (cheap to compress)."""

    def build() -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            info = ti("zeros", size=size)
            t.addfile(info, _Zeros(size))
        return buf.getvalue()

    return build


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def zst_plain(data: bytes) -> bytes:
    """zstd without a content checksum: only the frame structure tells a cut stream."""
    return zstandard.ZstdCompressor(level=3).compress(data)


def raw_header(typ: bytes, size: int) -> bytes:
    """A lone ustar header of type `typ` claiming `size` bytes of data."""
    h = bytearray(512)
    h[0:4] = b"name"
    h[100:108] = b"0000644\0"
    h[124:136] = f"{size:011o}\0".encode()
    h[156:157] = typ
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h) + bytes(1024)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def zst(data: bytes) -> bytes:
    # With a content checksum, as the zstd command writes by default: without one, a flipped
    # byte inside a stored block is invisible to zstd (the diff_id check still catches it).
    return zstandard.ZstdCompressor(level=19, write_checksum=True).compress(data)


@dataclass
class Row:
    name: str
    blob: Callable[[], bytes]
    error: type[Exception] | None  # None: imported, and `check` sees the safe reading
    match: str = ""
    check: Callable[[Toc], None] | None = None
    limits: layertar.Limits = layertar.DEFAULT_LIMITS


def _only(toc: Toc, **kinds: str) -> None:
    got = {p: e.kind for p, e in toc.entries.items()}
    assert got == kinds, got


def _abs_read(toc: Toc) -> None:
    _only(toc, **{"etc": "d", "etc/passwd": REG})


def _dup_read(toc: Toc) -> None:
    assert set(toc.entries) == {"a"} and toc.entries["a"].size == 6


def _dev_read(toc: Toc) -> None:
    assert toc.entries["dev/sda"].kind == BLK and toc.entries["dev/sda"].rdev == os.makedev(8, 0)
    assert toc.entries["dev/null"].kind == CHR


def _ws_read(toc: Toc) -> None:
    assert toc.whiteouts == {"x"} and "x" not in toc.entries


SMALL = layertar.Limits(max_ratio=100, floor=MiB)
GOOD = tar(d("etc"), f("etc/passwd", b"root:x:0:0::/:/bin/sh\n"))
# Written as a tar stream and then cut: the content of the second entry is missing.
TRUNCATED = tar(f("a", b"A" * 10_000), f("b", b"B" * 100_000))[:30_000]

ROWS = [
    Row("dotdot", lambda: tar(f("../canary/pwned")), UnsafePath, "escapes the root"),
    Row("dotdot inside", lambda: tar(f("a/../../canary/pwned")), UnsafePath, "escapes"),
    Row("dotdot dir", lambda: tar(d(".."), f("../x")), UnsafePath, "escapes"),
    Row("absolute path", lambda: tar(d("/etc"), f("/etc/passwd")), None, check=_abs_read),
    Row("duplicates", lambda: tar(f("a", b"first"), f("./a", b"second")), None,
        check=_dup_read),
    Row("hard link to missing", lambda: tar(hard("h", "nowhere")), InvalidInput,
        "not earlier in the layer"),
    Row("hard link escaping", lambda: tar(f("a"), hard("h", "../../etc/shadow")), UnsafePath,
        "hard-link target"),
    Row("hard link absolute", lambda: tar(hard("h", "/etc/shadow")), InvalidInput,
        "not earlier"),
    Row("hard link to dir", lambda: tar(d("d"), hard("h", "d")), InvalidInput, "directory"),
    Row("hard link through symlink", lambda: tar(f("a"), sym("l", "/"), hard("l/h", "a")),
        UnsafePath, "is a symlink"),
    Row("write through symlink", lambda: tar(sym("l", "../../canary"), f("l/pwned")),
        UnsafePath, "'l' is a symlink"),
    Row("write through abs symlink", lambda: tar(sym("etc", "/etc"), f("etc/passwd")),
        UnsafePath, "is a symlink"),
    Row("dir through symlink", lambda: tar(sym("l", "/tmp"), d("l/sub")), UnsafePath,
        "is a symlink"),
    Row("write under a file", lambda: tar(f("a"), f("a/b")), InvalidInput,
        "not a directory"),
    # A directory seen as a fine parent, then replaced by a symlink (later entries win): what
    # goes below it afterwards must be refused, however deep.
    Row("dir replaced by symlink", lambda: tar(d("a"), d("a/b"), f("a/b/c"), sym("a", "/etc"),
                                               f("a/b/pwned")), UnsafePath, "is a symlink"),
    Row("dir replaced by file", lambda: tar(d("a"), f("a/c"), f("a"), f("a/d")), InvalidInput,
        "not a directory"),
    Row("whiteout of whiteout", lambda: tar(f(".wh..wh.x", b"")), InvalidInput,
        "whiteout of a whiteout"),
    Row("whiteout of dotdot", lambda: tar(f(".wh...", b"")), InvalidInput,
        "whiteout without a name"),
    Row("whiteout without name", lambda: tar(f("d/.wh.", b"")), InvalidInput,
        "whiteout without a name"),
    Row("whiteout escaping", lambda: tar(f("../.wh.x", b"")), UnsafePath, "escapes"),
    Row("whiteout through symlink", lambda: tar(sym("l", "/"), f("l/.wh.etc", b"")),
        UnsafePath, "is a symlink"),
    Row("opaque in a file", lambda: tar(f("a"), f("a/.wh..wh..opq", b"")), InvalidInput,
        "not a directory"),
    Row("plain whiteout", lambda: tar(f(".wh.x", b"")), None, check=_ws_read),
    Row("pax path escaping", lambda: tar((_pax("../../canary/pwned"), b"x")), UnsafePath,
        "escapes"),
    Row("gnu long name escaping", lambda: _gnu(f("../" * 60 + "canary/pwned")), UnsafePath,
        "escapes"),
    Row("gnu long link escaping", lambda: _gnu(f("a"), hard("h", "../" * 60 + "etc/shadow")),
        UnsafePath, "hard-link target"),
    Row("NUL in name", lambda: tar((_pax("a\0b"), b"x")), UnsafePath, "NUL"),
    Row("component too long", lambda: tar(f("x" * 256)), UnsafePath, "longer than 255"),
    Row("device nodes", lambda: tar(d("dev"), (ti("dev/sda", tarfile.BLKTYPE, devmajor=8),
                                               None),
                                    (ti("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
                                     None)), None, check=_dev_read),  # fmt: skip
    Row("not a tar", lambda: b"\x00not a tar at all" * 64, InvalidInput, "damaged"),
    Row("truncated tar", lambda: TRUNCATED, InvalidInput, "truncated"),
    Row("truncated gzip", lambda: gz(GOOD)[:-20], InvalidInput, "truncated"),
    Row("corrupt gzip", lambda: flip(gz(tar(f("a", os.urandom(50_000))))), InvalidInput,
        "damaged"),
    Row("truncated zstd", lambda: zst(GOOD)[:-8], InvalidInput, "truncated"),
    Row("corrupt zstd", lambda: flip(zst(tar(f("a", os.urandom(50_000))))), InvalidInput,
        "damaged"),
    Row("truncated zstd, no checksum", lambda: zst_plain(GOOD)[:-3], InvalidInput,
        "truncated"),
    Row("zstd cut mid-stream", lambda: zst_plain(tar(f("a", os.urandom(200_000)),
                                                     f("b", b"b" * 100_000)))[:150_000],
        InvalidInput, "truncated"),  # fmt: skip
    Row("pax header bomb", lambda: raw_header(b"x", 1 << 32), InvalidInput, "pax header of"),
    Row("long name bomb", lambda: raw_header(b"L", 1 << 32), InvalidInput, "long name of"),
    Row("header bomb", lambda: zst(tar(*(f(f"e{i}", b"") for i in range(300)))),
        InvalidInput, "too many entries", limits=layertar.Limits(max_entries=256)),
    Row("gzip bomb", lambda: gz(zeros_tar(64 * MiB)()), InvalidInput, "decompression bomb",
        limits=SMALL),
    Row("zstd bomb", lambda: zst(zeros_tar(64 * MiB)()), InvalidInput, "decompression bomb",
        limits=SMALL),
    Row("padding bomb", lambda: gz(GOOD + bytes(64 * MiB)), InvalidInput,
        "decompression bomb", limits=SMALL),
    Row("huge size", lambda: tar((ti("a", size=1 << 50), None))[:2048], InvalidInput,
        "beyond the import budget"),
    Row("size beyond the blob", lambda: tar((ti("a", size=MiB), None))[:2048], InvalidInput,
        "truncated"),
]  # fmt: skip


def _gnu(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """GNU format: names over 100 bytes travel in ././@LongLink entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _pax(name: str) -> tarfile.TarInfo:
    info = ti("placeholder")
    info.pax_headers["path"] = name
    return info


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` with its type, mode, size and content hash."""
    out: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = ("absent",)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                h = ""
                if p.is_file() and not p.is_symlink():
                    h = hashlib.sha256(p.read_bytes()).hexdigest()
                out[str(p)] = (st.st_mode, st.st_size, h)
    return out


@pytest.fixture
def env(tmp_path: Path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("canary\n")
    store = Store(tmp_path / "store")
    watched = (canary, store.tmp, store.root / "images", store.root / "containers")

    def outside() -> dict[str, tuple]:
        # Everything in tmp_path except what a failed import may legitimately leave in the
        # store (objects and complete layers, for gc) and the blobs the test wrote itself.
        snap = snapshot(*watched)
        for p in tmp_path.iterdir():
            if p.name not in ("store", "canary", "blobs"):
                snap.update(snapshot(p))
        snap["tags"] = (json.dumps(store.tags(), sort_keys=True),)
        snap["/tmp/pwned"] = (os.path.lexists("/tmp/pwned"),)
        return snap

    return store, tmp_path, outside


def _layout(base: Path, layers: list[bytes]) -> Path:
    """An OCI layout whose image has `layers` (all descriptors and diff_ids honest)."""
    blobs = base / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    descs, diff_ids = [], []
    for blob in layers:
        descs.append({"mediaType": layertar.MEDIA_TAR, **put(blob)})
        try:
            raw = blobstream.decompressor(io.BytesIO(blob), blobstream.detect_compression(blob))
            diff_ids.append("sha256:" + hashlib.sha256(raw.read()).hexdigest())
        except Exception:
            diff_ids.append("sha256:" + hashlib.sha256(blob).hexdigest())  # damaged anyway
    config = put(json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
    manifest = put(json.dumps({"schemaVersion": 2, "mediaType": oci.MT_MANIFEST,
                               "config": {"mediaType": oci.MT_CONFIG, **config},
                               "layers": descs}).encode())  # fmt: skip
    (base / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (base / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": oci.MT_MANIFEST, **manifest,
         "annotations": {oci.REF_NAME: "hostile"}}]}))  # fmt: skip
    return base


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hostile_layer(row: Row, env, monkeypatch: pytest.MonkeyPatch) -> None:
    store, tmp_path, outside = env
    blob = row.blob()
    (tmp_path / "blobs").mkdir()
    path = tmp_path / "blobs" / "layer"
    path.write_bytes(blob)
    before = outside()

    if row.error is None:
        toc = store.load_toc(layertar.import_layer(store, path, limits=row.limits))
        assert row.check is not None
        row.check(toc)
    else:
        with pytest.raises(row.error, match=row.match) as info:
            layertar.import_layer(store, path, limits=row.limits)
        message = info.value.message
        assert "\n" not in message and message.startswith("layer ")
    assert store.images() == []
    assert outside() == before, "a hostile layer changed something outside the store"

    # The same layer on top of a good one, inside an image: no image appears on error.
    monkeypatch.setattr(layertar, "DEFAULT_LIMITS", row.limits)
    layout = _layout(tmp_path / "blobs" / "image", [GOOD, blob])
    before = outside()
    if row.error is None:
        image_id = oci.import_image(store, layout)
        assert store.tags() == {"image:hostile": image_id}
    else:
        with pytest.raises(row.error, match=row.match):
            _import_with_limits(store, layout, row.limits)
        assert store.images() == []
        assert outside() == before
    # The thread that inflates ahead of the parser never outlives an import.
    assert not [t for t in threading.enumerate() if t.name == "cowfs-layer-read"]


def _import_with_limits(store: Store, layout: Path, limits: layertar.Limits) -> str:
    original = layertar.import_layer

    def limited(*args, **kw):
        kw.setdefault("limits", limits)
        return original(*args, **kw)

    layertar.import_layer = limited
    try:
        return oci.import_image(store, layout)
    finally:
        layertar.import_layer = original


def test_sparse_bomb_refused_at_default_limits(env) -> None:
    """A sparse file claiming 100 GiB in a tiny archive: refused from its header."""
    need_tool("tar", "truncate")
    store, tmp_path, outside = env
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["truncate", "-s", "100G", str(src / "hole")], check=True)
    blob = tmp_path / "blobs"
    blob.mkdir()
    subprocess.run(["tar", "--sparse", "--format=posix", "-C", str(src), "-cf",
                    str(blob / "sparse.tar"), "hole"], check=True)  # fmt: skip
    (src / "hole").unlink()
    assert (blob / "sparse.tar").stat().st_size < MiB
    before = outside()
    with pytest.raises(InvalidInput, match="beyond the import budget"):
        layertar.import_layer(store, blob / "sparse.tar")
    assert outside() == before
