"""The native FUSE engine: the kernel protocol spoken directly on /dev/fuse, serving UnionFS.

One thread reads a request (os.readv into one preallocated buffer), unpacks it with struct,
calls the union filesystem and writes the reply (os.write / os.writev of header + data). No
libfuse and no ctypes callbacks: that is where the mfusepy engine spends its time (see
cowfs/fuse.py for the measurement).

Node ids are per name, as libfuse's path API has them: node = (parent node, name), and a
request's path is found by walking up the parents. A hard-linked file therefore has one kernel
inode per name; UnionFS tells us (`fs.notify`) when a change through one name makes what the
kernel caches for the others stale, and we send NOTIFY_INVAL_INODE for those that the kernel
knows. Per-inode node ids would need UnionFS to map inodes to their current names through
copy-up, rename and unlink; the writeback cache (which that would make safe) is off anyway.

An unlinked (or renamed-over) name that is still open keeps its node, detached from the tree:
requests for it are served from one of its open handles (fstat, fchmod, ftruncate...), so no
.fuse_hidden names are needed.

Kernel caching, and why it is safe (DESIGN decision 2: every change goes through this mount):
long entry/attr timeouts; FOPEN_KEEP_CACHE for lower files of one name; directories opened
without OPENDIR (ENOSYS once), which the kernel caches as FOPEN_CACHE_DIR + KEEP_CACHE and drops
itself whenever a create/unlink/rename through the mount changes them; cached symlinks; FLUSH
answered ENOSYS once, so close() costs no request; readdirplus always, so a stat-walk needs no
LOOKUP per entry.

FUSE passthrough (as root, kernel >= 6.9; COWFS_PASSTHROUGH=0 turns it off): an open of an upper
file of one name is answered with a backing id of its host file, and the kernel then reads and
writes that file itself, as kernel overlayfs does; measured on a 512 MiB file, a write went from
0.95 s to 0.54 s and a re-read from the host's page cache from 0.26 s to 0.06 s. Lower files are
never passed through (every read of an object is verified, DESIGN decision 4), nor hard-linked
upper files (a write must reach UnionFS.write to drop the other names' caches). See _Node for the
one-mode-per-inode rule. The kernel needs no daemon for a passthrough read or write: if the
daemon dies, those of already open files still reach the host file (fsync, truncate and the
rest fail with ENOTCONN).

Small lower files are read whole at the first open of their node and stored in the page cache
before the open is answered (_prefill): a cold `cat` of a small file costs OPEN (and an
asynchronous RELEASE) instead of OPEN, READ and RELEASE. An open that reads only a header
still reads (and verifies) the whole file, up to COWFS_PREFILL_KIB.
"""

from __future__ import annotations

import _signal
import _thread  # threading, queue and signal load functools, collections and enum (~10 ms)
import errno
import os
import select
import sys
import time
from _queue import SimpleQueue

from cowfs import fuse, fusedev
from cowfs import fuseproto as P
from cowfs.errors import CowfsError
from cowfs.fusedev import raise_readahead
from cowfs.unionfs import UTIME_NOW, UTIME_OMIT, Owner, UnionFS

TYPE_CHECKING = False  # annotations only (docs/ARCHITECTURE.md, "The start path")
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

CACHE_TIMEOUT = int(fuse.CACHE_TIMEOUT)  # seconds: see DESIGN decision 2
INVALIDATE_WAIT = 0.2  # seconds; normally done in microseconds
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
# How long the loop retries for the next request before it sleeps (Engine._await_request):
# COWFS_SPIN_US, by default 100 µs with two CPUs or more (measured: 20 µs catches too few
# requests, 50-200 µs all do), none with one, where it would take the client's CPU.
SPIN_NS = int(os.environ.get("COWFS_SPIN_US",
                             "100" if len(os.sched_getaffinity(0)) > 1 else "0")) * 1000
# Small files read whole at their first open and stored in the page cache (Engine._prefill);
# COWFS_PREFILL_KIB=0 turns it off.
PREFILL_MAX = min(int(os.environ.get("COWFS_PREFILL_KIB", "256")), 1 << 20) << 10  # <= 1 GiB
# How many files of a directory read in listing order are prefilled ahead of the reader, at
# most (Engine._read_ahead); the window doubles from 2 with each open that keeps the order.
AHEAD_FILES = 8
BUFSIZE = MAX_WRITE + (1 << 16)  # a write's data plus its headers, or a 64 KiB xattr value

_NO_REPLY = object()
_S_IFMT = 0o170000
_NEGATIVE = P.ENTRY_OUT.pack(0, 0, CACHE_TIMEOUT, 0, 0, 0, *([0] * 16))


class _Stop(BaseException):
    """A signal asked the loop to end (raised only while it waits for a request)."""


