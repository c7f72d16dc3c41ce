"""The libfuse engine: mfusepy on libfuse3 over `cowfs.unionfs.UnionFS` (see cowfs/fuse.py).

It turns FUSE's absolute paths into union paths, fills stat buffers, and translates exceptions to
errno in one place (`_CowfsFUSE._wrapper`). Everything the filesystem means lives in unionfs.

Options, and why:
- use_ino: st_ino and readdir's d_ino are the union's stable numbers;
- long entry/attr/negative timeouts: lower layers are immutable and every change goes through
  this mount (DESIGN decision 2), so the kernel may cache names and attributes;
- keep_cache per open file of the lower (its content cannot change), not for upper files;
- no hard_remove: libfuse keeps an unlinked open file reachable (fstat, fchmod) under a
  .fuse_hidden name, which unionfs serves from the open handle without showing it anywhere;
- readdirplus with full attributes: a stat-walk costs one request per directory, not per file;
- default_permissions (the kernel checks modes as for any filesystem), allow_other as root;
- single-threaded loop, no writeback cache by default. Measured on 5000 small files + 64 MiB
  (medians of 5, interleaved): threads cost ~30% more daemon CPU and were slower at read-all
  (7.1 s vs 4.8 s) and small-file churn; the writeback cache gained 5-20% on churn and read-all
  but, with libfuse's path API, dirty pages of one hard-link name are not seen through the
  others and unlinked open files get EIO on writeback. Both stay options (threads=, writeback=).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would pick libfuse2 if installed

import mfusepy  # noqa: E402

from cowfs.errors import CowfsError  # noqa: E402
from cowfs.fuse import CACHE_TIMEOUT, log_failure  # noqa: E402
from cowfs.fusedev import raise_readahead  # noqa: E402
from cowfs.unionfs import Owner, UnionFS  # noqa: E402

INVALIDATE_WAIT = 0.2  # seconds; normally done in microseconds
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_READDIR_PLUS = 1
FUSE_FILL_DIR_PLUS = 2


def _path(path: str | None) -> str:
    """FUSE's '/a/b' -> the union's 'a/b' ('' for the root)."""
    return path[1:] if path else ""


def _opt(path: str | None) -> str | None:
    """Like _path, but None (an unlinked open file) stays None."""
    return None if path is None else path[1:]


class _CowfsFUSE(mfusepy.FUSE):
    """mfusepy.FUSE with the few callbacks whose mfusepy form loses information."""

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> int:
        # The one place exceptions become errnos. Expected failures (ENOENT lookups above all)
        # cost no logging; anything unexpected is logged once and answered with EIO.
        try:
            return func(*args, **kwargs) or 0
        except OSError as exc:
            if isinstance(exc.errno, int) and exc.errno > 0:
                return -exc.errno
            log_failure(getattr(func, "__name__", func))
            return -errno.EIO
        except CowfsError as exc:
            return -exc.errno
        except Exception:
            if getattr(func, "__name__", "").startswith("init"):
                raise
            log_failure(getattr(func, "__name__", func))
            return -errno.EIO
        except BaseException as exc:
            # As mfusepy does: a SystemExit or KeyboardInterrupt stops the loop and is raised
            # again when FUSE() returns, instead of being swallowed by libfuse.
            self._FUSE__critical_exception = exc
            mfusepy.fuse_exit()
            return -errno.EFAULT

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(os.fsdecode(old), os.fsdecode(new), flags)

    # setattr-style calls get the open file too: libfuse may give no path for an open file.

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        if buf:
            a, m = buf.contents.actime, buf.contents.modtime
            times = ((a.tv_sec, a.tv_nsec), (m.tv_sec, m.tv_nsec))
        else:
            now = (0, (1 << 30) - 1)  # UTIME_NOW for both
            times = (now, now)
        return self.operations.utimens(_dec(path), times, _fh(fip))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.operations.chmod(_dec(path), mode, _fh(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        # uid/gid (uid_t)-1 means "leave unchanged"
        uid = -1 if uid == 0xFFFFFFFF else uid
        gid = -1 if gid == 0xFFFFFFFF else gid
        return self.operations.chown(_dec(path), uid, gid, _fh(fip))

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(_dec(path), length, _fh(fip))

    def readdir_fuse_3(self, path, buf, filler, offset, fip, flags) -> int:  # noqa: ANN001
        # Entries carry offsets (index + 1): only in that mode does libfuse pass readdirplus
        # attributes on to the kernel, which then needs no LOOKUP per entry of a stat-walk.
        plus = bool(flags & FUSE_READDIR_PLUS)
        fill_flags = FUSE_FILL_DIR_PLUS if plus else 0
        entries = self.operations.listing(_dec(path), fip.contents.fh, offset)
        st = mfusepy.c_stat()
        for i in range(offset, len(entries)):
            name, attrs = entries[i]
            ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
            if plus:
                _fill_stat(st, attrs)
            else:
                st.st_ino = attrs["st_ino"]
                st.st_mode = attrs["st_mode"]
            if filler(buf, os.fsencode(name), st, i + 1, fill_flags):
                break
        return 0

    def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
        ctypes.memset(buf, 0, ctypes.sizeof(mfusepy.c_stat))
        fh = fip.contents.fh if fip else None
        _fill_stat(buf.contents, self.operations.getattr(_dec(path), fh))
        return 0


def _fill_stat(st: Any, attrs: dict[str, int]) -> None:
    """A stat dict of unionfs (times in ns) into a struct stat: the hot path of every lookup."""
    st.st_mode = attrs["st_mode"]
    st.st_ino = attrs["st_ino"]
    st.st_nlink = attrs["st_nlink"]
    st.st_uid = attrs["st_uid"]
    st.st_gid = attrs["st_gid"]
    st.st_size = attrs["st_size"]
    st.st_rdev = attrs["st_rdev"]
    st.st_blksize = attrs["st_blksize"]
    st.st_blocks = attrs["st_blocks"]
    st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = divmod(attrs["st_atime"], 1_000_000_000)
    st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(attrs["st_mtime"], 1_000_000_000)
    st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(attrs["st_ctime"], 1_000_000_000)


def _dec(path: bytes | None) -> str | None:
    return None if path is None else os.fsdecode(path)


def _fh(fip: Any) -> int | None:
    return fip.contents.fh if fip else None


class Operations(mfusepy.Operations):
    """FUSE callbacks, each a one-line hand-over to the union filesystem."""

    use_ns = True

    def __init__(self, fs: UnionFS, *, writeback: bool = False,
                 on_ready: Callable[[dict[str, bool]], None] | None = None,
                 mountpoint: str | None = None) -> None:  # fmt: skip
        self.fs = fs
        self.mountpoint = mountpoint  # its real path, for raise_readahead
        self.writeback = writeback
        self.on_ready = on_ready
        self._queue: queue.SimpleQueue[tuple[list[str], threading.Event] | None] = (
            queue.SimpleQueue()
        )
        self._dirs: dict[int, list[tuple[str, dict]]] = {}
        self._dir_ids = itertools.count(1)

    def init_with_config(self, conn: Any, config: Any) -> None:
        self._start_invalidator()
        if self.mountpoint is not None:
            threading.Thread(target=raise_readahead, args=(self.mountpoint,),
                             name="cowfs-readahead", daemon=True).start()  # fmt: skip
        if config is not None:
            config.use_ino = 1
            config.readdir_ino = 0
            config.nullpath_ok = 0
            config.hard_remove = 0  # see unionfs: hidden names of unlinked open files
            config.kernel_cache = 0
            config.entry_timeout = CACHE_TIMEOUT
            config.attr_timeout = CACHE_TIMEOUT
            config.negative_timeout = CACHE_TIMEOUT
        writeback = bool(conn is not None and self.writeback
                         and conn.capable & FUSE_CAP_WRITEBACK_CACHE)  # fmt: skip
        if writeback:
            conn.want |= FUSE_CAP_WRITEBACK_CACHE
        if self.on_ready is not None:
            # INIT arrives once the mount exists: from here on the mount is live.
            self.on_ready({"passthrough": False, "writeback": writeback})

    def destroy(self, path: str) -> None:
        self._queue.put(None)
        self.fs.close()

    def _start_invalidator(self) -> None:
        """Invalidate kernel caches of other names of a changed hard-linked file.

        libfuse's path API gives every name its own kernel inode, so after a change through one
        name the others' cached pages and attributes are stale. The notifications go out from a
        thread of their own, and the loop waits for them only briefly: an invalidation can wait
        on a page lock held by a read that only this loop can answer.
        """
        lib = mfusepy._libfuse
        lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        fuse_ptr = ctypes.c_void_p(lib.fuse_get_context().contents.fuse)

        def run() -> None:
            while (item := self._queue.get()) is not None:
                paths, done = item
                for p in paths:
                    lib.fuse_invalidate_path(fuse_ptr, os.fsencode("/" + p))
                done.set()

        threading.Thread(target=run, name="cowfs-invalidate", daemon=True).start()
        self.fs.notify = self._invalidate

    def _invalidate(self, paths: list[str]) -> None:
        done = threading.Event()
        self._queue.put((paths, done))
        done.wait(INVALIDATE_WAIT)

    @staticmethod
    def _owner() -> Owner:
        uid, gid, _ = mfusepy.fuse_get_context()
        return Owner(uid, gid)

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        if fh is not None:
            return self.fs.fgetattr(fh)
        return self.fs.getattr(_path(path))

    def opendir(self, path: str) -> int:
        fh = next(self._dir_ids)
        self._dirs[fh] = []
        return fh

    def listing(self, path: str | None, fh: int, offset: int) -> list[tuple[str, dict]]:
        """A directory's entries, read once per opendir (offset 0 again: rewinddir)."""
        if offset == 0 or fh not in self._dirs:
            self._dirs[fh] = self.fs.readdir(_path(path))
        return self._dirs[fh]

    def releasedir(self, path: str | None, fh: int) -> int:
        self._dirs.pop(fh, None)
        return 0

    def readdir(self, path: str, fh: int = 0) -> list[tuple[str, dict[str, int]]]:
        return self.fs.readdir(_path(path))  # registers the callback; see readdir_fuse_3

    def readlink(self, path: str) -> str:
        return self.fs.readlink(_path(path))

    def open(self, path: str, fi: Any) -> int:
        fi.fh, keep = self.fs.open(_path(path), fi.flags)
        fi.keep_cache = int(keep)
        return 0

    def create(self, path: str, mode: int, fi: Any) -> int:
        fi.fh = self.fs.create(_path(path), mode, fi.flags, self._owner())
        return 0

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        data = self.fs.read(fi.fh, size, offset)
        return data if isinstance(data, bytes) else bytes(data)  # mfusepy memmoves from bytes

    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        return self.fs.write(fi.fh, data, offset)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self.fs.truncate(None if path is None else _path(path), length, fh)
        return 0

    def release(self, path: str | None, fi: Any) -> int:
        self.fs.release(fi.fh)
        return 0

    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        self.fs.fsync(fi.fh, bool(datasync))
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        if path is not None:
            self.fs.fsyncdir(_path(path))
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return self.fs.statfs()

    def mkdir(self, path: str, mode: int) -> int:
        self.fs.mkdir(_path(path), mode, self._owner())
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self.fs.mknod(_path(path), mode, dev, self._owner())
        return 0

    def symlink(self, target: str, source: str) -> int:
        # mfusepy's naming: `target` is the new link's path, `source` what it points to.
        self.fs.symlink(_path(target), source, self._owner())
        return 0

    def link(self, target: str, source: str) -> int:
        self.fs.link(_path(source), _path(target))
        return 0

    def unlink(self, path: str) -> int:
        self.fs.unlink(_path(path))
        return 0

    def rmdir(self, path: str) -> int:
        self.fs.rmdir(_path(path))
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self.fs.rename(_path(old), _path(new), flags)
        return 0

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        self.fs.chmod(_opt(path), mode, fh)
        return 0

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        self.fs.chown(_opt(path), uid, gid, fh)
        return 0

    def utimens(self, path: str | None, times: Any = None, fh: int | None = None) -> int:
        atime, mtime = times
        self.fs.utimens(_opt(path), atime, mtime, fh)
        return 0

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.fs.getxattr(_path(path), name)

    def listxattr(self, path: str) -> list[str]:
        return self.fs.listxattr(_path(path))

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self.fs.setxattr(_path(path), name, value, options)
        return 0

    def removexattr(self, path: str, name: str) -> int:
        self.fs.removexattr(_path(path), name)
        return 0


