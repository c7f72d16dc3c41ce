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

Building the index is pure. `dumps()`/`loads()` give the per-image cache format (marshal of plain
tuples, zstd, checksummed), which loads a 60k-entry image in a fraction of a second.
"""

from __future__ import annotations

import marshal
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash
import zstandard

from cowfs.errors import Corruption
from cowfs.toc import DIR, Entry, Toc

INDEX_MAGIC = b"COWIDX1\n"
# Bumped whenever the merge or numbering rules change, so stale caches are never used.
INDEX_VERSION = 2
ROOT_INO = 1


@dataclass(slots=True)
class MergedIndex:
    entries: dict[str, Entry] = field(default_factory=dict)
    layer: dict[str, int] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    ino: dict[str, int] = field(default_factory=dict)
    nlink: dict[str, int] = field(default_factory=dict)
    aliases: dict[int, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def max_ino(self) -> int:
        return max(self.ino.values(), default=ROOT_INO)

    # -- cache format --------------------------------------------------------------------------

    def dumps(self) -> bytes:
        # Column lists of plain values: marshal reads them at C speed and loads() rebuilds the
        # dicts with zip/map, without a Python-level loop per entry.
        paths = list(self.entries)
        es = [self.entries[p] for p in paths]
        columns = [[getattr(e, f) for e in es] for f in _ENTRY_FIELDS]
        payload = marshal.dumps((
            INDEX_VERSION, paths, columns, [self.layer[p] for p in paths],
            [self.ino[p] for p in paths], [self.nlink[p] for p in paths],
            {k: tuple(v) for k, v in self.children.items()},
            {k: tuple(v) for k, v in self.aliases.items()},
        ))  # fmt: skip
        return INDEX_MAGIC + xxhash.xxh128_digest(payload) + zstandard.compress(payload, 1)

    @classmethod
    def loads(cls, blob: bytes) -> MergedIndex:
        head = len(INDEX_MAGIC) + 16
        if not blob.startswith(INDEX_MAGIC) or len(blob) < head:
            raise Corruption("merged index cache header is damaged")
        try:
            payload = zstandard.decompress(blob[head:])
        except zstandard.ZstdError as exc:
            raise Corruption(f"merged index cache does not decompress: {exc}") from None
        if xxhash.xxh128_digest(payload) != blob[len(INDEX_MAGIC) : head]:
            raise Corruption("merged index cache checksum mismatch")
        try:
            version, *rest = marshal.loads(payload)
        except (EOFError, ValueError, TypeError) as exc:
            raise Corruption(f"merged index cache is unreadable: {exc}") from None
        if version != INDEX_VERSION:
            raise Corruption(f"merged index cache version {version} is not {INDEX_VERSION}")
        paths, columns, layers, inos, nlinks, children, aliases = rest
        idx = cls()
        idx.entries = dict(zip(paths, map(Entry, paths, *columns), strict=True))
        idx.layer = dict(zip(paths, layers, strict=True))
        idx.ino = dict(zip(paths, inos, strict=True))
        idx.nlink = dict(zip(paths, nlinks, strict=True))
        idx.children = {k: list(v) for k, v in children.items()}
        idx.aliases = {k: list(v) for k, v in aliases.items()}
        return idx


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
