"""The streaming tar reader against Python's tarfile and GNU tar as oracles."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from cowfs.errors import InvalidInput
from cowfs.tarstream import TarReader
from tests.conftest import need_root, need_tool
from tests.test_layertar import make_tree


class Trickle(io.RawIOBase):
    """A stream that hands out at most `n` bytes per read (short reads must be handled)."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.pos, self.n = data, 0, n

    def read(self, size: int = -1) -> bytes:
        size = self.n if size < 0 else min(size, self.n)
        out = self.data[self.pos : self.pos + size]
        self.pos += len(out)
        return out


def ours(data: bytes, chunk: int = 1 << 20) -> list[tuple]:
    r = TarReader(Trickle(data, chunk))  # type: ignore[arg-type]
    out = []
    for m in r:
        digest = ""
        if m.isreg():
            digest = hashlib.sha256(r.open(m).read()).hexdigest()
        xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        out.append((m.name.rstrip("/"), m.type if m.type != b"\x00" else b"0", m.mode, m.uid,
                    m.gid, int(m.mtime), m.size if m.isreg() else 0, m.linkname, m.devmajor,
                    m.devminor, digest, xattrs))  # fmt: skip
    return out


def theirs(data: bytes) -> list[tuple]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as t:  # fmt: skip
        for m in t:
            digest = ""
            if m.isreg():
                digest = hashlib.sha256(t.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
            typ = m.type
            if typ == tarfile.AREGTYPE or typ == tarfile.CONTTYPE:
                typ = tarfile.REGTYPE
            if m.issparse():
                typ = b"S"
            xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            out.append((m.name.rstrip("/"), typ, m.mode, m.uid, m.gid, int(m.mtime),
                        m.size if m.isreg() else 0, m.linkname, m.devmajor, m.devminor, digest,
                        xattrs))  # fmt: skip
    return out


def normal(rows: list[tuple]) -> list[tuple]:
    return [(r[0], b"0" if r[1] == b"7" else r[1], *r[2:]) for r in rows]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_root()
    root = tmp_path_factory.mktemp("tarstream") / "src"
    root.mkdir()
    make_tree(root)
    with open(root / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"tail")
    return root


@pytest.mark.parametrize("fmt", ["posix", "gnu", "oldgnu", "ustar", "v7"])
def test_gnu_tar_formats_read_as_tarfile_reads_them(tree: Path, tmp_path: Path, fmt: str) -> None:
    need_tool("tar")
    args = ["--xattrs", "--xattrs-include=*"] if fmt == "posix" else []
    if fmt in ("posix", "gnu", "oldgnu"):
        args.append("--sparse")
    src = tree
    if fmt in ("ustar", "v7"):  # no long names or non-UTF-8 in these: a plain subtree
        src = tmp_path / "plain"
        (src / "d").mkdir(parents=True)
        (src / "d/f").write_bytes(b"plain" * 999)
        os.symlink("d/f", src / "l")
        os.link(src / "d/f", src / "h")
    blob = tmp_path / "t.tar"
    subprocess.run(["tar", f"--format={fmt}", *args, "-C", str(src), "-cf", str(blob), "."],
                   check=True, capture_output=True)  # fmt: skip
    data = blob.read_bytes()
    want = normal(theirs(data))
    assert len(want) > 3
    assert normal(ours(data)) == want
    assert normal(ours(data, chunk=1000)) == want  # short reads


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_python_tarfile_formats(tmp_path: Path, fmt: int) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, kind, extra in [
            ("d", tarfile.DIRTYPE, {}),
            ("d/f", tarfile.REGTYPE, {"uid": 1 << 22 if fmt != tarfile.USTAR_FORMAT else 7}),
            ("d/" + "n" * 150 if fmt != tarfile.USTAR_FORMAT else "d/" + "n" * 90,
             tarfile.REGTYPE, {"mtime": -5 if fmt == tarfile.GNU_FORMAT else 5}),
            ("dev", tarfile.BLKTYPE, {"devmajor": 8, "devminor": 17}),
            ("link", tarfile.SYMTYPE, {"linkname": "d/f"}),
        ]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type = kind
            for k, v in extra.items():
                setattr(info, k, v)
            data = name.encode() * 3 if kind == tarfile.REGTYPE else None
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data else None)
    data = buf.getvalue()
    assert ours(data) == theirs(data)


def test_global_pax_header_applies_to_later_entries() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"uid": "4242", "comment": "from git archive"}) as t:  # fmt: skip
        info = tarfile.TarInfo("f")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    [m] = list(TarReader(io.BytesIO(buf.getvalue())))  # type: ignore[arg-type]
    assert m.uid == 4242


BAD = [
    ("bad checksum", lambda d: d[:10] + b"X" + d[11:], "bad header checksum"),
    ("cut in a header", lambda d: d[:2660], "ends inside a header"),
    ("cut in content", lambda d: d[:1100], "ends inside"),
    ("huge pax header", lambda d: _header(b"x", 1 << 30), "pax header of"),
    ("huge long name", lambda d: _header(b"L", 1 << 30), "long name of"),
    ("bad number", lambda d: _header(b"0", 0, size_field=b"12z4567\0\0\0\0\0"), "bad number"),
    ("negative size", lambda d: _header(b"0", 0, size_field=b"\xff" * 12), "negative size"),
]


def _header(typ: bytes, size: int, size_field: bytes | None = None) -> bytes:
    h = bytearray(512)
    h[0:4] = b"name"
    h[100:108] = b"0000644\0"
    h[124:136] = size_field or f"{size:011o}\0".encode()
    h[156:157] = typ
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h) + bytes(1024)


@pytest.mark.parametrize(("name", "mangle", "why"), BAD, ids=[b[0] for b in BAD])
def test_damage_is_refused(name: str, mangle, why: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo("file")
        info.size = 2000
        t.addfile(info, io.BytesIO(b"z" * 2000))
    data = mangle(buf.getvalue())
    with pytest.raises(InvalidInput, match=why):
        r = TarReader(io.BytesIO(data))  # type: ignore[arg-type]
        for m in r:
            if m.isreg():
                r.open(m).read()
