"""The merged index: an image's layer TOCs folded into one in-memory view of the lower tree.

Layers are given bottom first; a higher layer wins ("topmost entry wins"). Per layer, its
opaque directories and whiteouts are applied to what the layers below left, then its entries are
added; an entry that replaces a directory by a non-directory drops the whole subtree.

The result answers every lookup of the union filesystem without touching a layer on disk:

- `entries[path]`: the visible Entry, `layer[path]`: the number of the layer it comes from;
- `children[dir]`: names in sorted (bytewise-by-str) order, so readdir is deterministic;
- `ino[path]`: a stable inode number: the position of the path in sorted order (root = 1), shared
  by every path of a hard-link group. The same layers give the same numbers on every mount;
- `aliases[ino]`: the paths of hard-link groups with more than one visible member;
- `nlink[path]`: 2 + subdirectories for directories, the group size for files.

Building the index is pure. `dumps()`/`loads()` give the per-image cache format: one marshal
record per directory (its children's entry columns, layers, inode numbers, link counts) behind a
table of directory offsets and record checksums, the table checksummed itself. `loads()` checks
and reads only the table; a directory's record is checked and decoded on the first lookup below
it, so mounting a 60k-entry image costs about a millisecond (a FUSE daemon does it on the way to
a container's first instruction) and a container touches only the directories it uses.
"""

from __future__ import annotations

import _thread
import marshal
import mmap
import os
import struct

import xxhash

from cowfs.errors import Corruption
from cowfs.record import field, record
from cowfs.toc import DIR, Entry, Toc

TYPE_CHECKING = False  # annotations only (docs/ARCHITECTURE.md, "The start path")
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any, NoReturn

INDEX_MAGIC = b"COWIDX4\n"
# Bumped whenever the merge or numbering rules change, so stale caches are never used.
INDEX_VERSION = 4
ROOT_INO = 1