class _Node:
    __slots__ = ("id", "parent", "name", "nlookup", "fhs", "backing", "direct", "no_xattr",
                 "xgen", "filled", "after")  # fmt: skip

    def __init__(self, nid: int, parent: int, name: str) -> None:
        self.id = nid
        self.parent = parent  # 0: detached from the tree (unlinked or replaced)
        self.name = name
        self.nlookup = 0
        self.fhs: list[int] = []
        # Passthrough: the kernel allows one backing file per inode and refuses a cached open
        # while it has passthrough opens (ETXTBSY) or the reverse. So the first open decides:
        # passthrough only when no other handle is open, and then every later open shares the
        # backing id until the last of them is released.
        self.backing = 0
        self.direct: set[int] = set()  # the handles opened in passthrough
        # xattr names known to be absent (ENODATA), valid while xgen is the engine's: `ls -l`
        # asks for security.selinux and system.posix_acl_access of every file, every time.
        self.no_xattr: set[bytes] | None = None
        self.xgen = 0
        self.filled = False  # its whole content was stored in the kernel's page cache (_open)
        self.after = 0  # the next small regular file of its directory's listing (_dirents)


def _attr_valid(a: dict[str, int]) -> int:
    """How long the kernel may keep a node's attributes: not at all for a regular file of
    several names. Each name is a kernel inode of its own here, and a write through a handle
    passed through to the host file (one opened before `ln`) reaches the file without us."""
    if a["st_nlink"] > 1 and a["st_mode"] & _S_IFMT == 0o100000:  # S_IFREG
        return 0
    return CACHE_TIMEOUT


def _attr(a: dict[str, int]) -> tuple[int, ...]:
    at, atn = divmod(a["st_atime"], 1_000_000_000)
    mt, mtn = divmod(a["st_mtime"], 1_000_000_000)
    ct, ctn = divmod(a["st_ctime"], 1_000_000_000)
    return (a["st_ino"], a["st_size"], a["st_blocks"], at, mt, ct, atn, mtn, ctn, a["st_mode"],
            a["st_nlink"], a["st_uid"], a["st_gid"], a["st_rdev"] & 0xFFFFFFFF,
            a["st_blksize"], 0)  # fmt: skip


def _name(body: memoryview, start: int = 0) -> str:
    """The NUL-terminated name at `start` of a request's body."""
    raw = bytes(body[start:])
    return os.fsdecode(raw[: raw.index(b"\0")])


def _names2(body: memoryview) -> tuple[str, str]:
    raw = bytes(body)
    a, b, _ = raw.split(b"\0", 2)
    return os.fsdecode(a), os.fsdecode(b)


