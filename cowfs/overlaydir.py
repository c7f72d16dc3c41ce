"""A host directory in kernel-overlayfs format, read into a layer `Toc` (and written, for uppers).

The format is the one `mount -t overlay` uses for its upper and lower directories:

- a whiteout (an entry deleted from the layers below) is a character device 0/0;
- an opaque directory (lower contents hidden) carries `trusted.overlay.opaque=y`
  (`user.overlay.opaque=y` when overlayfs runs with `userxattr`);
- everything else is an ordinary file, directory, symlink or special file.

`scan()` walks such a directory into a Toc: metadata with times in ns, xattrs (without overlayfs's
and cowfs's own bookkeeping xattrs), hard links as link groups (by st_dev/st_ino), optionally the
xxh128 of every file. It is used for plain-directory lowers (`-o lowerdir=`), by `diff` and by
`commit`. It walks with directory fds and *at calls only, so paths longer than PATH_MAX work and
nothing is resolved twice; 60k entries scan in well under a second without hashing.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

import xxhash

from cowfs.errors import InvalidInput, NotFound
from cowfs.settling import PENDING_XATTR, unsettled
from cowfs.toc import BLK, CHR, DIR, REG, SYMLINK, Entry, Toc, kind_of_mode

OPAQUE_XATTR = "trusted.overlay.opaque"
USER_OPAQUE_XATTR = "user.overlay.opaque"
# Xattrs that describe the layering itself, not the file: never copied into a layer.
BOOKKEEPING_PREFIXES = ("trusted.overlay.", "user.overlay.", "trusted.cowfs.", "user.cowfs.")
_ESCAPED = ("trusted.overlay.overlay.", "user.overlay.overlay.")
# Overlayfs features that change what the upper means; a scan that ignored them would be wrong.
_UNSUPPORTED = ("trusted.overlay.redirect", "trusted.overlay.metacopy")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_CHUNK = 1 << 20


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_bookkeeping(name: str) -> bool:
    return name.startswith(BOOKKEEPING_PREFIXES)


def user_xattr(name: str) -> str | None:
    """What a stored xattr name means to users: None for bookkeeping; an escaped name
    (overlayfs 6.7+ stores a user's `trusted.overlay.X` as `trusted.overlay.overlay.X`) is
    unescaped."""
    for escaped in _ESCAPED:
        if name.startswith(escaped):
            return escaped.removesuffix("overlay.") + name[len(escaped) :]
    return None if is_bookkeeping(name) else name


def make_whiteout(dir_fd: int, name: str) -> None:
    """Create the whiteout `name` in the directory open as `dir_fd` (needs CAP_MKNOD)."""
    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)


def mark_opaque(dir_fd: int) -> None:
    """Mark the directory open as `dir_fd` opaque, as kernel overlayfs does."""
    os.setxattr(dir_fd, OPAQUE_XATTR, b"y")


def fd_path(dir_fd: int, name: str) -> str:
    """A short path to `name` inside an open directory: works however long the real path is.

    Used for the calls that have no dir_fd form (the *xattr family); the last component is not
    followed when the caller passes follow_symlinks=False.
    """
    return f"/proc/self/fd/{dir_fd}/{name}"


def read_xattrs(dir_fd: int, name: str) -> dict[str, bytes]:
    """All xattrs of `name` (not following a symlink), bookkeeping included; of the directory
    itself when `name` is ""."""
    # /proc/self/fd/N is itself a symlink: the directory's own xattrs are read through its fd.
    path: str | int = fd_path(dir_fd, name) if name else dir_fd
    nofollow = isinstance(path, str)  # (os refuses follow_symlinks=False with an fd)
    try:
        names = os.listxattr(path, follow_symlinks=not nofollow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for key in names:
        try:
            out[key] = os.getxattr(path, key, follow_symlinks=not nofollow)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed while we looked
                raise
    return out


def hash_file(dir_fd: int, name: str) -> str:
    """xxh128 hex of a regular file's bytes ("" for an empty file), as the object store keys it."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        # O_NOATIME: hashing must not change the atime that the scan records (or others see).
        fd = os.open(name, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
        fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        h = xxhash.xxh128()
        empty = True
        while chunk := os.read(fd, _READ_CHUNK):
            h.update(chunk)
            empty = False
        return "" if empty else h.hexdigest()
    finally:
        os.close(fd)


def open_under(root: str | os.PathLike, rel: str) -> BinaryIO:
    """Open the regular file `rel` under `root` for reading: component by component with dir
    fds (any path length), following no symlink on the way."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        *dirs, name = rel.split("/")
        for d in dirs:
            sub = os.open(d, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            ffd = os.open(name, flags | os.O_NOATIME, dir_fd=fd)
        except PermissionError:
            ffd = os.open(name, flags, dir_fd=fd)
    finally:
        os.close(fd)
    return os.fdopen(ffd, "rb")


@dataclass(slots=True)
class _Frame:
    fd: int
    prefix: str  # layer path of this directory ('' for the root)
    names: list[str]
    pos: int = 0


class _Scanner:
    def __init__(self, hash_contents: bool, keep_bookkeeping: bool) -> None:
        self.hash_contents = hash_contents
        self.keep_bookkeeping = keep_bookkeeping
        self.toc = Toc()
        self.digests: dict[tuple[int, int], str] = {}  # (dev, ino) -> xxh128: hash once per inode
        self.candidates: dict[tuple[int, int], list[Entry]] = {}

    def entry(self, dir_fd: int, name: str, path: str, st: os.stat_result) -> Entry:
        kind = kind_of_mode(st.st_mode)
        e = Entry(path, kind, st.st_mode & 0o7777, st.st_uid, st.st_gid,
                  st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)  # fmt: skip
        xattrs = read_xattrs(dir_fd, name)
        if xattrs:  # rare: keep the common case cheap
            self._layering_xattrs(e, xattrs)
        if kind == REG:
            e.size = st.st_size
            if st.st_nlink > 1:
                self.candidates.setdefault((st.st_dev, st.st_ino), []).append(e)
            if self.hash_contents and st.st_size:
                key = (st.st_dev, st.st_ino)
                if key not in self.digests:
                    self.digests[key] = hash_file(dir_fd, name)
                e.digest = self.digests[key]
        elif kind == DIR:
            pass
        else:
            if kind == SYMLINK:
                e.target = os.readlink(name, dir_fd=dir_fd)
                e.size = st.st_size
            elif kind in (CHR, BLK):
                e.rdev = st.st_rdev
            if st.st_nlink > 1:  # symlinks and special files can be hard-linked too
                self.candidates.setdefault((st.st_dev, st.st_ino), []).append(e)
        return e

    def _layering_xattrs(self, e: Entry, xattrs: dict[str, bytes]) -> None:
        for key in _UNSUPPORTED:
            if key in xattrs:
                feature = key.rsplit(".", 1)[1]
                raise InvalidInput(f"{e.path or '/'}: overlayfs {feature} is not supported")
        if e.kind == DIR and b"y" in (xattrs.get(OPAQUE_XATTR), xattrs.get(USER_OPAQUE_XATTR)):
            self.toc.opaque.add(e.path)
        if not self.keep_bookkeeping:
            if PENDING_XATTR in xattrs:
                raise unsettled(e.path)  # its content is about to become a layer's
            xattrs = {user_xattr(k): v for k, v in xattrs.items() if user_xattr(k) is not None}
        e.xattrs = xattrs or None

    def scan(self, root: str) -> Toc:
        try:
            root_fd = os.open(root, _DIR_FLAGS)
        except FileNotFoundError:
            raise NotFound(f"directory {root} does not exist") from None
        except NotADirectoryError:
            raise InvalidInput(f"{root} is not a directory") from None
        stack = [_Frame(root_fd, "", [])]
        try:
            self.toc.add(self.entry(root_fd, "", "", os.fstat(root_fd)))
            stack[0].names = _sorted_names(root_fd)
            while stack:
                frame = stack[-1]
                if frame.pos >= len(frame.names):
                    os.close(stack.pop().fd)
                    continue
                name = frame.names[frame.pos]
                frame.pos += 1
                path = f"{frame.prefix}/{name}" if frame.prefix else name
                try:
                    st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we looked: it is not part of the layer
                if st.st_rdev == 0 and stat.S_ISCHR(st.st_mode):  # is_whiteout(), inlined
                    self.toc.whiteouts.add(path)
                    continue
                self.toc.add(self.entry(frame.fd, name, path, st))
                if stat.S_ISDIR(st.st_mode):
                    fd = os.open(name, _DIR_FLAGS, dir_fd=frame.fd)
                    try:
                        names = _sorted_names(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                    stack.append(_Frame(fd, path, names))
        finally:
            for frame in stack:
                os.close(frame.fd)
        self._assign_link_groups()
        return self.toc

    def _assign_link_groups(self) -> None:
        # Only inodes seen under more than one path inside this tree form a group; numbering
        # follows the first path of each group so equal trees give equal TOCs (and layer ids).
        groups = [
            sorted(es, key=lambda e: e.path) for es in self.candidates.values() if len(es) > 1
        ]
        groups.sort(key=lambda es: es[0].path)
        for n, members in enumerate(groups, start=1):
            for e in members:
                e.link = n


def _sorted_names(dir_fd: int) -> list[str]:
    with os.scandir(dir_fd) as it:
        return sorted(e.name for e in it)


def scan(
    root: str | os.PathLike, *, hash_contents: bool = False, keep_bookkeeping: bool = False
) -> Toc:
    """Read the overlayfs-format directory `root` into a Toc.

    Whiteouts go to `toc.whiteouts`, opaque directories to `toc.opaque` (they are entries too).
    With `hash_contents`, every regular file's `digest` is its xxh128 (each hard-link group is
    read once); otherwise digests are left "" and the caller reads contents from the host.
    With `keep_bookkeeping`, overlayfs's and cowfs's own xattrs stay in the entries (for `diff`,
    which reads copy-up origins from them); a layer must never carry them.
    """
    return _Scanner(hash_contents, keep_bookkeeping).scan(os.fspath(root))
