"""Mounting a container's root: cowfs (FUSE) by default, anything with mount/umount in tests.

The FUSE daemon is forked from the runtime before any namespace or cgroup of the container
exists, so it serves from outside both (DESIGN decision 7).
"""

from __future__ import annotations

import _socket  # socket.py loads enum and selectors (~8 ms of a start); a pair is all we use
import gc
import os

from cowfs import fastjson
from cowfs.errors import CowfsError
from cowfs.mounting import is_mounted
from runtime import background

TYPE_CHECKING = False  # annotations only: `typing` is not loaded on the start path
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, BinaryIO, Protocol

    from cowfs.store import Store

    class Mounter(Protocol):
        def mount(self, store: Store, ref: str, mountpoint: str, *, upper: str, work: str,
                  read_only: bool = False, volatile: bool = False) -> Any: ...  # fmt: skip

        def umount(self, mountpoint: str) -> None: ...


def start_mount(mounter: Mounter, store: Store, ref: str, mountpoint: str, *, upper: str,
                work: str, volatile: bool = False) -> Callable[[], Any]:  # fmt: skip
    """Begin mounting; the returned call waits until the mount is live and returns what
    `mount` returns. A mounter with a `start` method (CowfsMounter) mounts in the background
    meanwhile; any other mounts here and now."""
    start = getattr(mounter, "start", None)
    if start is not None:
        return start(store, ref, mountpoint, upper=upper, work=work, volatile=volatile)
    result = mounter.mount(store, ref, mountpoint, upper=upper, work=work, volatile=volatile)
    return lambda: result


class PendingMount:
    """A FUSE daemon forked and mounting; `wait()` returns its pid once the mount is live.

    We learn the mount is live from /proc/self/mountinfo, which polls readable (POLLPRI)
    whenever the mount table changes, and that the daemon failed from its pidfd. Nobody
    sleeps."""

    def __init__(self, owner: CowfsMounter, pid: int, mountpoint: str, link: _socket.socket,
                 table: BinaryIO) -> None:  # fmt: skip
        self.owner, self.pid, self.mountpoint = owner, pid, mountpoint
        self._link, self._table = link, table
        self._pidfd = os.pidfd_open(pid)
        self._done = False
        self._error: BaseException | None = None

    def __call__(self) -> int:
        return self.wait()

    def wait(self) -> int:
        if self._error is not None:
            raise self._error
        if self._done:
            return self.pid
        import select

        from cowfs.errors import MountError

        pid, pidfd, table = self.pid, self._pidfd, self._table
        try:
            while not is_mounted(self.mountpoint):
                ready, _, changed = select.select([pidfd], [], [table], 30)
                if pidfd in ready:
                    os.waitpid(pid, 0)
                    message = self._link.recv(4096).decode(errors="replace")
                    if not message.startswith(f"cannot mount {self.mountpoint}"):
                        message = f"cannot mount {self.mountpoint}: {message or 'daemon exited'}"
                    raise MountError(message)
                if not ready and not changed and not is_mounted(self.mountpoint):
                    import signal

                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise MountError(f"cannot mount {self.mountpoint}: the daemon did not start")
                table.seek(0)
                table.read()  # re-arm the mount-table notification
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._done = True
            table.close()
            os.close(pidfd)
            self._link.close()
        self.owner._daemons[self.mountpoint] = pid
        return pid


