"""Layer TOC (table of contents): all metadata of one read-only layer, kept in memory.

A TOC lists every entry of a layer (type, mode, owner, times in ns, size, xattrs, symlink target,
device numbers, hard-link group, content digest) plus its whiteouts and opaque directories. Paths
are relative to the layer root, '/'-separated, cleaned, without leading or trailing slash; the root
itself is ''. Names that are not UTF-8 are carried as str with surrogateescape, as os does.

On disk a TOC is canonical JSON (entries sorted by path), zstd-compressed, behind a header with an
xxh128 checksum of the JSON: a flipped byte is a Corruption error, never a wrong tree. The layer id
is the sha256 of that canonical JSON, so equal layers have equal ids wherever they were imported.

This module is pure: it does no I/O beyond the bytes it is given.
"""

from __future__ import annotations

import binascii  # base64 and json would load re (and enum): ~10 ms of a daemon's start
import stat

import xxhash

from cowfs import fastjson
from cowfs import zstd as zstandard
from cowfs.errors import Corruption, InvalidInput
from cowfs.record import SlotsRecord, field, record

TYPE_CHECKING = False  # annotations only (docs/ARCHITECTURE.md, "The start path")
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

# Entry kinds: one letter each, as `find -printf %y` spells them.
REG, DIR, SYMLINK, CHR, BLK, FIFO, SOCK = "f", "d", "l", "c", "b", "p", "s"
KINDS = (REG, DIR, SYMLINK, CHR, BLK, FIFO, SOCK)

_KIND_TO_IFMT = {
    REG: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    CHR: stat.S_IFCHR,
    BLK: stat.S_IFBLK,
    FIFO: stat.S_IFIFO,
    SOCK: stat.S_IFSOCK,
}
_IFMT_TO_KIND = {v: k for k, v in _KIND_TO_IFMT.items()}

TOC_MAGIC = b"COWTOC1\n"
TOC_VERSION = 1


def _sha256(data: bytes) -> str:
    # Imported here: a FUSE daemon loads TOCs from the index cache, and never needs hashlib
    # (OpenSSL: ~3 ms of every container's start).
    import hashlib

    return hashlib.sha256(data).hexdigest()


class Entry(SlotsRecord):
    """One file, directory, link or special file of a layer."""

    __slots__ = ("path", "kind", "mode", "uid", "gid", "atime", "mtime", "ctime", "size",
                 "digest", "target", "rdev", "link", "xattrs")  # fmt: skip

    def __init__(
        self,
        path: str,
        kind: str,
        mode: int = 0o644,  # permission bits only (07777): the type is `kind`
        uid: int = 0,
        gid: int = 0,
        atime: int = 0,  # ns since the epoch
        mtime: int = 0,
        ctime: int = 0,
        size: int = 0,
        digest: str = "",  # xxh128 hex of the content of a regular file; "" when empty
        target: str = "",  # symlink target
        rdev: int = 0,  # os.makedev(major, minor) for CHR/BLK
        link: int = 0,  # hard-link group within the layer (0: not hard-linked)
        xattrs: dict[str, bytes] | None = None,
    ) -> None:
        self.path, self.kind, self.mode, self.uid, self.gid = path, kind, mode, uid, gid
        self.atime, self.mtime, self.ctime, self.size = atime, mtime, ctime, size
        self.digest, self.target, self.rdev, self.link = digest, target, rdev, link
        self.xattrs = xattrs

    @property
    def st_mode(self) -> int:
        return _KIND_TO_IFMT[self.kind] | self.mode

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def parent(self) -> str:
        return self.path.rpartition("/")[0]

    def is_dir(self) -> bool:
        return self.kind == DIR

    def to_row(self) -> list:
        xattrs = None
        if self.xattrs:
            xattrs = {k: binascii.b2a_base64(v, newline=False).decode()
                      for k, v in sorted(self.xattrs.items())}  # fmt: skip
        return [
            self.path, self.kind, self.mode, self.uid, self.gid, self.atime, self.mtime,
            self.ctime, self.size, self.digest, self.target, self.rdev, self.link, xattrs,
        ]  # fmt: skip

    @classmethod
    def from_row(cls, row: list) -> Entry:
        (path, kind, mode, uid, gid, atime, mtime, ctime, size, digest, target, rdev, link,
         xattrs) = row  # fmt: skip
        if xattrs:
            xattrs = {k: binascii.a2b_base64(v) for k, v in xattrs.items()}
        return cls(path, kind, mode, uid, gid, atime, mtime, ctime, size, digest, target, rdev,
                   link, xattrs or None)  # fmt: skip


