"""Tar layers in and out of the store.

Import reads one layer blob (uncompressed, gzip or zstd: detected by magic, not by media type)
as a stream, once: the sha256 of the blob and of the uncompressed tar (the diff_id) are computed
on the way through, file contents stream into the object store through a LayerBuilder, and
nothing is visible until the blob has been read to its end and both digests checked.

Reading of a layer, entry by entry (the OCI layer spec, with docker's choices where it is silent):

* names are cleaned by pathsafe ("./a", "/a" and "a" are the same entry; ".." that escapes is
  refused); an entry whose parent is a symlink or a non-directory *in the same layer* is refused
  (a tar extractor would write through the symlink, possibly out of the root); a path through a
  symlink of a *lower* layer (given `lowers`) is followed inside the root, as docker and umoci
  extract it ("bin/sh" over "bin -> usr/bin" is "usr/bin/sh"; see follow_lower_symlinks);
* `.wh.<name>` hides <name> of the layers below, `.wh..wh..opq` hides everything below in its
  directory; a whiteout of a whiteout (`.wh..wh.x`) is refused. A whiteout whose path also exists
  in the same layer only hides the lower layers: for a directory that is an opaque directory;
* duplicates: the later entry wins, as docker's extraction does; a non-directory that replaces a
  directory removes what the layer had put below it;
* hard links point at an earlier entry of the same layer (missing, directory or escaping targets
  are refused); every name of the link shares the target's inode metadata (one hard-link group);
* symlink targets are kept verbatim (they are resolved inside the container, never on the host);
* char/block devices and fifos are kept as entries (nothing is created on the host);
* xattrs come from PAX `SCHILY.xattr.<name>` (and libarchive's `LIBARCHIVE.xattr.<name>`);
* GNU and PAX sparse files are read with their holes as zeros (the store compresses them away);
* times: PAX mtime/atime/ctime keep nanoseconds; without PAX atime and ctime, they equal mtime.

Decompression bombs are refused by a size budget (see Limits): both the decompressed stream and
the sum of file sizes (sparse files count their full size) must stay within
max(Limits.floor, Limits.max_ratio * blob size). An entry whose declared size would exceed the
budget is refused from its header, before a byte of it is read. A layer may hold at most
Limits.max_entries entries (2 million), whiteouts included.

Export writes a deterministic tar: entries in tree order, PAX format, numeric owners, xattrs as
SCHILY.xattr, hard links as link entries to the first name of their group, whiteouts as
`.wh.` files and opaque directories as `.wh..wh..opq` right after the directory. Sockets are
left out (tar cannot carry them; docker skips them as well). Sparse files are written as plain
files: their holes become zeros, which the layer compression takes care of.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import os
import tarfile
from base64 import b64decode
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import BinaryIO, NamedTuple
from urllib.parse import unquote

import zstandard

from cowfs import pathsafe
from cowfs.blobstream import (
    GZIP_ERRORS,
    HashingReader,
    Peekable,
    Prefetcher,
    Progress,
    ZstdFrameCheck,
    decompressor,
    detect_compression,
    human,
)
from cowfs.errors import CowfsError, DigestMismatch, InvalidInput, UnsafePath
from cowfs.tarstream import TarMember, TarReader
from cowfs.toc import BLK, CHR, DIR, FIFO, REG, SOCK, SYMLINK, Entry, Toc, parents

WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_GZIP = MEDIA_TAR + "+gzip"
MEDIA_ZSTD = MEDIA_TAR + "+zstd"
MEDIA_BY_COMPRESSION = {None: MEDIA_TAR, "gzip": MEDIA_GZIP, "zstd": MEDIA_ZSTD}

_CHUNK = 1 << 20



@dataclass(frozen=True)
class Limits:
    """What an import may expand to, against decompression bombs (sparse ones included)."""

    max_ratio: int = 100  # uncompressed bytes per blob byte
    floor: int = 4 << 30  # any blob may expand to this much, whatever its ratio
    # Entries per layer: each costs memory in the TOC (a full Debian has ~300k files), and
    # millions of empty headers compress to next to nothing.
    max_entries: int = 2_000_000

    def budget(self, blob_size: int) -> int:
        return max(self.floor, self.max_ratio * blob_size)


DEFAULT_LIMITS = Limits()


class BlobInfo(NamedTuple):
    digest: str  # "sha256:..." of the blob as written
    size: int
    diff_id: str  # "sha256:..." of the uncompressed tar
    media_type: str


# -- import --------------------------------------------------------------------------------------


class _LayerReader:
    """State of one layer import: the entries so far and the builder they go into."""

    def __init__(self, lb, budget: int, what: str, max_entries: int) -> None:
        self.lb = lb
        self.entries_left = max_entries
        self.toc: Toc = lb.toc  # the builder's TOC, edited in place for duplicates and links
        self.budget = budget
        self.expanded = 0  # sum of regular file sizes, sparse ones at full size
        self.what = what
        self.next_link = 1
        # Paths known to be a directory or absent in this layer, so fine as parents; a
        # non-directory that replaces one of them empties it (see _replace).
        self._parents_ok: set[str] = set()

    # The one function that knows what a tar entry means.
    def apply(self, tar: TarReader, m: TarMember) -> None:
        self.entries_left -= 1
        if self.entries_left < 0:
            raise InvalidInput("too many entries in one layer (a header bomb?)")
        path = pathsafe.clean(m.name)
        name = path.rpartition("/")[2]
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(path)
            return
        self._check_parents(path)
        if m.islnk():
            self._hardlink(path, m)
            return
        entry = self._entry(path, m)
        self._replace(path, entry.kind)
        if entry.kind == REG:
            self._content(tar, m, entry)
        else:
            self.lb.add(entry)

    def _whiteout(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        self._check_parents(path)
        if name == WHITEOUT_OPAQUE:
            self.toc.opaque.add(parent)
            return
        hidden = name[len(WHITEOUT_PREFIX) :]
        if not hidden or hidden in (".", ".."):
            raise InvalidInput("whiteout without a name")
        if hidden.startswith(WHITEOUT_PREFIX):
            raise InvalidInput("whiteout of a whiteout")
        self.toc.whiteouts.add(pathsafe.join(parent, hidden))

    def _check_parents(self, path: str) -> None:
        """Stage two of path safety: no parent in this layer may be a symlink or a file."""
        parent = path.rpartition("/")[0]
        ok = self._parents_ok
        if parent in ok:  # most entries share their parent with the one before
            return
        entries = self.toc.entries
        for p in parents(path):
            e = entries.get(p)
            if e is None or e.kind == DIR:
                continue
            if e.kind == SYMLINK:
                raise UnsafePath(f"parent {p!r} is a symlink (writing through it could escape)")
            raise InvalidInput(f"parent {p!r} is not a directory")
        # Every ancestor goes in: replacing any of them by a non-directory must empty the set.
        ok.update(parents(path))

    def _entry(self, path: str, m: TarMember) -> Entry:
        if m.isreg():  # includes contiguous files and sparse files
            kind = REG
        elif m.isdir():
            kind = DIR
        elif m.issym():
            kind = SYMLINK
        elif m.ischr():
            kind = CHR
        elif m.isblk():
            kind = BLK
        elif m.isfifo():
            kind = FIFO
        else:
            raise InvalidInput(f"unsupported tar entry type {m.type!r}")
        if path == "" and kind != DIR:
            raise InvalidInput("the root is not a directory")
        mtime, atime, ctime = _times(m)
        entry = Entry(
            path=path, kind=kind, mode=m.mode & 0o7777, uid=m.uid, gid=m.gid,
            atime=atime, mtime=mtime, ctime=ctime, xattrs=_xattrs(m),
        )  # fmt: skip
        if kind == SYMLINK:
            entry.target = m.linkname
            entry.size = len(m.linkname.encode("utf-8", "surrogateescape"))
        elif kind in (CHR, BLK):
            entry.rdev = os.makedev(m.devmajor, m.devminor)
        return entry

    def _content(self, tar: TarReader, m: TarMember, entry: Entry) -> None:
        size = m.size
        if size < 0 or self.expanded + size > self.budget:
            raise InvalidInput(
                f"size {size} goes beyond the import budget of {human(self.budget)} "
                "(decompression bomb?)"
            )
        self.expanded += size
        counted = _ExactReader(tar.open(m), size)  # type: ignore[arg-type]
        self.lb.add(entry, counted)  # streams into the object store; sets digest and size
        counted.check()

    def _hardlink(self, path: str, m: TarMember) -> None:
        target = pathsafe.clean_link(m.linkname, entry=path)
        if target == path:
            if path in self.toc.entries:
                return  # a link to itself names what is already there
            raise InvalidInput(f"hard link to itself: {m.linkname!r}")
        t = self.toc.entries.get(target)
        if t is None:
            raise InvalidInput(f"hard link to {m.linkname!r}, which is not earlier in the layer")
        if t.kind == DIR:
            raise InvalidInput(f"hard link to the directory {m.linkname!r}")
        if not t.link:
            t.link = self.next_link
            self.next_link += 1
        alias = copy.copy(t)
        alias.path = path
        if t.xattrs:
            alias.xattrs = dict(t.xattrs)
        self._replace(path, alias.kind)
        self.toc.add(alias)  # same content as its target: nothing to store

    def _replace(self, path: str, kind: str) -> None:
        """Later entry wins (docker): a non-directory over a directory removes what was below."""
        entries = self.toc.entries
        if kind != DIR and path in self._parents_ok:
            self._parents_ok.clear()
        old = entries.get(path)
        if old is not None and old.kind == DIR and kind != DIR:
            prefix = path + "/"
            for p in [p for p in entries if p.startswith(prefix)]:
                del entries[p]

    def finish(self, lower: Lookup | None = None) -> Toc:
        """Normalise what the stream order left behind; the TOC the layer is made of.

        `lower` looks paths up in the merged layers below, for paths that go through a
        symlink there (see follow_lower_symlinks)."""
        toc = self.toc
        if lower is not None:
            follow_lower_symlinks(toc, lower)
        for path in list(toc.whiteouts):
            e = toc.entries.get(path)
            if e is not None:
                # A whiteout of something the same layer adds hides only the lower layers.
                toc.whiteouts.discard(path)
                if e.kind == DIR:
                    toc.opaque.add(path)
        for path in toc.opaque:
            e = toc.entries.get(path)
            if e is not None and e.kind != DIR:
                raise InvalidInput(f"opaque whiteout inside {path!r}, which is not a directory")
        # A hard-link group that lost members to duplicates may be down to one name.
        counts: dict[int, int] = {}
        for e in toc.entries.values():
            if e.link:
                counts[e.link] = counts.get(e.link, 0) + 1
        renumber: dict[int, int] = {}
        for e in sorted(toc.entries.values(), key=lambda e: e.path):
            if e.link:
                if counts[e.link] < 2:
                    e.link = 0
                else:
                    e.link = renumber.setdefault(e.link, len(renumber) + 1)
        return toc


Lookup = Callable[[str], "Entry | None"]
MAX_SYMLINKS = 40  # as Linux's path walk


def resolve_parents(path: str, lookup: Lookup) -> str:
    """`path` with every symlink among its parents followed, inside the root.

    The way tar extraction onto a root filesystem reads a path (securejoin, as docker and umoci
    do it): an absolute target starts again at the image root, ".." stops at the root, and the
    last component is not followed. Pure: `lookup` answers what is at a path.
    """
    *dirs, last = path.split("/")
    todo = dirs[::-1]  # a stack of components still to walk
    out: list[str] = []
    links = 0
    while todo:
        c = todo.pop()
        if c in ("", "."):
            continue
        if c == "..":
            if out:
                out.pop()
            continue
        out.append(c)
        e = lookup("/".join(out))
        if e is not None and e.kind == SYMLINK:
            links += 1
            if links > MAX_SYMLINKS:
                raise UnsafePath(f"{path!r}: too many levels of symbolic links")
            out.pop()
            if e.target.startswith("/"):
                out = []
            todo.extend(reversed(e.target.split("/")))
    return "/".join([*out, last])


def follow_lower_symlinks(toc: Toc, lower: Lookup) -> None:
    """Move entries whose path goes through a symlink of a lower layer to where that symlink
    leads (inside the root), as extracting the layer onto the rootfs would put them.

    A layer that adds "bin/sh" over a lower "bin -> usr/bin" means "usr/bin/sh". Only paths with
    a parent the layer itself does not have are looked at, so the lower layers are consulted
    (and merged) only for such layers. Where a moved entry meets one the layer names itself,
    the layer's own one stays.
    """
    own = toc.entries

    def lookup(p: str) -> Entry | None:
        e = own.get(p)
        return e if e is not None else lower(p)

    def needs(path: str) -> bool:
        return any(p not in own for p in parents(path) if p)

    dirs: dict[str, str] = {}  # directory -> where it really is (all of it followed)

    def resolve(path: str) -> str:
        parent, _, name = path.rpartition("/")
        real = dirs.get(parent)
        if real is None:
            real = dirs[parent] = resolve_parents(parent + "/x", lookup)[:-2]
        return f"{real}/{name}" if real else name

    moves = {p: resolve(p) for p in list(own) if needs(p)}
    for old, new in moves.items():
        if new != old and new not in own:
            e = own.pop(old)
            e.path = new
            own[new] = e
        elif new != old:
            del own[old]
    toc.whiteouts = {resolve(w) if needs(w) else w for w in toc.whiteouts}
    # An opaque marker sits inside its directory: the directory itself is followed too.
    toc.opaque = {resolve(d + "/x")[:-2] if d and needs(d + "/x") else d for d in toc.opaque}


class _ExactReader(io.RawIOBase):
    """A member's content that must be exactly `size` bytes: a short one is a truncation."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.count += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def check(self) -> None:
        if self.count != self.size:
            raise InvalidInput(f"truncated content ({self.count} of {self.size} bytes)")


