"""The union filesystem: read-only lower layers (a merged index) under one writable upper directory.

What the filesystem *is* lives here; `cowfs.fuse` only adapts it to FUSE. Operations take paths
relative to the mount root ('' is the root, no leading slash), raise OSError or CowfsError with
an errno, and know nothing of FUSE.

Model. The lower tree is the in-memory `MergedIndex`. The upper directory is in kernel-overlayfs
format (0/0 character-device whiteouts, `trusted.overlay.opaque=y` directories) and is mirrored in
memory (`_up`: path -> kind or WHITEOUT, `_kids`, `_opaque`), so a lookup of an unchanged lower
path costs no system call. A path is visible from the upper if it is there and not a whiteout;
otherwise from the lower if the index has it and no upper ancestor hides it (a whiteout, a
non-directory, or an opaque directory). Everything the mount changes goes through this object
(DESIGN decision 2), which keeps the mirror exact.

Copy-up. The first change of any kind to a lower entry copies it into the upper: parents first,
built in the work directory (content with holes kept, owner, mode, xattrs, times) and renamed
into place, so a crash never leaves a half-copied file visible. A copy of an image's file is
synced after its rename, not before (cowfs/settling.py: marked first, repaired after a host
crash); a copy from a plain-directory lower is synced before it. A lower hard-link group is copied
as one inode: every visible alias is linked to the copy before the copies are renamed in.

Inode numbers. Lower entries take the index's numbers (stable for the same image); the copy-up
records that number in the `trusted.cowfs.origin` xattr, so st_ino does not change on copy-up or
across remounts. Entries born in the upper get 2**32 + their host inode number.

Rename of a lower or merged directory copies its whole subtree up (no EXDEV, no redirect xattrs):
the upper stays in plain overlayfs format that `commit` and other tools understand, at the cost
of copying the data of a renamed lower tree once. Kernel overlayfs returns EXDEV instead.

Open files are served from host fds (upper) or lower readers; an unlinked open file keeps working
because the handle never goes back to its path.
"""

from __future__ import annotations

import _thread
import errno
import itertools
import os
import stat
import time

from cowfs.errors import CowfsError
from cowfs.hostdir import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, HostDir, link, move
from cowfs.index import ROOT_INO, MergedIndex
from cowfs.record import SlotsRecord, record
from cowfs.settling import (
    MARK_PREFIX,
    PENDING_XATTR,
    Settler,
    boot_id,
    keeps_metadata_in_order,
    unsettled,
)
from cowfs.toc import BLK, CHR, DIR, FIFO, REG, SOCK, SYMLINK, Entry, kind_of_mode

# Annotations only: typing, contextlib and threading are not loaded on a daemon's way to a
# container's first instruction (docs/ARCHITECTURE.md, "The start path").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from cowfs.lowers import LowerLayer, Reader

WHITEOUT = "w"
OPAQUE_XATTR = "trusted.overlay.opaque"
ORIGIN_XATTR = "trusted.cowfs.origin"
# The layering's own xattrs: hidden from users, never copied, never settable through the mount.
_OVERLAY_XATTRS = "trusted.overlay."
_ESCAPED_XATTRS = "trusted.overlay.overlay."
_COWFS_XATTRS = "trusted.cowfs."


def _host_xattr(name: str) -> str:
    """The upper's name for a user's xattr. Like overlayfs (6.7+), a user's trusted.overlay.X
    is stored escaped as trusted.overlay.overlay.X, so it never means whiteout or opaque."""
    if name.startswith(_OVERLAY_XATTRS):
        return _ESCAPED_XATTRS + name[len(_OVERLAY_XATTRS) :]
    return name


def _user_xattr(name: str) -> str | None:
    """The user's name for an upper xattr; None for the layering's own bookkeeping."""
    if name.startswith(_ESCAPED_XATTRS):
        return _OVERLAY_XATTRS + name[len(_ESCAPED_XATTRS) :]
    if name.startswith((_OVERLAY_XATTRS, _COWFS_XATTRS)):
        return None
    return name
UPPER_INO_BASE = 1 << 32
NAME_MAX = 255
_WORK_PREFIX = "#cowfs-"
VOLATILE_MARK = "volatile"  # in the work dir while a volatile mount lasts (see UnionFS)
HIDDEN_PREFIX = ".fuse_hidden"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
_IFMT_KIND = {
    stat.S_IFREG: REG, stat.S_IFDIR: DIR, stat.S_IFLNK: SYMLINK, stat.S_IFCHR: CHR,
    stat.S_IFBLK: BLK, stat.S_IFIFO: FIFO, stat.S_IFSOCK: SOCK,
}  # fmt: skip
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code), what)


# -- handles and attributes -------------------------------------------------------------------


class Handle(SlotsRecord):
    """An open file: a host fd of the upper, or a reader of a lower layer."""

    __slots__ = ("ino", "fd", "reader", "layer", "lower_path", "entry", "nlink", "keep_cache",
                 "path", "host_ino")  # fmt: skip

    def __init__(
        self,
        ino: int,
        fd: int = -1,
        reader: Reader | None = None,  # of a lower file; may wait for the first read (open)
        layer: LowerLayer | None = None,  # where a lower handle's reader comes from
        lower_path: str = "",  # the path in that layer (`path` follows renames; this does not)
        entry: Entry | None = None,  # lower metadata, for fstat of a lower handle
        nlink: int = 1,
        keep_cache: bool = False,
        path: str | None = None,  # the name it was opened by, to find its other names
        host_ino: int | None = None,  # set when the upper file has several names
    ) -> None:
        self.ino, self.fd, self.reader, self.layer = ino, fd, reader, layer
        self.lower_path, self.entry, self.nlink = lower_path, entry, nlink
        self.keep_cache, self.path, self.host_ino = keep_cache, path, host_ino


@record(frozen=True)
class Owner:
    """Who creates a file: the caller's uid and gid (the kernel has applied the umask)."""

    uid: int = 0
    gid: int = 0


def _attr_of_entry(e: Entry, ino: int, nlink: int) -> dict[str, int]:
    return {
        "st_mode": e.st_mode, "st_ino": ino, "st_nlink": nlink, "st_uid": e.uid,
        "st_gid": e.gid, "st_size": e.size, "st_atime": e.atime, "st_mtime": e.mtime,
        "st_ctime": e.ctime, "st_rdev": e.rdev, "st_blksize": 4096,
        "st_blocks": (e.size + 511) // 512,
    }  # fmt: skip


def _attr_of_stat(st: os.stat_result, ino: int, nlink: int) -> dict[str, int]:
    return {
        "st_mode": st.st_mode, "st_ino": ino, "st_nlink": nlink, "st_uid": st.st_uid,
        "st_gid": st.st_gid, "st_size": st.st_size, "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns, "st_rdev": st.st_rdev,
        "st_blksize": st.st_blksize, "st_blocks": st.st_blocks,
    }  # fmt: skip