class CowfsMounter:
    """cowfs.mounting, with the daemon forked from this process instead of started as a new
    interpreter: what is imported already is paid once. `start` returns at once and the caller
    awaits the mount only when the container needs it.

    The daemon's own imports (the FUSE engine, the union filesystem, index and object code:
    ~20 ms, kept lean: docs/ARCHITECTURE.md, "The start path") and the loading of the image's
    index are on the way to every container's first instruction. `prepare` forks the daemon of
    the next mount before the caller has even imported the runtime: the child does that work
    on the other CPU while the caller imports, creates the container and its cgroups, and
    `start` then only tells it where to mount.

    The child serves the mount in the foreground (mounting.mount(foreground=True)).
    """

    def __init__(self) -> None:
        self._daemons: dict[str, int] = {}
        self._early: tuple[str, int, _socket.socket] | None = None  # store root, pid, link

    def mount(self, store: Store, ref: str, mountpoint: str, *, upper: str, work: str,
              read_only: bool = False, volatile: bool = False) -> Any:  # fmt: skip
        return self.start(store, ref, mountpoint, upper=upper, work=work, read_only=read_only,
                          volatile=volatile).wait()  # fmt: skip

    def prepare(self, root: str | os.PathLike, ref: str) -> None:
        """Fork the daemon for this process's next mount now (see above), for the store at
        `root`; it loads the index of image `ref` ahead (`start` says which image to mount, so
        a tag moved meanwhile costs time, not correctness). A prepared daemon nobody uses exits
        when this process closes its end of the link (by exiting, say); one that failed says
        why when `start` hands it its mount."""
        if self._early is not None:
            return
        from cowfs.store import absolute

        root = absolute(root)  # as Store has it (`path()`), which start() compares with
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        pid = self._fork(theirs, root, ref)
        theirs.close()
        self._early = (root, pid, ours)

    def cancel(self) -> None:
        """Let a prepared daemon go unused: it exits, and is reaped here."""
        early, self._early = self._early, None
        if early is not None:
            early[2].close()
            os.waitpid(early[1], 0)

    def start(self, store: Store, ref: str, mountpoint: str, *, upper: str, work: str,
              read_only: bool = False, volatile: bool = False) -> PendingMount:  # fmt: skip
        """Have the prepared daemon (forked now if there is none) mount image `ref` of `store`
        at `mountpoint`; the returned PendingMount waits until it is live."""
        mountpoint = os.path.abspath(mountpoint)
        table = open("/proc/self/mountinfo", "rb")  # noqa: SIM115 - closed by wait()
        if self._early is not None and self._early[0] != store.path():
            self.cancel()  # prepared for another store: it exits
        if self._early is None:
            self.prepare(store.path(), ref)
        assert self._early is not None
        _, pid, link = self._early
        self._early = None
        order = {"ref": ref, "mountpoint": mountpoint, "upper": upper, "work": work,
                 "read_only": read_only, "volatile": volatile}  # fmt: skip
        try:
            link.sendall(fastjson.dumps(order).encode())
            link.shutdown(_socket.SHUT_WR)
        except OSError:
            pass  # it died already: PendingMount reads why from the link
        return PendingMount(self, pid, mountpoint, link, table)

    @staticmethod
    def _fork(link: _socket.socket, root: str, ref: str) -> int:
        """Fork a daemon (_early_daemon); its errors go to `link` as one line."""
        # The library find_library("fuse3") would return, named directly: find_library runs
        # `ldconfig -p` in a subprocess, 10-80 ms of every container start here.
        os.environ.setdefault("FUSE_LIBRARY_PATH", "libfuse3.so.3")
        # Objects inherited by the child stay out of its garbage collector: a collection would
        # touch (and so copy) every page of the parent's heap.
        gc.freeze()
        pid = os.fork()
        if pid:
            return pid
        code = 2
        fd = link.fileno()
        try:
            os.setsid()  # terminal signals to the caller must not take the mount down
            background.detach(fd, "cowfs-fuse (starting)")
            _early_daemon(root, ref, link)
            code = 0
        except CowfsError as exc:
            background.report(fd, exc.message)
        except BaseException as exc:  # noqa: BLE001 - a forked daemon must never unwind
            background.report(fd, repr(exc))
        os._exit(code)

    def umount(self, mountpoint: str) -> None:
        from cowfs import mounting

        mountpoint = os.path.abspath(mountpoint)
        pid = self._daemons.pop(mountpoint, None)
        # With the pid known, umount need not find the daemon's pid file (hashlib: ~5 ms).
        mounting.umount(mountpoint, pid=pid)
        if pid is not None:
            os.waitpid(pid, 0)  # the daemon exits once unmounted: nothing is left running


def _early_daemon(root: str, ref: str, link: _socket.socket) -> None:
    """The body of a prepared daemon: the imports and the index first, then wait for what to
    mount where (EOF without it: not needed after all)."""
    from cowfs import fuse, mounting
    from cowfs.store import Store

    fuse.preload()
    store = Store(root)
    try:
        mounting.image_index(store, store.resolve(ref))  # build_image_fs finds it loaded
    except CowfsError:
        pass  # the order names the image: its errors are reported then
    chunks = []
    while chunk := link.recv(65536):
        chunks.append(chunk)
    if not chunks:
        os._exit(0)
    order = fastjson.loads(b"".join(chunks))
    from runtime.proctitle import set_title

    set_title(f"cowfs-fuse {order['mountpoint']}")
    mounting.mount(store, order["ref"], order["mountpoint"], upper=order["upper"],
                   work=order["work"], read_only=order["read_only"], volatile=order["volatile"],
                   foreground=True)  # fmt: skip