def serve(
    fs: UnionFS,
    mountpoint: str,
    *,
    fsname: str = "cowfs",
    read_only: bool = False,
    threads: bool = False,
    writeback: bool = False,
    allow_other: bool | None = None,
    debug: bool = False,
    on_ready: Callable[[dict[str, bool]], None] | None = None,
) -> None:
    """Mount `fs` at `mountpoint` and serve it with mfusepy until unmounted."""
    if allow_other is None:
        allow_other = os.geteuid() == 0
    options: dict[str, Any] = {
        "fsname": fsname,
        "subtype": "cowfs",
        "default_permissions": True,
        "foreground": True,
        "nothreads": not threads,
        "raw_fi": True,
        "use_ino": True,
    }
    if allow_other:
        options["allow_other"] = True
    if os.geteuid() == 0:
        # An image's device nodes and setuid programs work, as on overlayfs (libfuse would
        # add nodev,nosuid): the mount is a container's root filesystem.
        options["dev"] = True
        options["suid"] = True
    if read_only:
        options["ro"] = True
    if debug:
        options["debug"] = True
    raw_fi = options.pop("raw_fi")
    try:
        # The real path before mounting: resolving it later would ask this very daemon.
        target = os.path.realpath(mountpoint)
        ops = Operations(fs, writeback=writeback, on_ready=on_ready, mountpoint=target)
        _CowfsFUSE(ops, mountpoint, raw_fi=raw_fi, **options)
    except RuntimeError as exc:
        raise CowfsError(f"FUSE mount of {mountpoint} failed: {exc}", errno=errno.EIO) from None