def _locked(method: Callable) -> Callable:
    def wrapper(self: UnionFS, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _parent_name(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def _check_name(path: str) -> None:
    if len(os.fsencode(path.rpartition("/")[2])) > NAME_MAX:
        raise err(errno.ENAMETOOLONG, path)


class UnionFS:
    """Lower layers (index + content sources) under an upper dir; every call is errno-raising."""

    def __init__(
        self,
        index: MergedIndex,
        layers: Sequence[LowerLayer],
        upper: str | os.PathLike | None,
        work: str | os.PathLike | None,
        *,
        read_only: bool = False,
        volatile: bool = False,
        space: str | os.PathLike | None = None,
    ) -> None:
        """`space`: the host dir whose free space statfs reports without an upper.

        `volatile`, as overlayfs's option of that name: nothing of the upper is forced to disk
        (fsync, syncfs, a copy-up's fdatasync and the unmount's sync do nothing), for an upper
        that is thrown away after use (`run --rm`, as podman does). While it is mounted so,
        <work>/volatile exists; an upper whose mount ended without removing it (a crash) may
        hold incomplete files, and is refused until that directory is removed."""
        self.idx = index
        self.layers = list(layers)
        self.space = space
        self.read_only = read_only or upper is None
        self.volatile = volatile and not self.read_only
        self.upper = HostDir(upper) if upper is not None else None
        self.work = HostDir(work) if work is not None and not self.read_only else None
        if not self.read_only and self.work is None:
            raise CowfsError("a writable mount needs a work directory", errno=errno.EINVAL)
        self._lock = _thread.RLock()
        self._up: dict[str, str] = {}
        self._kids: dict[str, set[str]] = {}
        self._opaque: set[str] = set()
        self._ino: dict[str, int] = {}
        self._listing: dict[str, list[tuple[str, bool]]] = {}
        # st_nlink of upper dirs: only directory children count, so creating and removing
        # files (the common churn) keeps it; recomputing it per getattr would be O(n) each.
        self._nlinks: dict[str, int] = {}
        # Upper files with several names: host inode -> names, and back. The kernel caches
        # each name as its own inode (libfuse's path API), so a change through one name must
        # invalidate what it caches for the others (`notify`).
        self._links: dict[int, set[str]] = {}
        self._link_of: dict[str, int] = {}
        self.notify: Callable[[list[str]], None] | None = None
        self._hiders = 0  # upper entries that can hide lower ones: fast path when 0
        self._handles: dict[int, Handle] = {}
        self._detached: dict[str, list[int]] = {}  # hidden name -> open handles
        self._fh = itertools.count(1)
        self._tmp = itertools.count(1)
        # Copies synced after their rename (cowfs/settling.py); the work dir's mark of them.
        self._settler = Settler(self._settle_failed)
        self._mark: str | None = None
        # Marks ride the upper's journal; without one, copies are synced before their rename.
        self._marks_hold = (
            self.work is not None and not self.volatile and keeps_metadata_in_order(self.work.fd)
        )
        if self.work is not None:
            try:
                self.work.lstat(VOLATILE_MARK)
            except FileNotFoundError:
                pass
            else:
                raise CowfsError(
                    f"the upper was mounted volatile and its mount did not end cleanly: it may "
                    f"hold incomplete files (remove {self.work.path}/{VOLATILE_MARK} to use it "
                    f"anyway)", errno=errno.EINVAL)  # fmt: skip
        if self.upper is not None:
            self._scan_upper()
        if self.work is not None:
            names = self.work.listdir("")  # once: leftovers of a crash, marks of unsynced copies
            self._clean_work(names)
            self._recover([n for n in names if n.startswith(MARK_PREFIX)])
            if self.volatile:
                self.work.mkdir(VOLATILE_MARK, 0o700)

    def close(self) -> None:
        for h in list(self._handles.values()):
            self._close_handle(h)
        self._handles.clear()
        self._settler.close()  # every copy settled, its thread ended
        self.syncfs()  # umount returns with the changes on disk
        for layer in self.layers:
            layer.close()
        if self._mark is not None:
            assert self.work is not None
            self.work.rmdir(self._mark)  # after the marks it stands for, as the journal keeps it
            self._mark = None
        if self.volatile and self.work is not None:
            self.work.rmdir(VOLATILE_MARK)  # a clean end: the upper is whole
        for d in (self.upper, self.work):
            if d is not None:
                d.close()

    # -- the upper mirror -----------------------------------------------------------------------

    def _scan_upper(self) -> None:
        assert self.upper is not None
        self._up[""] = DIR
        self._kids[""] = set()
        if self._has_opaque_xattr(""):
            self._opaque.add("")
        stack = [""]
        while stack:
            d = stack.pop()
            fd = self.upper.opendir(d)
            try:
                with os.scandir(fd) as it:
                    found = [(x.name, x.stat(follow_symlinks=False)) for x in it]
            finally:
                os.close(fd)
            for name, st in found:
                path = f"{d}/{name}" if d else name
                kind = self._kind_of_stat(st)
                self._record(path, kind)
                if st.st_nlink > 1 and kind not in (DIR, WHITEOUT):
                    self._add_links([path], st.st_ino)
                if kind == REG and self.read_only and self._marked(path):
                    raise unsettled(path)  # a read-only mount cannot repair it (no work dir)
                if kind == DIR:
                    if self._has_opaque_xattr(path):
                        self._opaque.add(path)
                        self._hiders += 1
                    stack.append(path)

    def _marked(self, path: str) -> bool:
        return self._upper_xattr(path, PENDING_XATTR) is not None

    def _has_opaque_xattr(self, path: str) -> bool:
        return self._upper_xattr(path, OPAQUE_XATTR) == b"y"

    def _upper_xattr(self, path: str, name: str) -> bytes | None:
        assert self.upper is not None
        try:
            return self.upper.getxattr(path, name)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise

    @staticmethod
    def _kind_of_stat(st: os.stat_result) -> str:
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return WHITEOUT
        return _IFMT_KIND[stat.S_IFMT(st.st_mode)]

    def _record(self, path: str, kind: str) -> None:
        """Note in the mirror that the upper now has `kind` at `path`."""
        old = self._up.get(path)
        if old is not None and old != DIR:
            self._hiders -= 1
        self._up[path] = kind
        if kind != DIR:
            self._hiders += 1
        elif path not in self._kids:
            self._kids[path] = set()
        parent, name = _parent_name(path)
        self._kids[parent].add(name)
        self._listing.pop(parent, None)
        self._listing.pop(path, None)
        if kind in (DIR, WHITEOUT) or old in (DIR, WHITEOUT):  # a whiteout may hide a dir
            self._nlinks.pop(parent, None)
            self._nlinks.pop(path, None)

    def _forget(self, path: str) -> None:
        """Note that the upper no longer has `path` (and anything below it)."""
        # A work list, not recursion: a subtree may be thousands of directories deep.
        stack = [path]
        while stack:
            p = stack.pop()
            old = self._up.pop(p, None)
            if old is None:
                continue
            if old != DIR:
                self._hiders -= 1
            self._ino.pop(p, None)
            self._drop_link(p)
            if old == DIR:
                if p in self._opaque:
                    self._opaque.discard(p)
                    self._hiders -= 1
                prefix = p + "/"
                stack.extend(prefix + name for name in self._kids.pop(p, set()))
                self._listing.clear()
                self._nlinks.clear()
            parent, name = _parent_name(p)
            siblings = self._kids.get(parent)
            if siblings is not None:  # None while a whole subtree is being forgotten
                siblings.discard(name)
            self._listing.pop(parent, None)
            if old == WHITEOUT:
                self._nlinks.pop(parent, None)

    def _set_opaque(self, path: str) -> None:
        if path not in self._opaque:
            self._opaque.add(path)
            self._hiders += 1
        self._listing.pop(path, None)
        self._nlinks.pop(path, None)

    def _add_links(self, paths: Sequence[str], host_ino: int) -> None:
        names = self._links.setdefault(host_ino, set())
        for p in paths:
            names.add(p)
            self._link_of[p] = host_ino

    def _drop_link(self, path: str) -> None:
        host_ino = self._link_of.pop(path, None)
        if host_ino is not None:
            names = self._links.get(host_ino, set())
            names.discard(path)
            if len(names) < 2:  # a single name needs no bookkeeping
                for p in names:
                    self._link_of.pop(p, None)
                self._links.pop(host_ino, None)

    def _others(self, path: str | None, host_ino: int | None = None) -> list[str]:
        """The other names of the file at `path` (upper or lower hard links)."""
        if host_ino is None and path is not None:
            host_ino = self._link_of.get(path)
        if host_ino is not None:
            return sorted(p for p in self._links.get(host_ino, ()) if p != path)
        if path is not None and path not in self._up and path in self.idx.entries:
            group = self.idx.aliases.get(self.idx.ino[path], ())
            return [p for p in group if p != path and p not in self._up and not self._hidden(p)]
        return []

    def _changed(self, paths: list[str]) -> None:
        """Tell the kernel that what it caches for `paths` is stale."""
        if paths and self.notify is not None:
            self.notify(paths)

    # -- lookup ---------------------------------------------------------------------------------

    def _hidden(self, path: str) -> bool:
        """Whether an upper ancestor hides the lower entry at `path`."""
        if not self._hiders:
            return False
        up = self._up
        while path:
            path = path.rpartition("/")[0]
            k = up.get(path)
            if k is not None and (k != DIR or path in self._opaque):
                return True
        return False

    def _lower(self, path: str) -> Entry | None:
        """The lower entry visible at `path` if the upper does not cover it."""
        e = self.idx.entries.get(path)
        if e is None or self._hidden(path):
            return None
        return e

    def _node(self, path: str) -> tuple[bool, str] | None:
        """(in upper, kind) of the visible entry at `path`, or None."""
        k = self._up.get(path)
        if k is not None:
            return None if k == WHITEOUT else (True, k)
        e = self._lower(path)
        return None if e is None else (False, e.kind)

    def _need(self, path: str) -> tuple[bool, str]:
        node = self._node(path)
        if node is None:
            _check_name(path)
            raise err(errno.ENOENT, path)
        return node

    def _need_dir(self, path: str) -> bool:
        in_upper, kind = self._need(path)
        if kind != DIR:
            raise err(errno.ENOTDIR, path)
        return in_upper

    def _absent(self, path: str) -> None:
        """For creating `path`: its parent must be a directory and the name free."""
        _check_name(path)
        self._need_dir(_parent_name(path)[0])
        if self._node(path) is not None:
            raise err(errno.EEXIST, path)

    def _listdir(self, path: str) -> list[tuple[str, bool]]:
        """Visible children of a visible directory: (name, in upper), sorted."""
        cached = self._listing.get(path)
        if cached is not None:
            return cached
        out: dict[str, bool] = {}
        up_dir = self._up.get(path) == DIR
        if up_dir:
            prefix = path + "/" if path else ""
            for name in self._kids.get(path, ()):
                if self._up[prefix + name] != WHITEOUT:
                    out[name] = True
        merge_lower = not up_dir or path not in self._opaque
        if merge_lower:
            e = self.idx.entries.get(path)
            if e is not None and e.kind == DIR and not self._hidden(path):
                kids = self._kids.get(path, ()) if up_dir else ()
                for name in self.idx.children.get(path, ()):
                    if name not in kids:
                        out[name] = False
        listing = sorted(out.items())
        self._listing[path] = listing
        return listing

    def _ino_of(self, path: str, in_upper: bool, st: os.stat_result | None = None) -> int:
        if not in_upper:
            return self.idx.ino[path]
        ino = self._ino.get(path)
        if ino is None:
            assert self.upper is not None
            try:
                ino = int(self.upper.getxattr(path, ORIGIN_XATTR))
            except (OSError, ValueError):
                if st is None:
                    st = self.upper.lstat(path)
                ino = ROOT_INO if not path else UPPER_INO_BASE + st.st_ino
            self._ino[path] = ino
        return ino

    def _dir_nlink(self, path: str, in_upper: bool) -> int:
        if not in_upper:  # a lower-only dir has nothing of the upper below it
            return self.idx.nlink[path]
        n = self._nlinks.get(path)
        if n is None:
            # 2 + visible subdirectories: the index's count of the lower's, corrected by the
            # upper's entries here (usually few), so a big lower dir is not walked each time a
            # whiteout or copy-up in it drops the cached count.
            prefix = path + "/" if path else ""
            e = self.idx.entries.get(path)
            lower = (e is not None and e.kind == DIR and path not in self._opaque
                     and not self._hidden(path))  # fmt: skip
            n = self.idx.nlink[path] if lower else 2
            entries = self.idx.entries
            for name in self._kids.get(path, ()):
                child = prefix + name
                if self._up[child] == DIR:
                    n += 1
                if lower:
                    below = entries.get(child)
                    if below is not None and below.kind == DIR:
                        n -= 1  # covered by the upper entry: counted above if it is a dir
            self._nlinks[path] = n
        return n

    def _lower_nlink(self, path: str, ino: int) -> int:
        group = self.idx.aliases.get(ino)
        if not group:
            return 1
        return sum(1 for p in group if p not in self._up and not self._hidden(p))

    # -- reading --------------------------------------------------------------------------------

    @_locked
    def getattr(self, path: str) -> dict[str, int]:
        if path in self._detached:
            return self.fgetattr(self._detached[path][0])
        in_upper, kind = self._need(path)
        if not in_upper:
            return self._lower_attr(path)
        assert self.upper is not None
        st = self.upper.lstat(path)
        ino = self._ino_of(path, True, st)
        nlink = self._dir_nlink(path, True) if kind == DIR else st.st_nlink
        return _attr_of_stat(st, ino, nlink)

    def fgetattr(self, fh: int) -> dict[str, int]:
        h = self._handle(fh)
        if h.fd >= 0:
            st = os.fstat(h.fd)
            return _attr_of_stat(st, h.ino, st.st_nlink)
        assert h.entry is not None
        return _attr_of_entry(h.entry, h.ino, h.nlink)

    @_locked
    def readdir(self, path: str) -> list[tuple[str, dict[str, int]]]:
        """(name, attributes) of '.', '..' and every visible child, in a stable order."""
        self._need_dir(path)
        out = [(".", self.getattr(path)), ("..", self.getattr(_parent_name(path)[0]))]
        prefix = path + "/" if path else ""
        detached = self._detached
        for name, in_upper in self._listdir(path):
            child = prefix + name
            # A lower child of the listing is visible by construction (_listdir): no need for
            # getattr's lookup of its path again (~7% of a whole READDIRPLUS walk, in process).
            if in_upper or child in detached:
                out.append((name, self.getattr(child)))
            else:
                out.append((name, self._lower_attr(child)))
        return out

    def _lower_attr(self, path: str) -> dict[str, int]:
        """The attributes of the visible lower entry at `path`."""
        e = self.idx.entries[path]
        ino = self.idx.ino[path]
        nlink = self._dir_nlink(path, False) if e.kind == DIR else self._lower_nlink(path, ino)
        return _attr_of_entry(e, ino, nlink)

    @_locked
    def readlink(self, path: str) -> str:
        in_upper, kind = self._need(path)
        if kind != SYMLINK:
            raise err(errno.EINVAL, path)
        if in_upper:
            assert self.upper is not None
            return self.upper.readlink(path)
        return self.idx.entries[path].target

    def getxattr(self, path: str, name: str) -> bytes:
        value = self.xattr(path, name)
        if value is None:
            raise err(errno.ENODATA, name)
        return value

    @_locked
    def xattr(self, path: str, name: str) -> bytes | None:
        """getxattr, with None for an absent attribute: the common answer (`ls -l` asks for
        two of every file) costs no exception."""
        in_upper, _ = self._need(path)
        if name.startswith(_COWFS_XATTRS):
            return None
        if in_upper:
            assert self.upper is not None
            try:
                return self.upper.getxattr(path, _host_xattr(name))
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    return None
                raise
        return (self.idx.entries[path].xattrs or {}).get(name)

    @_locked
    def listxattr(self, path: str) -> list[str]:
        in_upper, _ = self._need(path)
        if in_upper:
            assert self.upper is not None
            return [u for n in self.upper.listxattr(path) if (u := _user_xattr(n)) is not None]
        return list(self.idx.entries[path].xattrs or ())

    def statfs(self) -> dict[str, int]:
        target = self.upper.fd if self.upper is not None else self.space
        if target is None:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": NAME_MAX,
                    "f_files": len(self.idx)}  # fmt: skip
        sv = os.statvfs(target)
        return {
            "f_bsize": sv.f_bsize, "f_frsize": sv.f_frsize, "f_blocks": sv.f_blocks,
            "f_bfree": sv.f_bfree, "f_bavail": sv.f_bavail, "f_files": sv.f_files,
            "f_ffree": sv.f_ffree, "f_favail": sv.f_favail, "f_namemax": NAME_MAX,
        }  # fmt: skip

    # -- open files -----------------------------------------------------------------------------

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise err(errno.EBADF)
        return h

    def _add_handle(self, h: Handle) -> int:
        fh = next(self._fh)
        self._handles[fh] = h
        return fh

    @staticmethod
    def _close_handle(h: Handle) -> None:
        if h.fd >= 0:
            os.close(h.fd)
            h.fd = -1
        if h.reader is not None:
            h.reader.close()
            h.reader = None

    @staticmethod
    def _host_flags(flags: int) -> int:
        # Writable opens are O_RDWR: with the writeback cache the kernel reads pages of files
        # opened write-only. O_APPEND is dropped: the kernel gives every write its offset.
        acc = os.O_RDWR if flags & os.O_ACCMODE != os.O_RDONLY else os.O_RDONLY
        return acc | (flags & (os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NOATIME))

    @_locked
    def open(self, path: str, flags: int) -> tuple[int, bool]:
        """A handle for `path` and whether the kernel may keep its page cache."""
        in_upper, kind = self._need(path)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            self._writable()
        if not in_upper and not writing:
            e = self.idx.entries[path]
            ino = self.idx.ino[path]
            nlink = self._lower_nlink(path, ino)
            # Lower content never changes under a handle; a hard-linked one may be copied up
            # through another alias, so only single-link files keep their cache across opens.
            # Content the layer has opened before is opened again by the first read: a re-open
            # whose reads the page cache answers (keep_cache) costs no I/O, and immutable
            # content gives the same bytes later (damage since then fails that read: EIO).
            # First opens stay eager, so a damaged or missing object is EIO at open. (The
            # native engine reads a small file whole at the first open of its node, known
            # content or not: Engine._prefill; damage is then EIO at that open.)
            layer = self.layers[self.idx.layer[path]]
            reader = None if layer.known(e) else layer.open(path, e)
            h = Handle(ino, reader=reader, entry=e, nlink=nlink, keep_cache=nlink == 1,
                       path=path, layer=layer, lower_path=path)  # fmt: skip
            return self._add_handle(h), h.keep_cache
        if not in_upper:
            self._copy_up(path, data=not flags & os.O_TRUNC)
        assert self.upper is not None
        fd = self.upper.open(path, self._host_flags(flags))
        h = Handle(self._ino_of(path, True), fd=fd, path=path, host_ino=self._link_of.get(path))
        if flags & os.O_TRUNC:
            self._changed(self._others(path))
        return self._add_handle(h), False

    @_locked
    def create(self, path: str, mode: int, flags: int, owner: Owner) -> int:
        self._writable()
        self._absent(path)
        parent, _ = _parent_name(path)
        self._copy_up_dir(parent)
        uid, gid, _ = self._new_owner(parent, owner)
        hflags = self._host_flags(flags) | os.O_CREAT | os.O_EXCL
        assert self.upper is not None and self.work is not None
        # Over a whiteout the file is made in the work dir and renamed onto it.
        over_whiteout = self._up.get(path) == WHITEOUT
        d, rel = (self.work, self._tmpname()) if over_whiteout else (self.upper, path)
        fd = d.open(rel, hflags, stat.S_IMODE(mode))
        try:
            st = self._own(fd, uid, gid, stat.S_IMODE(mode))
            if over_whiteout:
                move(self.work, rel, self.upper, path)
        except BaseException:
            os.close(fd)
            try:
                d.unlink(rel)  # nothing half-made stays behind
            except OSError:
                pass
            raise
        self._record(path, REG)
        ino = self._ino[path] = UPPER_INO_BASE + st.st_ino  # born in the upper: no origin
        return self._add_handle(Handle(ino, fd=fd, path=path))

    @staticmethod
    def _own(fd: int, uid: int, gid: int, mode: int) -> os.stat_result:
        """Give a file the daemon just created its owner, then its mode (chown clears setuid
        bits). Most files are created as the daemon's own user with the mode open() gave
        them: then one fstat replaces the chown and the chmod."""
        st = os.fstat(fd)
        if st.st_uid != uid or st.st_gid != gid:
            os.fchown(fd, uid, gid)
        elif stat.S_IMODE(st.st_mode) == mode:
            return st
        os.fchmod(fd, mode)
        return st

    def read(self, fh: int, size: int, offset: int) -> bytes | memoryview:
        h = self._handle(fh)
        if h.fd >= 0:
            return os.pread(h.fd, size, offset)
        reader = h.reader
        if reader is None:
            reader = self._lower_reader(h)
        return reader.pread(size, offset)

    def small_content(self, fh: int, limit: int) -> bytes | memoryview | None:
        """The whole content of lower file handle `fh` if it is 1..`limit` bytes, else None
        (the engine stores it in the kernel's page cache at open: Engine._prefill)."""
        h = self._handle(fh)
        if h.fd >= 0 or h.entry is None or not 0 < h.entry.size <= limit:
            return None
        return self.read(fh, h.entry.size, 0)

    def _lower_reader(self, h: Handle) -> Reader:
        with self._lock:  # two first reads of a threaded loop must not both open it
            if h.reader is None:
                if h.layer is None or h.entry is None:
                    raise err(errno.EBADF)
                h.reader = h.layer.open(h.lower_path, h.entry)
            return h.reader

    def write(self, fh: int, data: bytes, offset: int) -> int:
        h = self._handle(fh)
        if h.fd < 0:
            raise err(errno.EBADF)
        n = os.pwrite(h.fd, data, offset)
        if self._has_links(h):
            with self._lock:  # the link bookkeeping changes under the lock (threaded loop)
                others = self._others(h.path, h.host_ino)
            self._changed(others)
        return n

    def passthrough_fd(self, fh: int) -> int:
        """The host fd the kernel may read and write directly for handle `fh` (FUSE
        passthrough), or -1. Only an upper file of one name qualifies: lower content is
        verified on every read (DESIGN decision 4), and a write to a hard-linked file must
        reach write() so the kernel's caches of its other names are dropped."""
        h = self._handle(fh)
        return h.fd if h.fd >= 0 and not self._has_links(h) else -1

    def linked(self, fh: int) -> bool:
        """Whether upper file handle `fh` is of a file with other names now: what the kernel
        caches under those names goes stale with each write that passthrough keeps from us
        (see the native engine's _open)."""
        h = self._handle(fh)
        return h.fd >= 0 and self._has_links(h)

    def _has_links(self, h: Handle) -> bool:
        # A file may have got more names since it was opened (`ln`): asked now, not at open.
        return h.host_ino is not None or h.path in self._link_of

    def syncfs(self) -> None:
        """The upper's filesystem to disk (syncfs(2)), unless there is none or it is volatile."""
        self._settler.settle_all()
        if self.upper is not None and not self.read_only and not self.volatile:
            self.upper.syncfs()

    def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        if h.fd >= 0 and not self.volatile:
            if self._settler.waiting:
                # Its copy's mark goes first: a repair after a crash must not touch what an
                # fsync has put on the disk. This fsync then commits the mark's removal.
                self._settler.settle(os.fstat(h.fd).st_ino)
            (os.fdatasync if datasync else os.fsync)(h.fd)

    @_locked
    def fsyncdir(self, path: str) -> None:
        in_upper, _ = self._need(path)
        if in_upper and not self.volatile:
            assert self.upper is not None
            fd = self.upper.opendir(path)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @_locked
    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            self._close_handle(h)
            if h.path is not None and h.path in self._detached:
                fhs = self._detached[h.path]
                fhs.remove(fh)
                if not fhs:
                    del self._detached[h.path]

    # libfuse's path API keeps an unlinked open file reachable for fstat and friends by renaming
    # it to a hidden name (and unlinking that name after the last release). The union unlinks
    # the file at once and serves the hidden name from the open handles: nothing shows up in
    # readdir or in the upper.

    def _detach(self, old: str, hidden: str) -> bool:
        fhs = [fh for fh, h in self._handles.items() if h.path == old]
        if not fhs:
            return False
        self.unlink(old)
        for fh in fhs:
            self._handles[fh].path = hidden
        self._detached[hidden] = fhs
        return True

    def _detached_fh(self, path: str | None, fh: int | None) -> tuple[str | None, int | None]:
        """(path, fh) with a detached hidden name turned into its open handle."""
        if path is not None and path in self._detached:
            return None, self._detached[path][0]
        return path, fh

    # -- changing metadata ----------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise err(errno.EROFS)

    def _to_upper(self, path: str, *, data: bool = True) -> None:
        self._writable()
        in_upper, _ = self._need(path)
        if not in_upper:
            self._copy_up(path, data=data)

    @_locked
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        path, fh = self._detached_fh(path, fh)
        if fh is not None:
            h = self._handle(fh)
            if h.fd >= 0:
                os.ftruncate(h.fd, length)
                self._changed(self._others(h.path, h.host_ino))
                return
        if path is None:
            raise err(errno.EBADF)  # an unlinked file opened read-only from the lower
        self._to_upper(path, data=length > 0)
        assert self.upper is not None
        fd = self.upper.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
        self._changed(self._others(path))

    def _open_fd(self, fh: int | None) -> int:
        """The host fd of an open upper file, for calls that come without a path."""
        h = self._handle(fh) if fh is not None else None
        if h is None or h.fd < 0:
            raise err(errno.EBADF)
        return h.fd

    @_locked
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> None:
        path, fh = self._detached_fh(path, fh)
        if path is None:
            os.fchmod(self._open_fd(fh), stat.S_IMODE(mode))
            return
        self._to_upper(path)
        assert self.upper is not None
        self.upper.chmod(path, stat.S_IMODE(mode))
        self._changed(self._others(path))

    @_locked
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> None:
        """uid or gid -1 leaves that one unchanged."""
        path, fh = self._detached_fh(path, fh)
        if path is None:
            os.fchown(self._open_fd(fh), uid, gid)
            return
        self._to_upper(path)
        assert self.upper is not None
        self.upper.lchown(path, uid, gid)
        self._changed(self._others(path))

    @_locked
    def utimens(self, path: str | None, atime: tuple[int, int], mtime: tuple[int, int],
                fh: int | None = None) -> None:  # fmt: skip
        """Times as (seconds, nanoseconds), each possibly UTIME_NOW or UTIME_OMIT."""
        path, fh = self._detached_fh(path, fh)
        if path is None:
            fd = self._open_fd(fh)
            lstat: Callable[[], os.stat_result] = lambda: os.fstat(fd)  # noqa: E731
        else:
            self._to_upper(path)
            assert self.upper is not None
            up = self.upper
            lstat = lambda: up.lstat(path)  # noqa: E731
        st = None
        now = time.time_ns()
        ns = []
        for (sec, nsec), old in ((atime, "st_atime_ns"), (mtime, "st_mtime_ns")):
            if nsec == UTIME_NOW:
                ns.append(now)
            elif nsec == UTIME_OMIT:
                st = st or lstat()
                ns.append(getattr(st, old))
            else:
                ns.append(sec * 1_000_000_000 + nsec)
        if path is None:
            os.utime(fd, ns=(ns[0], ns[1]))
        else:
            self.upper.utime(path, (ns[0], ns[1]))
            self._changed(self._others(path))

    @_locked
    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        if name.startswith(_COWFS_XATTRS):
            raise err(errno.EPERM, name)
        self._to_upper(path)
        assert self.upper is not None
        self.upper.setxattr(path, _host_xattr(name), value, flags)
        self._changed(self._others(path))

    @_locked
    def removexattr(self, path: str, name: str) -> None:
        if name.startswith(_COWFS_XATTRS):
            raise err(errno.ENODATA, name)
        self._need(path)
        self._to_upper(path)
        assert self.upper is not None
        self.upper.removexattr(path, _host_xattr(name))
        self._changed(self._others(path))

    # -- creating and removing names ------------------------------------------------------------

    def _new_owner(self, parent: str, owner: Owner) -> tuple[int, int, int]:
        """uid, gid and inherited setgid bit of a new entry, as a setgid parent dictates."""
        assert self.upper is not None
        pst = self.upper.lstat(parent)
        if pst.st_mode & stat.S_ISGID:
            return owner.uid, pst.st_gid, stat.S_ISGID
        return owner.uid, owner.gid, 0

    def _place(self, path: str, build: Callable[[HostDir, str], None], kind: str) -> None:
        """Create a new upper entry: in place, or over a whiteout through the work dir."""
        assert self.upper is not None and self.work is not None
        if self._up.get(path) == WHITEOUT:
            tmp = self._tmpname()
            build(self.work, tmp)
            if kind == DIR:
                # A directory cannot be renamed over a whiteout: swap them, then drop the
                # whiteout. The new directory must hide what the lower has at this path.
                self.work.setxattr(tmp, OPAQUE_XATTR, b"y")
                move(self.work, tmp, self.upper, path, RENAME_EXCHANGE)
                self.work.unlink(tmp)
                self._record(path, kind)
                self._set_opaque(path)
                return
            move(self.work, tmp, self.upper, path)
        else:
            build(self.upper, path)
        self._record(path, kind)

    @_locked
    def mkdir(self, path: str, mode: int, owner: Owner) -> None:
        self._writable()
        self._absent(path)
        parent, _ = _parent_name(path)
        self._copy_up_dir(parent)
        uid, gid, sgid = self._new_owner(parent, owner)

        def build(d: HostDir, rel: str) -> None:
            d.mkdir(rel, 0o700)
            d.lchown(rel, uid, gid)
            d.chmod(rel, stat.S_IMODE(mode) | sgid)

        self._place(path, build, DIR)

    @_locked
    def mknod(self, path: str, mode: int, rdev: int, owner: Owner) -> None:
        self._writable()
        self._absent(path)
        kind = kind_of_mode(mode)
        if kind == DIR:
            raise err(errno.EINVAL, path)
        if kind in (CHR,) and rdev == 0:
            raise err(errno.EPERM, path)  # 0/0 is a whiteout in the upper: refuse, as overlayfs
        parent, _ = _parent_name(path)
        self._copy_up_dir(parent)
        uid, gid, _ = self._new_owner(parent, owner)

        def build(d: HostDir, rel: str) -> None:
            d.mknod(rel, stat.S_IFMT(mode) | 0o600, rdev)
            d.lchown(rel, uid, gid)
            d.chmod(rel, stat.S_IMODE(mode))

        self._place(path, build, kind)

    @_locked
    def symlink(self, path: str, target: str, owner: Owner) -> None:
        self._writable()
        self._absent(path)
        parent, _ = _parent_name(path)
        self._copy_up_dir(parent)
        uid, gid, _ = self._new_owner(parent, owner)

        def build(d: HostDir, rel: str) -> None:
            d.symlink(target, rel)
            d.lchown(rel, uid, gid)

        self._place(path, build, SYMLINK)

    @_locked
    def link(self, existing: str, path: str) -> None:
        self._writable()
        _, kind = self._need(existing)
        if kind == DIR:
            raise err(errno.EPERM, existing)
        self._absent(path)
        if existing not in self._up:
            self._copy_up(existing)
        self._copy_up_dir(_parent_name(path)[0])
        assert self.upper is not None
        self._place(path, lambda d, rel: link(self.upper, existing, d, rel), kind)
        self._ino.pop(path, None)
        self._add_links([existing, path], self.upper.lstat(path).st_ino)
        self._changed(self._others(path))  # their st_nlink went up

    def _lower_below(self, path: str) -> bool:
        """Whether the lower has an entry at `path` that the upper must keep hiding."""
        return path in self.idx.entries and not self._hidden(path)

    @_locked
    def unlink(self, path: str) -> None:
        self._writable()
        if path in self._detached:
            return  # already gone from the tree: the handles keep the file
        in_upper, kind = self._need(path)
        if kind == DIR:
            raise err(errno.EISDIR, path)
        parent, _ = _parent_name(path)
        self._copy_up_dir(parent)
        others = self._others(path)
        assert self.upper is not None and self.work is not None
        if self._lower_below(path):
            if in_upper:
                tmp = self._tmpname()
                self.work.mknod(tmp, stat.S_IFCHR, 0)
                move(self.work, tmp, self.upper, path)
            else:
                self.upper.mknod(path, stat.S_IFCHR, 0)
            self._forget(path)
            self._record(path, WHITEOUT)
        else:
            self.upper.unlink(path)
            self._forget(path)
        self._changed(others)  # their st_nlink went down

    @_locked
    def rmdir(self, path: str) -> None:
        self._writable()
        if not path:
            raise err(errno.EBUSY, "/")
        in_upper = self._need_dir(path)
        if self._listdir(path):
            raise err(errno.ENOTEMPTY, path)
        parent, _ = _parent_name(path)
        self._copy_up_dir(parent)
        assert self.upper is not None and self.work is not None
        whiteout = self._lower_below(path)
        if in_upper:
            # The directory may still hold whiteouts: take it out of the tree atomically
            # (swapped with its whiteout, or moved away), then empty it in the work dir.
            tmp = self._tmpname()
            if whiteout:
                self.work.mknod(tmp, stat.S_IFCHR, 0)
                move(self.work, tmp, self.upper, path, RENAME_EXCHANGE)
            else:
                move(self.upper, path, self.work, tmp)
            self._remove_work_tree(tmp)
        else:
            self.upper.mknod(path, stat.S_IFCHR, 0)
        self._forget(path)
        if whiteout:
            self._record(path, WHITEOUT)

    def _remove_work_tree(self, rel: str) -> None:
        assert self.work is not None
        # Depth first with an explicit stack (a tree may nest deeper than Python recurses):
        # a directory is removed once it has been seen a second time, emptied.
        stack = [(rel, False)]
        while stack:
            p, emptied = stack.pop()
            if emptied:
                self.work.rmdir(p)
                continue
            try:
                st = self.work.lstat(p)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append((p, True))
                stack.extend((f"{p}/{name}", False) for name in self.work.listdir(p))
            else:
                self.work.unlink(p)

    @_locked
    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self._writable()
        if flags & RENAME_EXCHANGE and not flags & ~RENAME_EXCHANGE:
            self._exchange(old, new)
            return
        if flags & ~RENAME_NOREPLACE:
            raise err(errno.EINVAL)  # RENAME_WHITEOUT is the kernel's own business
        if _parent_name(new)[1].startswith(HIDDEN_PREFIX) and self._detach(old, new):
            return
        _, kind = self._need(old)
        _check_name(new)
        self._need_dir(_parent_name(new)[0])
        if new == old:
            return
        if new.startswith(old + "/"):
            raise err(errno.EINVAL, new)
        target = self._node(new)
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise err(errno.EEXIST, new)
            t_up, t_kind = target
            if kind == DIR and t_kind != DIR:
                raise err(errno.ENOTDIR, new)
            if kind != DIR and t_kind == DIR:
                raise err(errno.EISDIR, new)
            if t_kind == DIR and self._listdir(new):
                raise err(errno.ENOTEMPTY, new)
            if kind != DIR and self._same_inode(old, new):
                return  # POSIX: renaming a name onto another link of the same file does nothing
        assert self.upper is not None and self.work is not None
        if kind == DIR:
            self._copy_up_tree(old)
        elif old not in self._up:
            self._copy_up(old)
        self._copy_up_dir(_parent_name(new)[0])
        whiteout = self._lower_below(old)
        if target is not None and target[1] == DIR and target[0]:
            tmp = self._tmpname()  # an upper dir that only looks empty: move it out first
            move(self.upper, new, self.work, tmp)
            self._remove_work_tree(tmp)
            self._forget(new)
        if kind == DIR and new in self.idx.entries:
            # The lower has something at the new name: the moved tree must hide it.
            self.upper.setxattr(old, OPAQUE_XATTR, b"y")
            self._set_opaque(old)
        if kind == DIR and self._up.get(new) == WHITEOUT:
            self.upper.unlink(new)
            self._forget(new)
        # A replaced hard-linked target: its other names' st_nlink goes down (as in unlink).
        replaced = self._others(new) if target is not None and target[1] != DIR else []
        move(self.upper, old, self.upper, new, RENAME_WHITEOUT if whiteout else 0)
        self._move_mirror(old, new)
        if whiteout:
            self._record(old, WHITEOUT)
        self._changed(replaced)

    def _exchange(self, a: str, b: str) -> None:
        """renameat2(RENAME_EXCHANGE): both names exist and swap places, atomically."""
        _, a_kind = self._need(a)
        _, b_kind = self._need(b)
        if a == b or (a_kind != DIR and b_kind != DIR and self._same_inode(a, b)):
            return
        if b.startswith(a + "/") or a.startswith(b + "/"):
            raise err(errno.EINVAL, b)
        assert self.upper is not None
        for p, kind in ((a, a_kind), (b, b_kind)):
            if kind == DIR:
                self._copy_up_tree(p)
            elif p not in self._up:
                self._copy_up(p)
        for src, dst, kind in ((a, b, a_kind), (b, a, b_kind)):
            if kind == DIR and dst in self.idx.entries:
                # Whatever the lower has at its new name must stay hidden under it.
                self.upper.setxattr(src, OPAQUE_XATTR, b"y")
                self._set_opaque(src)
        others = self._others(a) + self._others(b)
        move(self.upper, a, self.upper, b, RENAME_EXCHANGE)
        self._relocate([(a, b), (b, a)], forget=[a, b])
        self._changed(others)

    def _same_inode(self, a: str, b: str) -> bool:
        na, nb = self._need(a), self._need(b)
        ia = self._ino_of(a, na[0])
        return ia == self._ino_of(b, nb[0]) and (na[0] == nb[0])

    def _move_mirror(self, old: str, new: str) -> None:
        """Move the mirror's record of `old` (and its subtree) to `new`, replacing `new`."""
        self._relocate([(old, new)], forget=[old, new])

    def _relocate(self, pairs: list[tuple[str, str]], forget: list[str]) -> None:
        """Move mirror subtrees (all at once, so two can swap places)."""
        moved: list[tuple[str, str, str, bool, int | None]] = []
        groups: dict[int, set[str]] = {}
        for old, new in pairs:
            stack = [old]
            while stack:
                p = stack.pop()
                k = self._up[p]
                moved.append((new, p[len(old) :], k, p in self._opaque, self._ino.get(p)))
                host_ino = self._link_of.get(p)
                if host_ino is not None:
                    groups[host_ino] = set(self._links[host_ino])
                if k == DIR:
                    stack.extend(f"{p}/{n}" for n in self._kids.get(p, ()))
        for p in forget:
            self._forget(p)
        for new, suffix, k, opaque, ino in sorted(moved, key=lambda m: m[1].count("/")):
            p = new + suffix
            self._record(p, k)
            if opaque:
                self._set_opaque(p)
            if ino is not None:
                self._ino[p] = ino

        def moved_to(path: str) -> str:
            for old, new in pairs:
                if path == old or path.startswith(old + "/"):
                    return new + path[len(old) :]
            return path

        for h in self._handles.values():
            if h.path is not None:
                h.path = moved_to(h.path)
        for host_ino, names in groups.items():
            self._add_links(sorted(moved_to(p) for p in names), host_ino)
        if any(m[2] == DIR for m in moved):
            # A moved directory changes listings and link counts of a whole subtree. A moved
            # file changes only its two parents' listings, which _forget and _record dropped
            # (link counts count directories only): a rename costs no rescan of a big directory.
            self._listing.clear()
            self._nlinks.clear()

    # -- copy-up --------------------------------------------------------------------------------

    def _tmpname(self) -> str:
        return f"{_WORK_PREFIX}{os.getpid()}-{next(self._tmp)}"

    def _clean_work(self, names: list[str]) -> None:
        assert self.work is not None
        for name in names:
            if name.startswith(_WORK_PREFIX):
                self._remove_work_tree(name)

    def _copy_up_dir(self, path: str) -> None:
        """Make sure the directory `path` (and its parents) exists in the upper."""
        # A loop, not recursion: images nest directories thousands deep (Python stops at 1000).
        missing = []
        while self._up.get(path) != DIR:
            missing.append(path)
            path = _parent_name(path)[0]
        for p in reversed(missing):
            self._copy_up(p)

    def _copy_up(self, path: str, *, data: bool = True) -> None:
        """Copy the visible lower entry at `path` into the upper, with its hard-link group."""
        e = self._lower(path)
        if e is None or path in self._up:
            raise err(errno.ENOENT, path)
        ino = self.idx.ino[path]
        aliases = [path]
        if e.kind != DIR:
            group = self.idx.aliases.get(ino, ())
            aliases += [p for p in group if p != path and p not in self._up and not self._hidden(p)]
        for p in aliases:
            self._copy_up_dir(_parent_name(p)[0])
        assert self.upper is not None and self.work is not None
        tmp = self._tmpname()
        settle = self._build_copy(tmp, path, e, ino, data)
        tmps = [tmp]
        try:
            for _ in aliases[1:]:
                extra = self._tmpname()
                link(self.work, tmp, self.work, extra)
                tmps.append(extra)
            for p, t in zip(aliases, tmps, strict=True):
                parent = _parent_name(p)[0]
                # Copy-up is not a change of the parent: keep its times, as overlayfs does.
                pst = self.upper.lstat(parent)
                move(self.work, t, self.upper, p)
                self.upper.utime(parent, (pst.st_atime_ns, pst.st_mtime_ns))
                self._record(p, e.kind)
                self._ino[p] = ino
            if len(aliases) > 1:
                self._add_links(aliases, self.upper.lstat(path).st_ino)
        except BaseException:
            if settle >= 0:
                os.close(settle)
            for t in tmps:
                self._remove_work_tree(t)
            raise
        if settle >= 0:
            self._settler.add(os.fstat(settle).st_ino, settle)

    def _build_copy(self, tmp: str, path: str, e: Entry, ino: int, data: bool) -> int:
        """Build the copy of lower entry `e` as `tmp` in the work dir, metadata last; return
        the fd of a copy to settle after its rename (cowfs/settling.py), else -1."""
        assert self.work is not None
        w = self.work
        settle = -1
        try:
            if e.kind == REG:
                # Read and write: a raw object's copy is verified where it was written.
                fd = w.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    if data and e.size:
                        layer = self.layers[self.idx.layer[path]]
                        source = layer.source_of(e) if self._marks_hold else None
                        # The size first: zero frames that are not written stay holes, and
                        # no truncate has to wait for a page that is being written back.
                        os.ftruncate(fd, e.size)
                        layer.copy_into(path, e, fd, not self.volatile and source is None)
                        if source is not None:
                            # Marked, and synced after the rename: cowfs/settling.py.
                            self._ensure_mark()
                            os.setxattr(fd, PENDING_XATTR, source.encode())
                            settle, fd = fd, -1
                        elif not self.volatile:
                            # As overlayfs does: the copy is on disk before the rename makes
                            # it hide the lower file, so a host crash cannot leave holes there.
                            os.fdatasync(fd)
                finally:
                    if fd >= 0:
                        os.close(fd)
            elif e.kind == DIR:
                w.mkdir(tmp, 0o700)
            elif e.kind == SYMLINK:
                w.symlink(e.target, tmp)
            else:
                w.mknod(tmp, e.st_mode & ~0o7777 | 0o600, e.rdev)
            # chown clears setuid bits and security.capability: owner first, then mode, xattrs.
            w.lchown(tmp, e.uid, e.gid)
            if e.kind != SYMLINK:
                w.chmod(tmp, e.mode)
            for key, value in (e.xattrs or {}).items():
                w.setxattr(tmp, _host_xattr(key), value)
            w.setxattr(tmp, ORIGIN_XATTR, str(ino).encode())
            w.utime(tmp, (e.atime, e.mtime))
        except BaseException:
            if settle >= 0:
                os.close(settle)
            self._remove_work_tree(tmp)
            raise
        return settle

    # -- settling copies after a crash (cowfs/settling.py) --------------------------------------

    def _ensure_mark(self) -> None:
        """The work dir's mark that copies may be waiting for their sync: made before the first
        copy's own mark and rename, so the journal has it on the disk no later than those."""
        if self._mark is None:
            assert self.work is not None
            mark = MARK_PREFIX + boot_id()
            try:
                self.work.mkdir(mark, 0o700)
            except FileExistsError:
                pass
            self._mark = mark

    def _settle_failed(self, ino: int, exc: OSError) -> None:
        # The copy keeps its mark: a mount after a host crash repairs it from its object.
        os.write(2, f"cowfs: a copy-up (host inode {ino}) could not be synced: {exc}\n".encode())

    def _recover(self, marks: list[str]) -> None:
        """Settle the copies a mount that did not end cleanly left marked (`marks`: the work
        dir's pending.* entries); after a host crash, fill their holes from their objects first
        (see cowfs/settling.py)."""
        assert self.work is not None and self.upper is not None
        if not marks:
            return
        host_crashed = marks != [MARK_PREFIX + boot_id()]
        repairers = [layer for layer in self.layers if hasattr(layer, "restore_holes")]
        for path, kind in list(self._up.items()):
            if kind != REG:
                continue
            try:
                source = self.upper.getxattr(path, PENDING_XATTR).decode()
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                continue
            fd = self.upper.open(path, os.O_RDWR)
            try:
                if host_crashed:
                    if not repairers:
                        raise CowfsError(f"/{path}: a copy-up cut short by a crash, and no "
                                         f"layer of this mount has object {source} to repair "
                                         f"it from", errno=errno.EIO)  # fmt: skip
                    repairers[0].restore_holes(source, fd)
                os.fdatasync(fd)
                os.removexattr(fd, PENDING_XATTR)
            finally:
                os.close(fd)
        self.upper.syncfs()
        for mark in marks:
            self.work.rmdir(mark)

    def _copy_up_tree(self, path: str) -> None:
        """Copy a directory and everything visible below it into the upper (for rename)."""
        self._copy_up_dir(path)
        prefix = path + "/" if path else ""
        for name, up in self._listdir(path):
            child = prefix + name
            if up:
                if self._up[child] == DIR:
                    self._copy_up_tree(child)
                continue
            e = self.idx.entries[child]
            if e.kind == DIR:
                self._copy_up_tree(child)
            elif child not in self._up:
                self._copy_up(child)