def _times(m: TarMember) -> tuple[int, int, int]:
    pax = m.pax_headers
    mtime = _ns(pax.get("mtime")) if "mtime" in pax else int(m.mtime) * 1_000_000_000
    atime = _ns(pax["atime"]) if "atime" in pax else mtime
    ctime = _ns(pax["ctime"]) if "ctime" in pax else mtime
    return mtime, atime, ctime


def _ns(value: str) -> int:
    try:
        return int(Decimal(value) * 1_000_000_000)
    except ArithmeticError:
        raise InvalidInput(f"bad PAX time {value!r}") from None


def _xattrs(m: TarMember) -> dict[str, bytes] | None:
    out: dict[str, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            try:
                out[unquote(key[len("LIBARCHIVE.xattr.") :])] = b64decode(value + "==")
            except ValueError:
                raise InvalidInput(f"bad libarchive xattr {key!r}") from None
    return out or None


def read_layer(
    lb, f: BinaryIO, *, blob_size: int | None, limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None, what: str = "layer", lower: Lookup | None = None,
) -> tuple[Toc, str, str, str | None]:  # fmt: skip
    """Read one layer blob from `f` into `lb`; (toc, blob digest, diff_id, compression).

    `lb` is the store's LayerBuilder the entries go into; `lower` looks paths up in the merged
    layers below (None: a bottom layer). Raises InvalidInput (UnsafePath for escaping names)
    naming the entry at fault.
    """
    head = f.read(4)
    compression = detect_compression(head)
    # An uncompressed blob is its own diff: hash it once, as the diff.
    raw = HashingReader(f, None, what, progress, hashing=compression is not None)
    frames = ZstdFrameCheck() if compression == "zstd" else None
    if frames is not None:
        raw.observe = frames.feed
    if compression is not None:
        raw._account(head)
    elif progress is not None:
        progress(len(head))
    if compression is None:
        budget = None  # an uncompressed stream is its own size; sparse files are counted below
    else:
        if blob_size is None:
            raise InvalidInput(f"{what}: compressed blob of unknown size")
        budget = limits.budget(blob_size)
    inflated = decompressor(Peekable(head, raw), compression)  # type: ignore[arg-type]
    diff = HashingReader(inflated, budget, what)
    # Reading, inflating and both sha256s run on a thread (they drop the GIL): this thread
    # only parses the tar and hands contents to the store.
    stream = Prefetcher(diff)  # type: ignore[arg-type]
    state = _LayerReader(lb, limits.budget(blob_size or 0), what, limits.max_entries)
    where = ""
    try:
        reader = TarReader(stream)  # type: ignore[arg-type]
        members = iter(reader)
        last = None
        while True:
            where = f" after {last.name!r}" if last is not None else ""
            member = next(members, None)
            if member is None:
                break
            where = f" at {member.name!r}"
            state.apply(reader, member)
            last = member
        where = ""
        reader.drain()
        raw.drain()
        if frames is not None and not frames.complete():
            raise InvalidInput("damaged or truncated archive (zstd stream ends inside a frame)")
        if last is None and not reader.ended:
            raise InvalidInput("empty archive")
        toc = state.finish(lower)
    except CowfsError as exc:
        raise type(exc)(f"{what}{where}: {exc.message}") from None
    except (OSError, EOFError, *GZIP_ERRORS, zstandard.ZstdError) as exc:
        raise InvalidInput(f"{what}{where}: damaged or truncated archive ({_why(exc)})") from None
    finally:
        stream.close()
    blob_digest = raw.digest() if compression is not None else diff.digest()
    return toc, blob_digest, diff.digest(), compression


def _why(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def import_layer(
    store, blob_path: str | os.PathLike | BinaryIO, *, media_type: str | None = None,
    expect_digest: str | None = None, expect_diff_id: str | None = None,
    progress: Progress | None = None, limits: Limits = DEFAULT_LIMITS,
    blob_size: int | None = None, lowers: Sequence[str] = (),
) -> str:  # fmt: skip
    """Import one layer blob into the store; returns the layer id.

    Idempotent: a layer already known by `expect_digest` or `expect_diff_id` is not read again.
    The blob digest and diff_id are verified against what is expected and recorded in the
    layer's meta. `blob_path` may also be an open binary file (then give `blob_size` when the
    blob may be compressed, for the bomb budget). `lowers` are the ids of the layers it goes
    on (bottom first): paths through their symlinks are followed as docker would (see
    follow_lower_symlinks). Nothing is visible unless this returns.
    """
    for known in (expect_digest, expect_diff_id):
        if known:
            layer_id = store.layer_by_digest(known)
            if layer_id is not None:
                return layer_id
    if isinstance(blob_path, (str, os.PathLike)):
        what = f"layer {os.fspath(blob_path)}"
        try:
            f = open(blob_path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise InvalidInput(f"cannot read {what}: {exc.strerror}") from None
        blob_size = os.fstat(f.fileno()).st_size
    else:
        f = blob_path
        what = f"layer {expect_digest[:19]}" if expect_digest else "layer"
    try:
        with store.new_layer() as lb:
            _, digest, diff_id, compression = read_layer(
                lb, f, blob_size=blob_size, limits=limits, progress=progress, what=what,
                lower=_lower_lookup(store, lowers) if lowers else None,
            )
            if expect_digest and digest != expect_digest:
                raise DigestMismatch(f"{what}: blob is {digest}, expected {expect_digest}")
            if expect_diff_id and diff_id != expect_diff_id:
                raise DigestMismatch(f"{what}: diff_id is {diff_id}, expected {expect_diff_id}")
            blob_type = media_type or MEDIA_BY_COMPRESSION[compression]
            return lb.commit(diff_id=diff_id, blobs={digest: blob_type})
    finally:
        if f is not blob_path:
            f.close()


def _lower_lookup(store, lowers: Sequence[str]) -> Lookup:
    """Lookups in the merged view of `lowers`, merged on first use (most layers never ask)."""
    from cowfs.index import merge

    merged: list = []

    def lookup(path: str) -> Entry | None:
        if not merged:
            merged.append(merge([store.load_toc(x) for x in lowers]))
        return merged[0].get(path)

    return lookup


def rebase_layers(store, layer_ids: Sequence[str]) -> list[str]:
    """`layer_ids` (bottom first) with every layer's paths through lower symlinks followed.

    For layers imported without `lowers` (in parallel, as a registry pull does): a layer whose
    paths all have their parents in the layer itself (the usual case) is kept as it is, and
    costs a scan of its TOC; another is stored again, rewritten, as a new layer (same objects,
    no OCI digests: it is not the tar it came from). Idempotent.
    """
    out: list[str] = []
    for i, layer_id in enumerate(layer_ids):
        toc = store.load_toc(layer_id)
        own = toc.entries
        paths = [*own, *toc.whiteouts, *(d + "/x" for d in toc.opaque if d)]
        if i == 0 or all(p in own for q in paths for p in parents(q) if p):
            out.append(layer_id)
            continue
        moved = Toc(entries={p: copy.copy(e) for p, e in own.items()},
                    whiteouts=set(toc.whiteouts), opaque=set(toc.opaque))  # fmt: skip
        follow_lower_symlinks(moved, _lower_lookup(store, tuple(out)))
        if moved.layer_id() == layer_id:
            out.append(layer_id)
            continue
        with store.new_layer() as lb:
            for e in moved.entries.values():
                lb.toc.add(e)  # contents are stored already: the same objects
            lb.toc.whiteouts, lb.toc.opaque = moved.whiteouts, moved.opaque
            out.append(lb.commit())
    return out


# -- export --------------------------------------------------------------------------------------


def _tree_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) if path else ()


def tar_items(toc: Toc) -> list[tuple[str, Entry | None]]:
    """(tar name, entry) in export order; entry None for whiteout files (opaque included)."""
    items: list[tuple[tuple[str, ...], str, Entry | None]] = []
    for path, e in toc.entries.items():
        if e.kind == SOCK:
            continue  # tar has no sockets; docker skips them too (they are runtime objects)
        items.append((_tree_key(path), path, e))
    for path in toc.opaque:
        # "\0" sorts the marker right after its directory, before its children: an extractor
        # that applies it in stream order must not remove what this layer puts there.
        items.append((_tree_key(path) + ("\0",), pathsafe.join(path, WHITEOUT_OPAQUE), None))
    for path in toc.whiteouts:
        parent, _, name = path.rpartition("/")
        wh = pathsafe.join(parent, WHITEOUT_PREFIX + name)
        items.append((_tree_key(wh), wh, None))
    items.sort(key=lambda t: t[0])
    return [(name, e) for _, name, e in items]


_TAR_TYPES = {
    REG: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE, CHR: tarfile.CHRTYPE,
    BLK: tarfile.BLKTYPE, FIFO: tarfile.FIFOTYPE,
}  # fmt: skip


def _tarinfo(name: str, e: Entry | None) -> tarfile.TarInfo:
    if e is None:  # a whiteout file: empty, root-owned, no time (deterministic)
        info = tarfile.TarInfo(name)
        info.mode = 0o644
        info.mtime = 0
        return info
    info = tarfile.TarInfo((name + "/") if e.kind == DIR and name else (name or "./"))
    info.type = _TAR_TYPES[e.kind]
    info.mode = e.mode
    info.uid, info.gid = e.uid, e.gid
    info.uname = info.gname = ""
    seconds, ns = divmod(e.mtime, 1_000_000_000)
    info.mtime = seconds
    if ns:
        info.pax_headers["mtime"] = _pax_time(e.mtime)
    # atime and ctime only when they say something (GNU tar's posix format carries them), so
    # that a layer read from such a tar exports and re-imports as the same layer.
    if e.atime != e.mtime:
        info.pax_headers["atime"] = _pax_time(e.atime)
    if e.ctime != e.mtime:
        info.pax_headers["ctime"] = _pax_time(e.ctime)
    if e.kind == REG:
        info.size = e.size
    elif e.kind == SYMLINK:
        info.linkname = e.target
    elif e.kind in (CHR, BLK):
        info.devmajor, info.devminor = os.major(e.rdev), os.minor(e.rdev)
    for key, value in sorted((e.xattrs or {}).items()):
        info.pax_headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    return info


def _pax_time(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    return f"{seconds}.{frac:09d}" if frac else str(seconds)


Opener = Callable[[Entry], BinaryIO]


def write_tar(toc: Toc, out: BinaryIO, open_content: Opener,
              progress: Progress | None = None) -> None:  # fmt: skip
    """Write `toc` as a deterministic tar to `out`; contents come from open_content(entry).

    `progress` is called with the bytes of file content written."""
    first_of_group: dict[int, str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape", bufsize=_CHUNK) as tar:  # fmt: skip
        for name, e in tar_items(toc):
            info = _tarinfo(name, e)
            if e is not None and e.link and e.kind != DIR:
                first = first_of_group.get(e.link)
                if first is not None:
                    info.type = tarfile.LNKTYPE
                    info.linkname = first
                    info.size = 0
                    tar.addfile(info)
                    continue
                first_of_group[e.link] = name
            if e is not None and e.kind == REG and e.size:
                with open_content(e) as f:
                    tar.addfile(info, _ExactSize(f, e.size, e.path, progress))
            else:
                tar.addfile(info)


class _ExactSize(io.RawIOBase):
    """Content handed to tarfile; an object shorter than its entry says is corruption."""

    def __init__(self, f: BinaryIO, size: int, path: str, progress: Progress | None) -> None:
        self.f, self.left, self.path, self.progress = f, size, path, progress

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(self.left if size < 0 else min(size, self.left))
        if not data and self.left:
            raise InvalidInput(f"{self.path!r}: stored content is shorter than its size")
        self.left -= len(data)
        if self.progress is not None:
            self.progress(len(data))
        return data


class _HashingWriter(io.RawIOBase):
    def __init__(self, f: BinaryIO | None) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.count += len(data)
        if self.f is not None:
            self.f.write(data)
        return len(data)

    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def write_blob(
    toc: Toc, out: BinaryIO | None, open_content: Opener, *, compression: str | None = "gzip",
    progress: Progress | None = None,
) -> BlobInfo:  # fmt: skip
    """Write `toc` as a layer blob to `out` (None: only compute the digests)."""
    if compression not in MEDIA_BY_COMPRESSION:
        raise InvalidInput(f"unknown compression {compression!r} (gzip, zstd or none)")
    blob = _HashingWriter(out)
    if compression == "gzip":
        # mtime=0 and no file name: the same layer gives the same bytes every time.
        z = gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0, compresslevel=6)
        diff = _HashingWriter(z)  # type: ignore[arg-type]
        write_tar(toc, diff, open_content, progress)  # type: ignore[arg-type]
        z.close()
    elif compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=3, write_content_size=False)
        z = cctx.stream_writer(blob, closefd=False)  # type: ignore[arg-type]
        diff = _HashingWriter(z)  # type: ignore[arg-type]
        write_tar(toc, diff, open_content, progress)  # type: ignore[arg-type]
        z.flush(zstandard.FLUSH_FRAME)
    else:
        diff = blob
        write_tar(toc, diff, open_content, progress)  # type: ignore[arg-type]
    return BlobInfo(blob.digest(), blob.count, diff.digest(), MEDIA_BY_COMPRESSION[compression])


def export_layer(
    store, layer_id: str, out_path: str | os.PathLike | BinaryIO, *,
    compression: str | None = "gzip", progress: Progress | None = None,
) -> BlobInfo:  # fmt: skip
    """Write a stored layer as a tar blob (gzip, zstd or uncompressed) to a path or file.

    `progress` is called with the bytes of file content written (they add up to the layer's
    meta size)."""
    toc = store.load_toc(layer_id)
    opener = _store_opener(store)
    if isinstance(out_path, (str, os.PathLike)):
        with open(out_path, "wb") as f:
            return write_blob(toc, f, opener, compression=compression, progress=progress)
    return write_blob(toc, out_path, opener, compression=compression, progress=progress)


def _store_opener(store) -> Opener:
    def open_content(e: Entry) -> BinaryIO:
        return _ObjectStream(store.objects.open(e.digest))

    return open_content


class _ObjectStream(io.RawIOBase):
    """A stored object read front to back as a file."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self.reader.size - self.pos
        data = self.reader.pread(min(size, _CHUNK), self.pos)
        self.pos += len(data)
        return data if isinstance(data, bytes) else bytes(data)

    def close(self) -> None:
        self.reader.close()
        super().close()


def host_opener(root: str | os.PathLike) -> Opener:
    """Contents of a TOC that describes the host directory `root`."""

    def open_content(e: Entry) -> BinaryIO:
        return open(os.path.join(root, e.path), "rb")

    return open_content
