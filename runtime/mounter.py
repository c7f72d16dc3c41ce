"""Mounting a container's root: cowfs (FUSE) by default, anything with mount/umount in tests.

The FUSE daemon is forked from the runtime before any namespace or cgroup of the container
exists, so it serves from outside both (DESIGN decision 7).
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from cowfs.errors import CowfsError
from cowfs.store import Store
from runtime import process


class Mounter(Protocol):
    def mount(self, store: Store, ref: str, mountpoint: str, *, upper: str, work: str,
              read_only: bool = False) -> Any: ...  # fmt: skip

    def umount(self, mountpoint: str) -> None: ...


def start_mount(mounter: Mounter, store: Store, ref: str, mountpoint: str, *, upper: str,
                work: str) -> Callable[[], Any]:  # fmt: skip
    """Begin mounting; the returned call waits until the mount is live and returns what
    `mount` returns. A mounter with a `start` method (CowfsMounter) mounts in the background
    meanwhile; any other mounts here and now."""
    start = getattr(mounter, "start", None)
    if start is not None:
        return start(store, ref, mountpoint, upper=upper, work=work)
    result = mounter.mount(store, ref, mountpoint, upper=upper, work=work)
    return lambda: result


class PendingMount:
    """A FUSE daemon forked and mounting; `wait()` returns its pid once the mount is live.

    We learn the mount is live from /proc/self/mountinfo, which polls readable (POLLPRI)
    whenever the mount table changes, and that the daemon failed from its pidfd. Nobody
    sleeps."""

    def __init__(self, owner: CowfsMounter, pid: int, mountpoint: str, err_r: int,
                 table: BinaryIO) -> None:  # fmt: skip
        self.owner, self.pid, self.mountpoint = owner, pid, mountpoint
        self._err_r, self._table = err_r, table
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
                    message = os.read(self._err_r, 4096).decode(errors="replace")
                    if not message.startswith(f"cannot mount {self.mountpoint}"):
                        message = f"cannot mount {self.mountpoint}: {message or 'daemon exited'}"
                    raise MountError(message)
                if not ready and not changed and not is_mounted(self.mountpoint):
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
            os.close(self._err_r)
        self.owner._daemons[self.mountpoint] = pid
        return pid


class CowfsMounter:
    """cowfs.mounting, with the daemon forked from this process instead of started as a new
    interpreter: what is imported already is paid once. The child imports the FUSE side itself
    (cowfs.fuse, mfusepy: ~15 ms), so that overlaps with the container's set-up here: `start`
    returns at once and the caller awaits the mount only when the container needs it.

    The child serves the mount in the foreground (mounting.mount(foreground=True)).
    """

    def __init__(self) -> None:
        self._daemons: dict[str, int] = {}

    def mount(self, store: Store, ref: str, mountpoint: str, *, upper: str, work: str,
              read_only: bool = False) -> Any:  # fmt: skip
        return self.start(store, ref, mountpoint, upper=upper, work=work,
                          read_only=read_only).wait()  # fmt: skip

    def start(self, store: Store, ref: str, mountpoint: str, *, upper: str, work: str,
              read_only: bool = False) -> PendingMount:  # fmt: skip
        # The library find_library("fuse3") would return, named directly: find_library runs
        # `ldconfig -p` in a subprocess, 10-80 ms of every container start here.
        os.environ.setdefault("FUSE_LIBRARY_PATH", "libfuse3.so.3")
        from cowfs import mounting

        mountpoint = os.path.abspath(mountpoint)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        table = open("/proc/self/mountinfo", "rb")  # noqa: SIM115 - closed by wait()
        # Objects inherited by the child stay out of its garbage collector: a collection would
        # touch (and so copy) every page of the parent's heap.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                os.setsid()  # terminal signals to the caller must not take the mount down
                process.detach(err_w, f"cowfs-fuse {mountpoint}")
                mounting.mount(store, ref, mountpoint, upper=upper, work=work,
                               read_only=read_only, foreground=True)  # fmt: skip
                code = 0
            except CowfsError as exc:
                os.write(err_w, exc.message.encode())
            except BaseException as exc:  # noqa: BLE001 - a forked daemon must never unwind
                os.write(err_w, repr(exc).encode())
            os._exit(code)
        os.close(err_w)
        return PendingMount(self, pid, mountpoint, err_r, table)

    def umount(self, mountpoint: str) -> None:
        from cowfs import mounting

        mountpoint = os.path.abspath(mountpoint)
        mounting.umount(mountpoint)
        pid = self._daemons.pop(mountpoint, None)
        if pid is not None:
            os.waitpid(pid, 0)  # the daemon exits once unmounted: nothing is left running


def is_mounted(path: str | os.PathLike) -> bool:
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].replace("\\040", " ") == path for line in f)