def kind_of_mode(st_mode: int) -> str:
    try:
        return _IFMT_TO_KIND[stat.S_IFMT(st_mode)]
    except KeyError:
        raise InvalidInput(f"unknown file type {oct(stat.S_IFMT(st_mode))}") from None


def entry_from_stat(path: str, st, **extra) -> Entry:  # st: os.stat_result
    kind = kind_of_mode(st.st_mode)
    return Entry(
        path=path,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        atime=st.st_atime_ns,
        mtime=st.st_mtime_ns,
        ctime=st.st_ctime_ns,
        size=st.st_size if kind in (REG, SYMLINK) else 0,
        rdev=st.st_rdev if kind in (CHR, BLK) else 0,
        **extra,
    )


@record
class Toc:
    """Every entry of one layer, plus what it hides in the layers below."""

    entries: dict[str, Entry] = field(default_factory=dict)
    whiteouts: set[str] = field(default_factory=set)  # paths deleted from lower layers
    opaque: set[str] = field(default_factory=set)  # dirs whose lower contents are hidden

    def add(self, entry: Entry) -> None:
        self.entries[entry.path] = entry

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def digests(self) -> set[str]:
        return {e.digest for e in self.entries.values() if e.kind == REG and e.digest}

    def content_size(self) -> int:
        """Bytes of file content, counting each hard-link group once."""
        seen: set[int] = set()
        total = 0
        for e in self.entries.values():
            if e.kind != REG:
                continue
            if e.link:
                if e.link in seen:
                    continue
                seen.add(e.link)
            total += e.size
        return total

    # -- serialisation -------------------------------------------------------------------------

    def canonical_json(self) -> bytes:
        doc = {
            "version": TOC_VERSION,
            "entries": [self.entries[p].to_row() for p in sorted(self.entries)],
            "whiteouts": sorted(self.whiteouts),
            "opaque": sorted(self.opaque),
        }
        # ensure_ascii keeps surrogate-escaped (non-UTF-8) names representable.
        return fastjson.dumps(doc, separators=(",", ":")).encode()

    def layer_id(self) -> str:
        return _sha256(self.canonical_json())

    def dumps(self) -> tuple[bytes, str]:
        """The on-disk bytes and the layer id."""
        payload = self.canonical_json()
        packed = zstandard.ZstdCompressor(level=9).compress(payload)
        blob = TOC_MAGIC + xxhash.xxh128_digest(payload) + packed
        return blob, _sha256(payload)

    @classmethod
    def loads(cls, blob: bytes, *, expect_id: str | None = None) -> Toc:
        if not blob.startswith(TOC_MAGIC) or len(blob) < len(TOC_MAGIC) + 16:
            raise Corruption("TOC header is damaged")
        checksum = blob[len(TOC_MAGIC) : len(TOC_MAGIC) + 16]
        try:
            payload = zstandard.ZstdDecompressor().decompress(blob[len(TOC_MAGIC) + 16 :])
        except zstandard.ZstdError as exc:
            raise Corruption(f"TOC does not decompress: {exc}") from None
        if xxhash.xxh128_digest(payload) != checksum:
            raise Corruption("TOC checksum mismatch")
        if expect_id is not None and _sha256(payload) != expect_id:
            raise Corruption(f"TOC does not hash to its layer id {expect_id[:12]}")
        doc = fastjson.loads(payload)
        if doc.get("version") != TOC_VERSION:
            raise Corruption(f"unsupported TOC version {doc.get('version')!r}")
        toc = cls()
        from_row = Entry.from_row
        toc.entries = {row[0]: from_row(row) for row in doc["entries"]}
        toc.whiteouts = set(doc["whiteouts"])
        toc.opaque = set(doc["opaque"])
        return toc


def parents(path: str) -> Iterable[str]:
    """'a/b/c' -> 'a/b', 'a', '' (nearest first)."""
    while path:
        path = path.rpartition("/")[0]
        yield path
