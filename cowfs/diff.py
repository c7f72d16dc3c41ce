"""What an upper directory changes in the tree below it, as `docker diff` reports it.

A change is one line: `A` added, `C` changed, `D` deleted, and a path from the root. The rules,
comparing the lower tree (the image's merged index) with what the mount shows:

- a path visible now but not below is `A` (every added path, the contents of a new dir too);
- a path visible below but not now is `D`, reported only at its top (a deleted dir's contents
  are not listed one by one);
- a path in the upper that was also visible below is `C`; a directory only when its own
  metadata (mode, owner, mtime, xattrs) differs or it was made opaque, or when something below it
  changed: a changed parent dir shows as `C`, as in docker.

Without the lower tree (a bare upper dir) the same rules run against an empty lower, except that
an entry carrying a copy-up origin xattr (cowfs's or overlayfs's) counts as having been there.

This module is pure apart from `upper_changes`, which scans the upper.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cowfs import overlaydir
from cowfs.toc import DIR, Entry, Toc

ADDED, CHANGED, DELETED = "A", "C", "D"
# Xattrs a copy-up leaves on what it copied: their presence means "this was below".
ORIGIN_XATTRS = ("trusted.cowfs.origin", "trusted.overlay.origin")


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # ADDED, CHANGED or DELETED
    path: str  # layer path ('a/b'); `str()` gives docker's '/a/b'

    def __str__(self) -> str:
        return f"{self.kind} /{self.path}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": "/" + self.path}


def _sort_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


def _same_dir_meta(a: Entry, b: Entry) -> bool:
    return (a.mode, a.uid, a.gid, a.mtime, _user_xattrs(a)) == (
        b.mode, b.uid, b.gid, b.mtime, _user_xattrs(b))  # fmt: skip


def _user_xattrs(e: Entry) -> dict[str, bytes]:
    return {k: v for k, v in (e.xattrs or {}).items() if not overlaydir.is_bookkeeping(k)}


def changes(lower: Mapping[str, Entry] | None, upper: Toc) -> list[Change]:
    """The changes `upper` makes to the tree `lower` (path -> visible entry, the root included).

    `lower` None means "not known": see the module doc. The upper's entries may still carry
    bookkeeping xattrs (scan with keep_bookkeeping=True) so that origins can be seen.
    """
    known = lower is not None
    below: Mapping[str, Entry] = lower if lower is not None else {}
    up = upper.entries

    def hidden_above(path: str) -> bool:
        """Whether something in the upper hides `path` of the lower tree (an ancestor that is
        whited out, replaced by a non-directory, or opaque)."""
        p = path
        while p:
            p = p.rpartition("/")[0]
            if p in upper.whiteouts or p in upper.opaque:
                return True
            e = up.get(p)
            if e is not None and e.kind != DIR:
                return True
        return False

    def was_below(path: str) -> bool:
        if known:
            return path in below
        e = up.get(path)
        return e is not None and any(k in (e.xattrs or {}) for k in ORIGIN_XATTRS)

    def visible_now(path: str) -> bool:
        if path in up:
            return True
        if path in upper.whiteouts:
            return False
        return path in below and not hidden_above(path)

    out: dict[str, str] = {}
    for path, e in up.items():
        if not path:
            continue
        if not was_below(path):
            out[path] = ADDED
            continue
        old = below.get(path)
        replaced = old is not None and (old.kind != DIR or not _same_dir_meta(e, old))
        # (else a directory copied up only to hold a change below it: see the parents' loop)
        if e.kind != DIR or path in upper.opaque or replaced:
            out[path] = CHANGED
    # Deleted: visible before, not now, reported where the deletion starts (its parent is
    # still there). Only whiteouts and the contents of opaque dirs can be such paths.
    gone = set(upper.whiteouts)
    ordered = sorted(below) if upper.opaque else []
    for d in upper.opaque:
        # the paths under d are one run of the sorted list: no scan of the whole tree per dir
        prefix = d + "/" if d else ""
        i = bisect.bisect_left(ordered, prefix)
        while i < len(ordered) and ordered[i].startswith(prefix):
            if ordered[i] != d:
                gone.add(ordered[i])
            i += 1
    for path in gone:
        if (path in below or not known) and not visible_now(path):
            parent = path.rpartition("/")[0]
            if not parent or visible_now(parent) or (not known and parent in up):
                out[path] = DELETED
    # A changed parent shows as changed (unless it is itself added or deleted).
    for path in list(out):
        p = path
        while p:
            p = p.rpartition("/")[0]
            if p and p not in out and p in up and was_below(p):
                out[p] = CHANGED
    return [Change(kind, path) for path, kind in sorted(out.items(), key=lambda t: _sort_key(t[0]))]


def upper_changes(upper_dir: str | os.PathLike, lower: Mapping[str, Entry] | None,
                  skip: Iterable[str] = ()) -> list[Change]:  # fmt: skip
    """Scan `upper_dir` (kernel-overlayfs format) and list its changes to `lower`, ignoring the
    upper's entries at the paths `skip` (a container runtime's placeholders)."""
    upper = overlaydir.scan(upper_dir, keep_bookkeeping=True)
    for path in skip:
        upper.entries.pop(path, None)
    return changes(lower, upper)
