"""A host directory addressed by relative paths of any length, through directory fds.

The union filesystem keeps its upper and work directories (and plain-directory lowers) open as
directory fds and works on them with *at calls only. A relative path shorter than PATH_MAX is
resolved by the kernel from the root fd in one call; a longer one is walked in chunks, so paths
deeper than PATH_MAX inside a mount keep working. Only `parent()` knows about the difference.
"""

from __future__ import annotations

import ctypes
import errno
import os

# Resolve at most this many bytes per call: comfortably below PATH_MAX (4096).
_CHUNK = 3000
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(src_fd: int, src: str, dst_fd: int, dst: str, flags: int = 0) -> None:
    """renameat2(2): os.rename cannot exchange or leave a whiteout behind."""
    if _renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src)


_SYNC_FILE_RANGE_WRITE = 2
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): queue a range's dirty pages for writing, without
    waiting. Only a head start for a later fdatasync, which reports any failure: ignored here."""
    _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# copy_file_range(2) refuses these between two filesystems (EXDEV since Linux 5.19, unless both
# are one driver that copies across them) or where the filesystem cannot do it.
_NO_COPY_RANGE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def copy_range(src: int, dst: int, count: int, pos: int) -> int:
    """Copy up to `count` bytes at `pos` of file `src` to the same offset of file `dst`, in the
    kernel; return how many were copied (0 at the end of `src`). From one filesystem to another
    it takes sendfile(2), which splices between any two files but writes at `dst`'s own file
    offset: `dst` is moved there first."""
    try:
        return os.copy_file_range(src, dst, count, pos, pos)
    except OSError as exc:
        if exc.errno not in _NO_COPY_RANGE:
            raise
    os.lseek(dst, pos, os.SEEK_SET)
    return os.sendfile(dst, src, pos, count)


# cachestat(2), Linux >= 6.5. New system calls have one number on every architecture.
_SYS_CACHESTAT = 451


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


def cached_pages(fd: int, offset: int = 0, length: int = 0) -> int | None:
    """How many pages of a file's range (length 0: to the end) are in the page cache, without
    mapping it; None where the kernel cannot tell (older than 6.5)."""
    rng, out = _CachestatRange(offset, length), _Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(out), 0) != 0:
        return None
    return out.nr_cache


class _At:
    __slots__ = ("fd", "name", "owned")

    def __init__(self, fd: int, name: str, owned: bool) -> None:
        self.fd, self.name, self.owned = fd, name, owned

    def __enter__(self) -> tuple[int, str]:
        return self.fd, self.name

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            os.close(self.fd)


class HostDir:
    """An open host directory; `rel` paths are '/'-separated, '' is the directory itself."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def syncfs(self) -> None:
        """Write everything of this directory's filesystem to disk (syncfs(2))."""
        if _libc.syncfs(self.fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def parent(self, rel: str) -> _At:
        """(dir fd, name) such that `name` relative to `dir fd` is `rel`; '' gives (root, '.').
        A context manager (it closes a dir fd it had to open); a class, not @contextmanager:
        this is on the path of nearly every call of the union filesystem."""
        if len(rel) < _CHUNK // 4 or len(os.fsencode(rel)) < _CHUNK:
            return _At(self.fd, rel or ".", False)
        parent, _, name = rel.rpartition("/")
        return _At(self.walk(parent), name, True)

    def walk(self, rel: str) -> int:
        """A new O_PATH fd for the directory `rel`, opened chunk by chunk."""
        fd = os.dup(self.fd)
        parts = rel.split("/") if rel else []
        i = 0
        try:
            while i < len(parts):
                chunk, size = [], 0
                while i < len(parts):
                    n = len(os.fsencode(parts[i])) + 1
                    if chunk and size + n >= _CHUNK:
                        break
                    chunk.append(parts[i])
                    size += n
                    i += 1
                nfd = os.open("/".join(chunk), _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def xattr_path(self, fd: int, name: str) -> str:
        """A path for the *xattr calls, which have no dir_fd form."""
        # "/proc/self/fd/N" alone is the magic link itself (follow_symlinks=False acts on it,
        # ENOTSUP); "/proc/self/fd/N/." is the directory.
        return f"/proc/self/fd/{fd}/{name}"

    # -- the calls the union filesystem needs ------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result:
        with self.parent(rel) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        with self.parent(rel) as (fd, name):
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)

    def opendir(self, rel: str) -> int:
        with self.parent(rel) as (fd, name):
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=fd)  # fmt: skip

    def readlink(self, rel: str) -> str:
        with self.parent(rel) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def getxattr(self, rel: str, key: str) -> bytes:
        with self.parent(rel) as (fd, name):
            return os.getxattr(self.xattr_path(fd, name), key, follow_symlinks=False)

    def listxattr(self, rel: str) -> list[str]:
        with self.parent(rel) as (fd, name):
            return os.listxattr(self.xattr_path(fd, name), follow_symlinks=False)

    def setxattr(self, rel: str, key: str, value: bytes, flags: int = 0) -> None:
        with self.parent(rel) as (fd, name):
            os.setxattr(self.xattr_path(fd, name), key, value, flags, follow_symlinks=False)

    def removexattr(self, rel: str, key: str) -> None:
        with self.parent(rel) as (fd, name):
            os.removexattr(self.xattr_path(fd, name), key, follow_symlinks=False)

    def chmod(self, rel: str, mode: int) -> None:
        with self.parent(rel) as (fd, name):
            os.chmod(name, mode, dir_fd=fd)

    def lchown(self, rel: str, uid: int, gid: int) -> None:
        with self.parent(rel) as (fd, name):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

    def utime(self, rel: str, ns: tuple[int, int]) -> None:
        with self.parent(rel) as (fd, name):
            os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)

    def mkdir(self, rel: str, mode: int) -> None:
        with self.parent(rel) as (fd, name):
            os.mkdir(name, mode, dir_fd=fd)

    def mknod(self, rel: str, mode: int, rdev: int = 0) -> None:
        with self.parent(rel) as (fd, name):
            os.mknod(name, mode, rdev, dir_fd=fd)

    def symlink(self, target: str, rel: str) -> None:
        with self.parent(rel) as (fd, name):
            os.symlink(target, name, dir_fd=fd)

    def unlink(self, rel: str) -> None:
        with self.parent(rel) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def rmdir(self, rel: str) -> None:
        with self.parent(rel) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def listdir(self, rel: str) -> list[str]:
        fd = self.opendir(rel)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)


def move(src: HostDir, src_rel: str, dst: HostDir, dst_rel: str, flags: int = 0) -> None:
    """renameat2 between two host dirs (same filesystem), long paths included."""
    with src.parent(src_rel) as (sfd, sname), dst.parent(dst_rel) as (dfd, dname):
        renameat2(sfd, sname, dfd, dname, flags)


def link(src: HostDir, src_rel: str, dst: HostDir, dst_rel: str) -> None:
    with src.parent(src_rel) as (sfd, sname), dst.parent(dst_rel) as (dfd, dname):
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