class Engine:
    """Serves one mount: the node table, the request loop and one handler per opcode."""

    def __init__(
        self,
        fs: UnionFS,
        fd: int,
        mountpoint: str,
        *,
        writeback: bool = False,
        passthrough: bool = True,
        debug: bool = False,
        on_ready: Callable[[dict[str, bool]], None] | None = None,
    ) -> None:
        self.fs = fs
        self.fd = fd
        self.mountpoint = mountpoint
        self.writeback = writeback
        self.passthrough = passthrough  # until INIT: asked for; after: granted by the kernel
        self.debug = debug
        self.on_ready = on_ready
        root = _Node(P.ROOT_ID, 0, "")
        root.nlookup = 1
        self._nodes: dict[int, _Node] = {P.ROOT_ID: root}
        self._names: dict[tuple[int, str], _Node] = {}
        self._next_id = P.ROOT_ID + 1
        self._dirs: dict[int, list[tuple[str, dict[str, int]]]] = {}  # node -> listing
        self._proto_minor = 0
        # (nodes, a held lock released when they are done) for the invalidator thread
        self._queue: SimpleQueue[tuple[list[int], Any] | None] = SimpleQueue()
        self._waiting = False
        self._stop = False
        self._xgen = 1  # bumped by every setxattr/removexattr: see _Node.no_xattr
        # Directory read-ahead (_read_ahead): the last small file of each listing being sent,
        # the last small file opened, the window, and the nodes to prefill while idle.
        self._tails: dict[int, int] = {}
        self._last_open = 0
        self._window = 0
        self._ahead: list[int] = []
        self._handlers: dict[int, Callable[[int, int, int, memoryview], Any]] = {
            P.INIT: self._init, P.LOOKUP: self._lookup, P.FORGET: self._forget,
            P.BATCH_FORGET: self._batch_forget, P.GETATTR: self._getattr,
            P.SETATTR: self._setattr, P.READLINK: self._readlink, P.SYMLINK: self._symlink,
            P.MKNOD: self._mknod, P.MKDIR: self._mkdir, P.UNLINK: self._unlink,
            P.RMDIR: self._rmdir, P.RENAME: self._rename, P.RENAME2: self._rename2,
            P.LINK: self._link, P.OPEN: self._open, P.READ: self._read, P.WRITE: self._write,
            P.STATFS: self._statfs, P.RELEASE: self._release, P.FSYNC: self._fsync,
            P.SETXATTR: self._setxattr, P.GETXATTR: self._getxattr,
            P.LISTXATTR: self._listxattr, P.REMOVEXATTR: self._removexattr,
            P.OPENDIR: self._opendir, P.READDIR: self._readdir,
            P.READDIRPLUS: self._readdirplus,
            P.FSYNCDIR: self._fsyncdir, P.CREATE: self._create, P.INTERRUPT: self._interrupt,
            P.DESTROY: self._destroy, P.SYNCFS: self._syncfs,
        }  # fmt: skip

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve requests until the filesystem is unmounted (or a signal asks to stop)."""
        buf = bytearray(BUFSIZE)
        mv = memoryview(buf)
        fd = self.fd
        unpack_in = P.IN_HEADER.unpack_from
        handlers = self._handlers
        out_header = P.OUT_HEADER.pack
        write = os.write
        writev = os.writev
        debug = self.debug
        readv = os.readv
        spin = SPIN_NS > 0
        if spin:
            os.set_blocking(fd, False)
        self._start_invalidator()
        try:
            while not self._stop:
                try:
                    self._waiting = True
                    if spin:
                        try:
                            n = readv(fd, [buf])
                        except BlockingIOError:
                            n = self._await_request(buf)
                    else:
                        n = readv(fd, [buf])
                except OSError as exc:
                    if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue  # ENOENT: the request was interrupted before we read it
                    if exc.errno == errno.ENODEV:
                        break  # unmounted
                    raise
                finally:
                    self._waiting = False
                _, opcode, unique, nodeid, uid, gid, _, _, _ = unpack_in(buf)
                handler = handlers.get(opcode)
                if debug:
                    print(f"cowfs: {P.OPCODE_NAMES.get(opcode, opcode)} unique={unique} "
                          f"node={nodeid} len={n}", file=sys.stderr)  # fmt: skip
                error = 0
                out: Any = b""
                if handler is None:
                    error = -errno.ENOSYS
                else:
                    try:
                        out = handler(nodeid, uid, gid, mv[40:n])
                        if type(out) is int:  # an error answered without raising
                            error, out = out, b""
                    except OSError as exc:
                        code = exc.errno
                        if not isinstance(code, int) or code <= 0:
                            fuse.log_failure(P.OPCODE_NAMES.get(opcode))
                            code = errno.EIO
                        error = -code
                    except CowfsError as exc:
                        error = -exc.errno
                    except _Stop:
                        raise
                    except Exception:
                        fuse.log_failure(P.OPCODE_NAMES.get(opcode))
                        error = -errno.EIO
                if out is _NO_REPLY:
                    continue
                if debug:
                    print(f"cowfs:   -> unique={unique} error={error}", file=sys.stderr)
                try:
                    if error:
                        write(fd, out_header(16, error, unique))
                    elif type(out) is list:
                        size = 16 + sum(len(x) for x in out)
                        writev(fd, [out_header(size, 0, unique), *out])
                    else:
                        write(fd, out_header(16 + len(out), 0, unique) + out)
                except OSError as exc:
                    if exc.errno == errno.ENODEV:
                        break
                    if exc.errno != errno.ENOENT:  # ENOENT: the request was interrupted
                        raise
        except _Stop:
            fusedev.unmount(self.mountpoint)
        finally:
            self._queue.put(None)

    def _await_request(self, buf: bytearray) -> int:
        """Read the next request from the non-blocking fd: retried for SPIN_NS first, then
        waited for with poll(2).

        Why: on this 2-core VM most of a request's round trip is the kernel putting the daemon
        to sleep and waking it (perf: ~40% of the daemon's time in fuse_dev_do_read's sleep and
        wake-up), while a busy client sends its next request within tens of microseconds. A
        request found while retrying skips that sleep: a warm `ls -lR` of /usr/include
        (38k requests) took 1.7-2.3 s instead of 4.7-8.5 s. Past SPIN_NS the loop sleeps as
        before, so an idle mount costs no CPU."""
        fd, readv = self.fd, os.readv
        deadline = time.perf_counter_ns() + SPIN_NS
        while time.perf_counter_ns() < deadline:
            try:
                return readv(fd, [buf])
            except BlockingIOError:
                pass
            if self._ahead:  # idle: prefill the next file a sequential reader will open
                self._waiting = False
                try:
                    self._fetch_ahead(self._ahead.pop(0))
                except Exception:  # a bug here must not end the loop: logged, as a handler's
                    self._ahead.clear()
                    fuse.log_failure("read-ahead")
                finally:
                    self._waiting = True
                if self._stop:
                    raise _Stop
                deadline = time.perf_counter_ns() + SPIN_NS
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            poller.poll()
            try:
                return readv(fd, [buf])
            except BlockingIOError:
                continue

    def stop_on_signals(self) -> None:
        """SIGINT/SIGTERM/SIGHUP end the loop and detach the mount, as libfuse does."""
        def handler(signum: int, frame: Any) -> None:
            self._stop = True
            if self._waiting:
                raise _Stop

        for sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
            try:
                _signal.signal(sig, handler)
            except ValueError:
                return  # not the main thread: signals are not ours to handle

    # -- invalidation of other names ------------------------------------------------------------

    def _start_invalidator(self) -> None:
        """Notifications go out from a thread of their own and the loop waits for them only
        briefly: an invalidation may wait on a page lock held by a read only this loop answers."""

        def run() -> None:
            while (item := self._queue.get()) is not None:
                nodes, done = item
                for nid in nodes:
                    msg = P.NOTIFY_INVAL_INODE_OUT.pack(nid, 0, 0)
                    try:
                        os.write(
                            self.fd, P.OUT_HEADER.pack(16 + len(msg), P.NOTIFY_INVAL_INODE, 0) + msg
                        )
                    except OSError:
                        pass  # ENOENT: the kernel forgot the inode meanwhile
                done.release()

        _thread.start_new_thread(run, ())
        self.fs.notify = self._invalidate

    def _invalidate(self, paths: list[str]) -> None:
        nodes = [n for p in paths if (n := self._node_of_path(p)) is not None]
        if nodes:
            done = _thread.allocate_lock()
            done.acquire()
            self._queue.put((nodes, done))
            done.acquire(timeout=INVALIDATE_WAIT)

    def _node_of_path(self, path: str) -> int | None:
        nid = P.ROOT_ID
        for part in path.split("/") if path else ():
            node = self._names.get((nid, part))
            if node is None:
                return None
            nid = node.id
        return nid

    # -- nodes ----------------------------------------------------------------------------------

    def _path(self, nid: int) -> str | None:
        """The union path of a node; None if it is detached (unlinked but still known)."""
        node = self._nodes.get(nid)
        if node is None:
            raise OSError(errno.ESTALE, "stale node")
        if nid == P.ROOT_ID:
            return ""
        parts = []
        nodes = self._nodes
        while node.id != P.ROOT_ID:
            if not node.parent:
                return None
            parts.append(node.name)
            node = nodes.get(node.parent)
            if node is None:
                return None
        if len(parts) == 1:
            return parts[0]
        parts.reverse()
        return "/".join(parts)

    def _need_path(self, nid: int) -> str:
        path = self._path(nid)
        if path is None:
            raise OSError(errno.ENOENT, "unlinked")
        return path

    def _child(self, parent: int, name: str) -> str:
        path = self._need_path(parent)
        return f"{path}/{name}" if path else name

    def _entry(self, parent: int, name: str, attrs: dict[str, int]) -> bytes:
        """An entry reply for a name the kernel now knows: one more lookup of its node."""
        node = self._names.get((parent, name))
        if node is None:
            node = _Node(self._next_id, parent, name)
            self._next_id += 1
            self._nodes[node.id] = node
            self._names[(parent, name)] = node
        node.nlookup += 1
        return P.ENTRY_OUT.pack(node.id, 0, CACHE_TIMEOUT, _attr_valid(attrs), 0, 0,
                                *_attr(attrs))  # fmt: skip

    def _detach(self, parent: int, name: str) -> None:
        node = self._names.pop((parent, name), None)
        if node is not None:
            node.parent = 0

    def _drop(self, node: _Node, n: int) -> None:
        node.nlookup -= n
        if node.nlookup <= 0 and node.id != P.ROOT_ID:
            del self._nodes[node.id]
            self._dirs.pop(node.id, None)
            self._tails.pop(node.id, None)
            if node.parent and self._names.get((node.parent, node.name)) is node:
                del self._names[(node.parent, node.name)]

    def _open_fh(self, nid: int) -> int | None:
        node = self._nodes.get(nid)
        return node.fhs[0] if node is not None and node.fhs else None

    def _attrs(self, nid: int, fh: int | None = None) -> dict[str, int]:
        if fh is not None:
            return self.fs.fgetattr(fh)
        path = self._path(nid)
        if path is None:
            fh = self._open_fh(nid)
            if fh is None:
                raise OSError(errno.ENOENT, "unlinked")
            return self.fs.fgetattr(fh)
        return self.fs.getattr(path)

    @staticmethod
    def _attr_out(attrs: dict[str, int]) -> bytes:
        return P.ATTR_OUT.pack(_attr_valid(attrs), 0, 0, *_attr(attrs))

    # -- handlers: session ----------------------------------------------------------------------

    def _init(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        major, minor, max_readahead, flags = P.INIT_IN.unpack_from(body)
        if major != P.KERNEL_VERSION:
            raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} is not supported")
        if flags & P.INIT_EXT and len(body) >= 20:
            flags |= int.from_bytes(body[16:20], "little") << 32
        self._proto_minor = minor
        want = (P.ASYNC_READ | P.ATOMIC_O_TRUNC | P.BIG_WRITES | P.AUTO_INVAL_DATA
                | P.DO_READDIRPLUS | P.PARALLEL_DIROPS | P.MAX_PAGES | P.CACHE_SYMLINKS
                | P.INIT_EXT | P.DIRECT_IO_ALLOW_MMAP)  # fmt: skip
        if self.writeback:
            want |= P.WRITEBACK_CACHE
        elif self.passthrough and os.geteuid() == 0:
            # Reads and writes of upper files then go from the kernel to the host file, as in
            # kernel overlayfs (registering a backing file needs CAP_SYS_ADMIN; the kernel
            # refuses passthrough with the writeback cache).
            want |= P.PASSTHROUGH
        got = flags & want
        self.passthrough = bool(got & P.PASSTHROUGH)
        # Stack depth 1: backing files on a disk filesystem (an upper on overlayfs is served
        # without passthrough), and cowfs itself can still be a lower of kernel overlayfs.
        out = P.INIT_OUT.pack(P.KERNEL_VERSION, min(minor, P.KERNEL_MINOR),
                              max_readahead, got & 0xFFFFFFFF,
                              16, 12, MAX_WRITE, 1, MAX_PAGES, 0, got >> 32,
                              1 if self.passthrough else 0)  # fmt: skip
        _thread.start_new_thread(self._ready, ())
        return out

    def _ready(self) -> None:
        # In parallel with the loop, which must be free to answer the stat in raise_readahead.
        raise_readahead(self.mountpoint)
        if self.on_ready is not None:
            self.on_ready({"passthrough": self.passthrough, "writeback": self.writeback})

    def _destroy(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        self._stop = True
        return b""

    def _interrupt(self, nid: int, uid: int, gid: int, body: memoryview) -> object:
        # One thread answers requests in order: the interrupted one is done or about to be.
        return _NO_REPLY

    def _syncfs(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        self.fs.syncfs()
        return b""

    def _statfs(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        s = self.fs.statfs()
        g = s.get
        return P.KSTATFS.pack(g("f_blocks", 0), g("f_bfree", 0), g("f_bavail", 0),
                              g("f_files", 0), g("f_ffree", 0), g("f_bsize", 4096),
                              g("f_namemax", 255), g("f_frsize", 4096), 0)  # fmt: skip

    # -- handlers: names ------------------------------------------------------------------------

    def _lookup(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        name = os.fsdecode(bytes(body[:-1]))
        try:
            attrs = self.fs.getattr(self._child(nid, name))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # A negative entry the kernel may cache (decision 2): node id 0 with a timeout.
            # It drops the negative dentry itself when a name is created through the mount.
            return _NEGATIVE
        return self._entry(nid, name, attrs)

    def _forget(self, nid: int, uid: int, gid: int, body: memoryview) -> object:
        node = self._nodes.get(nid)
        if node is not None:
            self._drop(node, P.FORGET_IN.unpack_from(body)[0])
        return _NO_REPLY

    def _batch_forget(self, nid: int, uid: int, gid: int, body: memoryview) -> object:
        count, _ = P.BATCH_FORGET_IN.unpack_from(body)
        nodes = self._nodes
        for i in range(count):
            one, n = P.FORGET_ONE.unpack_from(body, 8 + 16 * i)
            node = nodes.get(one)
            if node is not None:
                self._drop(node, n)
        return _NO_REPLY

    def _getattr(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        flags, _, fh = P.GETATTR_IN.unpack_from(body)
        return self._attr_out(self._attrs(nid, fh if flags & P.GETATTR_FH else None))

    def _setattr(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, a_uid, a_gid,
         _) = P.SETATTR_IN.unpack_from(body)  # fmt: skip
        fs = self.fs
        fhv = fh if valid & P.FATTR_FH else None
        path = self._path(nid)
        if path is None and fhv is None:
            fhv = self._open_fh(nid)
            if fhv is None:
                raise OSError(errno.ENOENT, "unlinked")
        # libfuse's order: mode, owner, size, times
        if valid & P.FATTR_MODE:
            fs.chmod(path, mode, fhv)
        if valid & (P.FATTR_UID | P.FATTR_GID):
            fs.chown(path, a_uid if valid & P.FATTR_UID else -1,
                     a_gid if valid & P.FATTR_GID else -1, fhv)  # fmt: skip
        if valid & P.FATTR_SIZE:
            fs.truncate(path, size, fhv)
        if valid & (P.FATTR_ATIME | P.FATTR_MTIME):
            at = ((0, UTIME_NOW) if valid & P.FATTR_ATIME_NOW else (atime, atimensec)
                  if valid & P.FATTR_ATIME else (0, UTIME_OMIT))  # fmt: skip
            mt = ((0, UTIME_NOW) if valid & P.FATTR_MTIME_NOW else (mtime, mtimensec)
                  if valid & P.FATTR_MTIME else (0, UTIME_OMIT))  # fmt: skip
            fs.utimens(path, at, mt, fhv)
        if path is not None and fhv is None:
            return self._attr_out(fs.getattr(path))
        return self._attr_out(self._attrs(nid, fhv))

    def _readlink(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        return os.fsencode(self.fs.readlink(self._need_path(nid)))

    def _mknod(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        mode, rdev, _, _ = P.MKNOD_IN.unpack_from(body)
        name = _name(body, P.MKNOD_IN.size)
        path = self._child(nid, name)
        self.fs.mknod(path, mode, rdev, Owner(uid, gid))
        return self._entry(nid, name, self.fs.getattr(path))

    def _mkdir(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        mode, _ = P.MKDIR_IN.unpack_from(body)
        name = _name(body, P.MKDIR_IN.size)
        path = self._child(nid, name)
        self.fs.mkdir(path, mode, Owner(uid, gid))
        return self._entry(nid, name, self.fs.getattr(path))

    def _symlink(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        name, target = _names2(body)
        path = self._child(nid, name)
        self.fs.symlink(path, target, Owner(uid, gid))
        return self._entry(nid, name, self.fs.getattr(path))

    def _link(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        (old,) = P.LINK_IN.unpack_from(body)
        name = _name(body, P.LINK_IN.size)
        path = self._child(nid, name)
        self.fs.link(self._need_path(old), path)
        return self._entry(nid, name, self.fs.getattr(path))

    def _unlink(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        name = os.fsdecode(bytes(body[:-1]))
        self.fs.unlink(self._child(nid, name))
        self._detach(nid, name)
        return b""

    def _rmdir(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        name = os.fsdecode(bytes(body[:-1]))
        self.fs.rmdir(self._child(nid, name))
        self._detach(nid, name)
        return b""

    def _rename(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        (newdir,) = P.RENAME_IN.unpack_from(body)
        old, new = _names2(body[P.RENAME_IN.size :])
        return self._do_rename(nid, old, newdir, new, 0)

    def _rename2(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        newdir, flags, _ = P.RENAME2_IN.unpack_from(body)
        old, new = _names2(body[P.RENAME2_IN.size :])
        return self._do_rename(nid, old, newdir, new, flags)

    def _do_rename(self, olddir: int, old: str, newdir: int, new: str, flags: int) -> bytes:
        self.fs.rename(self._child(olddir, old), self._child(newdir, new), flags)
        names = self._names
        moved = names.pop((olddir, old), None)
        if flags & 2:  # RENAME_EXCHANGE: the two nodes swap places
            other = names.pop((newdir, new), None)
            if other is not None:
                other.parent, other.name = olddir, old
                names[(olddir, old)] = other
        else:
            self._detach(newdir, new)
        if moved is not None:
            moved.parent, moved.name = newdir, new
            names[(newdir, new)] = moved
        return b""

    # -- handlers: files ------------------------------------------------------------------------

    def _open(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        flags, _ = P.OPEN_IN.unpack_from(body)
        fh, keep = self.fs.open(self._need_path(nid), flags)
        node = self._nodes[nid]
        if keep and not node.filled and not node.fhs and PREFILL_MAX:
            try:
                self._prefill(node, fh)
            except BaseException:
                self.fs.release(fh)  # e.g. EIO: a damaged object fails the open, leaving nothing
                raise
        backing = self._backing(node, fh)
        node.fhs.append(fh)
        if node.filled and keep:
            self._read_ahead(node)
        if backing:
            return P.OPEN_OUT.pack(fh, P.FOPEN_PASSTHROUGH, backing)
        if self.passthrough and self.fs.linked(fh):
            # Another name of this file may have a handle passed through (opened before `ln`),
            # whose writes reach the host file without us: no page cache under this name.
            return P.OPEN_OUT.pack(fh, P.FOPEN_DIRECT_IO, 0)
        return P.OPEN_OUT.pack(fh, P.FOPEN_KEEP_CACHE if keep else 0, 0)

    def _prefill(self, node: _Node, fh: int) -> None:
        """Store the whole content of a small file opened for the first time in the kernel's
        page cache (NOTIFY_STORE) before the open is answered, with FOPEN_KEEP_CACHE: the
        reads that follow find it there, and the READ round trip of a typical small-file read
        (open, read, close) is saved.

        Safe from this loop: the store locks the file's pages, and only a READ of an open
        handle of this inode could hold one while waiting for us; there is none (`node.fhs`
        is empty, and in the kernel a file is closed before its RELEASE reaches us). The
        content is read and verified as a READ would (a damaged object is EIO at open, as
        an eager first open already is)."""
        data = self.fs.small_content(fh, PREFILL_MAX)
        if not data:
            return
        msg = P.NOTIFY_STORE_OUT.pack(node.id, 0, len(data), 0)
        try:
            os.writev(self.fd, [P.OUT_HEADER.pack(16 + len(msg) + len(data), P.NOTIFY_STORE, 0),
                                msg, data])  # fmt: skip
        except OSError:
            return  # e.g. ENOENT: the kernel forgot the inode; its READs will come instead
        node.filled = True

    def _read_ahead(self, node: _Node) -> None:
        """Directory read-ahead: when small lower files are opened in their directory's listing
        order (`find | xargs cat`, `tar c`, `cp -r`, a compiler over a source tree), prefill the
        next ones while the loop would otherwise wait for the reader's next request, so that
        their opens find their content stored and are answered at once. Pipelined: the reader
        reads and closes one file while the daemon decompresses the next. Like the kernel's
        readahead, it starts only once the order is seen (two files in a row), and its window
        doubles up to AHEAD_FILES; any other open order stops it. Opens of files not in order
        (a container's start: its libraries) are never followed by a prefill of their
        neighbours. Measured in docs/ARCHITECTURE.md, "Directory read-ahead"."""
        prev = self._nodes.get(self._last_open)
        self._last_open = node.id
        if prev is None or prev.after != node.id:
            self._window = 0
            self._ahead.clear()
            return
        self._window = min(2 * self._window or 2, AHEAD_FILES)
        ahead = []
        nid = node.after
        for _ in range(self._window):
            nxt = self._nodes.get(nid)
            if nxt is None:
                break
            if not nxt.filled:
                ahead.append(nid)
            nid = nxt.after
        self._ahead = ahead

    def _fetch_ahead(self, nid: int) -> None:
        """Prefill node `nid` as its first open would (_prefill), between two requests. Any
        failure leaves it as it was: damage is then EIO at the file's own open."""
        node = self._nodes.get(nid)
        if node is None or node.filled or node.fhs:
            return
        path = self._path(nid)
        if path is None:
            return
        try:
            fh, keep = self.fs.open(path, os.O_RDONLY)
        except (OSError, CowfsError):
            return
        try:
            if keep:
                self._prefill(node, fh)
        except (OSError, CowfsError):
            pass
        finally:
            self.fs.release(fh)

    def _backing(self, node: _Node, fh: int) -> int:
        """The passthrough backing id for a new handle `fh` of `node`, or 0 (see _Node)."""
        if not self.passthrough or (node.fhs and not node.backing):
            return 0
        if not node.backing:
            fd = self.fs.passthrough_fd(fh)
            if fd < 0:
                return 0
            try:
                node.backing = fusedev.backing_open(self.fd, fd)
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP):
                    self.passthrough = False  # not for this connection at all
                return 0  # e.g. EINVAL: a host filesystem stacked too deep; served by us
        node.direct.add(fh)
        return node.backing

    def _create(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        flags, mode, _, _ = P.CREATE_IN.unpack_from(body)
        name = _name(body, P.CREATE_IN.size)
        path = self._child(nid, name)
        fh = self.fs.create(path, mode, flags, Owner(uid, gid))
        try:
            entry = self._entry(nid, name, self.fs.fgetattr(fh))
        except BaseException:
            self.fs.release(fh)
            raise
        node = self._names[(nid, name)]
        backing = self._backing(node, fh)
        node.fhs.append(fh)
        return entry + P.OPEN_OUT.pack(fh, P.FOPEN_PASSTHROUGH if backing else 0, backing)

    def _read(self, nid: int, uid: int, gid: int, body: memoryview) -> list[bytes | memoryview]:
        fh, offset, size, _, _, _, _ = P.READ_IN.unpack_from(body)
        return [self.fs.read(fh, size, offset)]

    def _write(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        fh, offset, size, _, _, _, _ = P.WRITE_IN.unpack_from(body)
        start = P.WRITE_IN.size
        n = self.fs.write(fh, body[start : start + size], offset)
        return P.WRITE_OUT.pack(n, 0)

    def _release(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        fh, _, _, _ = P.RELEASE_IN.unpack_from(body)
        node = self._nodes.get(nid)
        if node is not None and fh in node.fhs:
            node.fhs.remove(fh)
            if fh in node.direct:
                node.direct.discard(fh)
                if not node.direct:
                    backing, node.backing = node.backing, 0
                    try:
                        fusedev.backing_close(self.fd, backing)
                    except OSError:
                        pass  # the kernel forgot it already: nothing is held either way
        self.fs.release(fh)
        return b""

    def _fsync(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        fh, flags, _ = P.FSYNC_IN.unpack_from(body)
        self.fs.fsync(fh, bool(flags & P.FSYNC_FDATASYNC))
        return b""

    # -- handlers: directories ------------------------------------------------------------------

    def _opendir(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        # ENOSYS once: the kernel then opens directories without asking (no OPENDIR and no
        # RELEASEDIR per directory) and keeps their listings cached as with FOPEN_CACHE_DIR +
        # KEEP_CACHE. Safe by decision 2: a listing changes only by a create/unlink/rename/...
        # through this mount, and the kernel drops a directory's cached listing on each.
        raise OSError(errno.ENOSYS, "no opendir")

    def _listing(self, nid: int, offset: int) -> list[tuple[str, dict[str, int]]]:
        """A directory's entries, read at offset 0 and kept for the reads that continue it
        (requests carry no handle without OPENDIR; the kernel caches the result anyway)."""
        entries = self._dirs.get(nid)
        if offset == 0 or entries is None:
            entries = self.fs.readdir(self._need_path(nid))
            self._dirs[nid] = entries
        return entries

    def _readdir(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        return self._dirents(nid, body, plus=False)

    def _readdirplus(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        return self._dirents(nid, body, plus=True)

    def _dirents(self, nid: int, body: memoryview, *, plus: bool) -> bytes:
        """The records of a READDIR (fuse_dirent) or READDIRPLUS (a fuse_entry_out before each
        fuse_dirent) that fit in the request's size, from its offset on."""
        _, offset, size, _, _, _, _ = P.READ_IN.unpack_from(body)
        entries = self._listing(nid, offset)
        out = []
        used = 0
        head = 128 if plus else 0
        pack = P.DIRENT.pack
        if offset == 0:
            self._tails.pop(nid, None)
        for i in range(offset, len(entries)):
            name, attrs = entries[i]
            raw = os.fsencode(name)
            rec = head + 24 + len(raw)
            pad = -rec & 7
            if used + rec + pad > size:
                break
            mode = attrs["st_mode"]
            dirent = pack(attrs["st_ino"], i + 1, len(raw), (mode & _S_IFMT) >> 12) + raw
            if plus:
                # The entry makes a node (a lookup count): only for records that are sent.
                if name == "." or name == "..":
                    entry = bytes(128)  # the kernel looks up neither: no node
                else:
                    entry = self._entry(nid, name, attrs)
                    if (mode & _S_IFMT == 0o100000 and 0 < attrs["st_size"] <= PREFILL_MAX
                            and attrs["st_nlink"] == 1):  # fmt: skip
                        self._chain(nid, self._names[(nid, name)])
                dirent = entry + dirent
            out.append(dirent + b"\0" * pad)
            used += rec + pad
        if not out:
            self._dirs.pop(nid, None)  # the end of the listing
            self._tails.pop(nid, None)
        return b"".join(out)

    def _chain(self, dir_id: int, node: _Node) -> None:
        """Link `node` after the previous small file of its directory's listing (_read_ahead)."""
        prev = self._nodes.get(self._tails.get(dir_id, 0))
        if prev is not None and prev is not node:
            prev.after = node.id
        self._tails[dir_id] = node.id

    def _fsyncdir(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        path = self._path(nid)
        if path is not None:
            self.fs.fsyncdir(path)
        return b""

    # -- handlers: xattrs -----------------------------------------------------------------------

    def _getxattr(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes | int:
        size, _ = P.GETXATTR_IN.unpack_from(body)
        raw = bytes(body[P.GETXATTR_IN.size :])
        name = raw[: raw.index(b"\0")]
        node = self._nodes.get(nid)
        known = node.no_xattr if node is not None and node.xgen == self._xgen else None
        if known is not None and name in known:
            return -errno.ENODATA
        value = self.fs.xattr(self._need_path(nid), os.fsdecode(name))
        if value is None:
            # Absent stays absent until an xattr is set anywhere (a hard link's other names
            # are other nodes; every change of an xattr goes through here, DESIGN decision 2).
            if node is not None:
                if known is None:
                    known = node.no_xattr = set()
                    node.xgen = self._xgen
                known.add(name)
            return -errno.ENODATA
        return self._sized(value, size)

    def _listxattr(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        size, _ = P.GETXATTR_IN.unpack_from(body)
        names = self.fs.listxattr(self._need_path(nid))
        return self._sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return P.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return value

    def _setxattr(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        self._xgen += 1
        size, flags = P.SETXATTR_IN.unpack_from(body)
        raw = bytes(body[P.SETXATTR_IN.size :])
        end = raw.index(b"\0")
        value = raw[end + 1 : end + 1 + size]
        self.fs.setxattr(self._need_path(nid), os.fsdecode(raw[:end]), value, flags)
        return b""

    def _removexattr(self, nid: int, uid: int, gid: int, body: memoryview) -> bytes:
        self._xgen += 1
        self.fs.removexattr(self._need_path(nid), _name(body))
        return b""


def serve(fs: UnionFS, mountpoint: str, *, fsname: str = "cowfs", read_only: bool = False,
          writeback: bool = False, allow_other: bool | None = None, debug: bool = False,
          on_ready: Callable[[dict[str, bool]], None] | None = None) -> None:  # fmt: skip
    """Mount `fs` at `mountpoint` and serve it until unmounted (runs in the calling thread)."""
    if allow_other is None:
        allow_other = os.geteuid() == 0
    target = os.path.realpath(mountpoint)  # before the mount: afterwards it would ask us
    fd = fusedev.open_mount(target, fsname=fsname, read_only=read_only, allow_other=allow_other)
    # COWFS_PASSTHROUGH=0 has the daemon serve every read and write of upper files too.
    passthrough = os.environ.get("COWFS_PASSTHROUGH", "1") != "0"
    engine = Engine(fs, fd, target, writeback=writeback, passthrough=passthrough, debug=debug,
                    on_ready=on_ready)  # fmt: skip
    try:
        engine.stop_on_signals()
        engine.run()
    finally:
        os.close(fd)
        fs.close()