@record
class MergedIndex:
    """The mappings are read-only once built. From `loads()` they are lazy (see `_Lazy`)."""

    entries: dict[str, Entry] = field(default_factory=dict)
    layer: dict[str, int] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    ino: dict[str, int] = field(default_factory=dict)
    nlink: dict[str, int] = field(default_factory=dict)
    aliases: dict[int, list[str]] = field(default_factory=dict)
    count: int | None = None  # len() without decoding every directory (lazy indexes)

    def __len__(self) -> int:
        return len(self.entries) if self.count is None else self.count

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def max_ino(self) -> int:
        return max(self.ino.values(), default=ROOT_INO)

    # -- cache format --------------------------------------------------------------------------
    #
    #   MAGIC | xxh128 of the table (16) | u64 table length | table | directory records
    #   table:  marshal (version, count, root row, aliases, dir names joined by NUL,
    #           spans: per dir, in the same order, u64 offset, u32 length, u64 xxh3_64)
    #   record: marshal (names, entry columns, layers, inos, nlinks) of the dir's children
    # The spans are one bytes object, not a dict of tuples: a table of 4.6k directories then
    # unmarshals in a fraction of a millisecond instead of three.

    def dumps(self) -> bytes:
        records: list[bytes] = []
        spans: list[bytes] = []
        offset = 0
        for d, names in self.children.items():
            prefix = d + "/" if d else ""
            rec = marshal.dumps(_rows(self, [prefix + n for n in names]))
            spans.append(_SPAN.pack(offset, len(rec), xxhash.xxh3_64_intdigest(rec)))
            records.append(rec)
            offset += len(rec)
        table = marshal.dumps((
            INDEX_VERSION, len(self.entries), _rows(self, [""]),
            {k: tuple(v) for k, v in self.aliases.items()}, "\0".join(self.children),
            b"".join(spans),
        ))  # fmt: skip
        head = struct.pack("<Q", len(table)) + table
        return INDEX_MAGIC + xxhash.xxh128_digest(head) + head + b"".join(records)

    @classmethod
    def loads(cls, blob: bytes | memoryview | mmap.mmap, path: str | None = None,
              fd: int = -1) -> MergedIndex:
        """A lazy index over a cache blob (any buffer: `load` maps the file from `path`).
        Corruption if its table is damaged; a damaged directory record is Corruption when a
        lookup first needs it (and the cache file at `path` is removed: the next mount merges
        the image again). `fd`, the blob's file open for reading, taken over: records are
        read from it rather than from `blob` (see `load`)."""
        view = memoryview(blob)
        head = len(INDEX_MAGIC) + 16
        if len(view) < head + 8 or view[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise Corruption("merged index cache header is damaged")
        (size,) = struct.unpack_from("<Q", view, head)
        table = view[head : head + 8 + size]
        # The table is checked here; each directory's record when it is decoded (_Loader).
        check = view[len(INDEX_MAGIC) : head]
        if len(table) != 8 + size or xxhash.xxh128_digest(table) != check:
            raise Corruption("merged index cache checksum mismatch")
        try:
            version, count, root, aliases, names, spans = marshal.loads(table[8:])
        except (EOFError, ValueError, TypeError) as exc:
            raise Corruption(f"merged index cache is unreadable: {exc}") from None
        if version != INDEX_VERSION:
            raise Corruption(f"merged index cache version {version} is not {INDEX_VERSION}")
        try:
            loader = _Loader(view[head + 8 + size :], names, spans, path, fd, head + 8 + size)
        except ValueError:  # as many names as spans: the table is checked, so a bug
            raise Corruption("merged index cache table is inconsistent") from None
        idx = cls(
            entries=_Lazy(loader, loader.below), layer=_Lazy(loader, loader.below),
            children=_Lazy(loader, loader.load), ino=_Lazy(loader, loader.below),
            nlink=_Lazy(loader, loader.below),
            aliases={k: list(v) for k, v in aliases.items()}, count=count,
        )  # fmt: skip
        loader.targets = (idx.entries, idx.layer, idx.ino, idx.nlink, idx.children)
        loader.fill([""], root)
        return idx

    @classmethod
    def load(cls, path: str | os.PathLike) -> MergedIndex:
        """The cache file at `path`: its table mapped and checked, each directory's record read
        when it is first looked up. FileNotFoundError if there is none. Cache files are
        replaced by rename, never rewritten, so the mapping and the fd stay valid.

        Records are read with pread, not from the map: a fault on a cold map reads read_ahead_kb
        around it (8 MiB here, most of a 9 MiB index: 7 ms for a first lookup after a cache
        drop), a pread what it asks for, and the kernel's readahead still grows for a walk
        that reads the records in order."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            except ValueError:  # an empty file cannot be mapped
                raise Corruption("merged index cache is empty") from None
            return cls.loads(mapped, os.fspath(path), fd)
        except BaseException:
            os.close(fd)
            raise


def _rows(idx: MergedIndex, paths: list[str]) -> tuple:
    """Column lists of plain values: marshal reads them at C speed and `_Loader.fill` rebuilds
    the dicts with zip/map, without a Python-level loop per entry."""
    names = [p.rpartition("/")[2] for p in paths]
    es = [idx.entries[p] for p in paths]
    columns = [[getattr(e, f) for e in es] for f in _ENTRY_FIELDS]
    return (names, columns, [idx.layer[p] for p in paths], [idx.ino[p] for p in paths],
            [idx.nlink[p] for p in paths])  # fmt: skip


class _Loader:
    """Decodes directory records of a cache blob into the lazy mappings, each record once."""

    def __init__(self, records: memoryview, names: str, spans: bytes, path: str | None,
                 fd: int = -1, base: int = 0) -> None:  # fmt: skip
        self.records = records
        self.fd, self.base = fd, base  # records are at base.. of fd, if it is open
        self.spans = spans
        self.path = path
        count = len(spans) // _SPAN.size
        # directories not decoded yet -> their number in the table
        self.dirs = dict(zip(names.split("\0"), range(count), strict=True)) if count else {}
        self.targets: tuple[dict, ...] = ()
        # FUSE may call from several threads: a record is decoded and filled in under the lock
        # and only then leaves `dirs`, so a reader never sees a half-filled directory as gone.
        self.lock = _thread.allocate_lock()

    def below(self, path: str) -> bool:
        """Decode the directory holding `path`; False if there is nothing more to decode."""
        return bool(path) and self.load(path.rpartition("/")[0])

    def load(self, d: str) -> bool:
        if d not in self.dirs:
            return False
        with self.lock:
            number = self.dirs.get(d)
            if number is None:  # another thread did it meanwhile
                return True
            off, length, check = _SPAN.unpack_from(self.spans, number * _SPAN.size)
            if self.fd >= 0:
                record = os.pread(self.fd, length, self.base + off)
            else:
                record = self.records[off : off + length]
            if len(record) != length or xxhash.xxh3_64_intdigest(record) != check:
                self._damaged(f"merged index cache record of {d or '/'!r} is damaged")
            try:
                row = marshal.loads(record)
            except (EOFError, ValueError, TypeError) as exc:  # checksummed: a bug, not damage
                raise Corruption(f"merged index cache record {d!r} is unreadable: {exc}") from None
            prefix = d + "/" if d else ""
            self.fill([prefix + n for n in row[0]], row)
            dict.__setitem__(self.targets[4], d, list(row[0]))
            del self.dirs[d]
            if not self.dirs:
                self.close()
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()

    def _damaged(self, why: str) -> NoReturn:
        if self.path is not None:
            try:
                os.unlink(self.path)  # derived data: the next mount merges the image again
                why += " (removed: the next mount rebuilds it)"
            except OSError:
                pass
        raise Corruption(why)

    def load_all(self) -> None:
        for d in list(self.dirs):
            self.load(d)

    def fill(self, paths: list[str], row: tuple) -> None:
        _names, columns, layers, inos, nlinks = row
        entries, layer, ino, nlink, _children = self.targets
        dict.update(entries, zip(paths, map(Entry, paths, *columns), strict=True))
        dict.update(layer, zip(paths, layers, strict=True))
        dict.update(ino, zip(paths, inos, strict=True))
        dict.update(nlink, zip(paths, nlinks, strict=True))


_MISSING = object()


class _Lazy(dict):
    """A dict filled in by directory on first use: a hit costs a dict lookup, a miss decodes
    the record that would hold the key (once) and looks again. Everything that sees the whole
    mapping (iteration, len, ==) decodes every record first. Read-only by contract."""

    __slots__ = ("_fetch", "_loader")

    def __init__(self, loader: _Loader, fetch: Callable[[str], bool]) -> None:
        super().__init__()
        self._loader = loader
        self._fetch = fetch  # key -> decode what may hold it; False if nothing was left

    def _all(self) -> None:
        if self._loader.dirs:
            self._loader.load_all()

    def __missing__(self, key: str) -> Any:
        if self._fetch(key):
            v = dict.get(self, key, _MISSING)
            if v is not _MISSING:
                return v
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        v = dict.get(self, key, _MISSING)
        if v is _MISSING:
            if not self._fetch(key):
                return default
            v = dict.get(self, key, default)
        return v

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        return isinstance(key, str) and self._fetch(key) and dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._all()
        return dict.__len__(self)

    def keys(self):  # type: ignore[override]
        self._all()
        return dict.keys(self)

    def values(self):  # type: ignore[override]
        self._all()
        return dict.values(self)

    def items(self):  # type: ignore[override]
        self._all()
        return dict.items(self)

    def copy(self) -> dict:  # type: ignore[override]
        self._all()
        return dict(dict.items(self))

    def __eq__(self, other: object) -> bool:
        self._all()
        if isinstance(other, _Lazy):
            other._all()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self._all()
        return dict.__repr__(self)

    def __reduce__(self) -> Any:
        return (dict, (self.copy(),))


_SPAN = struct.Struct("<QIQ")  # a directory record's offset, length and xxh3_64 in the cache

# Entry fields after `path`, in Entry's positional order.
_ENTRY_FIELDS = ("kind", "mode", "uid", "gid", "atime", "mtime", "ctime", "size", "digest",
                 "target", "rdev", "link", "xattrs")  # fmt: skip


def merge(tocs: Sequence[Toc]) -> MergedIndex:
    """Merge layer TOCs, bottom layer first, into one index."""
    entries: dict[str, Entry] = {"": Entry("", DIR, mode=0o755)}
    layer: dict[str, int] = {"": 0}
    kids: dict[str, set[str]] = {"": set()}

    def drop(path: str) -> None:
        """Remove path and everything below it."""
        if path not in entries:
            return
        stack = [path]
        while stack:
            p = stack.pop()
            del entries[p]
            del layer[p]
            below = kids.pop(p, None)
            if below:
                prefix = p + "/" if p else ""
                stack.extend(prefix + n for n in below)
        if path:
            parent, _, name = path.rpartition("/")
            kids.get(parent, set()).discard(name)

    def ensure_dir(path: str, n: int) -> None:
        """Make path a directory, creating missing parents (TOCs may omit implied ones)."""
        missing = []
        p = path
        while p not in entries or entries[p].kind != DIR:
            missing.append(p)
            if not p:
                break
            p = p.rpartition("/")[0]
        for p in reversed(missing):
            if p in entries:
                drop(p)
            entries[p] = Entry(p, DIR, mode=0o755)
            layer[p] = n
            kids[p] = set()
            if p:
                parent, _, name = p.rpartition("/")
                kids[parent].add(name)

    for n, toc in enumerate(tocs):
        # What a layer hides applies to the layers below it, never to its own entries.
        for d in sorted(toc.opaque):
            if d in entries and entries[d].kind == DIR:
                prefix = d + "/" if d else ""
                for name in list(kids.get(d, ())):
                    drop(prefix + name)
        for w in sorted(toc.whiteouts):
            drop(w)
        for path in sorted(toc.entries):
            e = toc.entries[path]
            if not path:  # the layer's root: the merged root takes its metadata
                entries[""] = e
                layer[""] = n
                continue
            parent, _, name = path.rpartition("/")
            ensure_dir(parent, n)
            old = entries.get(path)
            if old is not None and (old.kind != DIR or e.kind != DIR):
                drop(path)
            entries[path] = e
            layer[path] = n
            if e.kind == DIR:
                kids.setdefault(path, set())
            kids[parent].add(name)

    return _number(entries, layer, kids)


def _number(
    entries: dict[str, Entry], layer: dict[str, int], kids: dict[str, set[str]]
) -> MergedIndex:
    idx = MergedIndex()
    order = sorted(entries)  # '' first
    group_ino: dict[tuple[int, int], int] = {}
    members: dict[int, list[str]] = {}
    for i, path in enumerate(order):
        e = entries[path]
        n = layer[path]
        ino = ROOT_INO + i
        if e.link and e.kind != DIR:
            ino = group_ino.setdefault((n, e.link), ino)
            members.setdefault(ino, []).append(path)
        idx.entries[path] = e
        idx.layer[path] = n
        idx.ino[path] = ino
    for path, names in kids.items():
        idx.children[path] = sorted(names)
    idx.aliases = {ino: paths for ino, paths in members.items() if len(paths) > 1}
    for path, e in idx.entries.items():
        if e.kind == DIR:
            prefix = path + "/" if path else ""
            sub = sum(1 for name in idx.children[path] if entries[prefix + name].kind == DIR)
            idx.nlink[path] = 2 + sub
        else:
            group = idx.aliases.get(idx.ino[path])
            idx.nlink[path] = len(group) if group else 1
    return idx
