"""Mounting a container's root: cowfs (FUSE) by default, anything with mount/umount in tests.

The FUSE daemon is forked from the runtime before any namespace or cgroup of the container
exists, so it serves from outside both (DESIGN decision 7).
"""

from __future__ import annotations

import gc
import os
import signal
from typing import Any, Protocol

from cowfs.errors import CowfsError
from cowfs.store import Store
from runtime import process


class Mounter(Protocol):
    def mount(self, store: Store, ref: str, mountpoint: str, *, upper: str, work: str,
              read_only: bool = False) -> Any: ...  # fmt: skip

    def umount(self, mountpoint: str) -> None: ...


class CowfsMounter:
    """cowfs.mounting, with the daemon forked from this process instead of started as a new
    interpreter: the imports are paid once, which is most of a container's start-up time.

    The child serves the mount in the foreground (mounting.mount(foreground=True)); we learn
    the mount is live from /proc/self/mountinfo, which polls readable (POLLPRI) whenever the
    mount table changes, and that the daemon failed from its pidfd. Nobody sleeps.
    """

    def __init__(self) -> None:
        self._daemons: dict[str, int] = {}

    def mount(self, store: Store, ref: str, mountpoint: str, *, upper: str, work: str,
              read_only: bool = False) -> Any:  # fmt: skip
        import select

        # The library find_library("fuse3") would return, named directly: find_library runs
        # `ldconfig -p` in a subprocess, 10-80 ms of every container start here.
        os.environ.setdefault("FUSE_LIBRARY_PATH", "libfuse3.so.3")
        import cowfs.fuse  # noqa: F401 - imported before the fork, so the daemon starts warm
        from cowfs import mounting
        from cowfs.errors import MountError

        mountpoint = os.path.abspath(mountpoint)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        table = open("/proc/self/mountinfo", "rb")  # noqa: SIM115 - closed below
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
        pidfd = os.pidfd_open(pid)
        try:
            while not is_mounted(mountpoint):
                ready, _, changed = select.select([pidfd], [], [table], 30)
                if pidfd in ready:
                    os.waitpid(pid, 0)
                    message = os.read(err_r, 4096).decode(errors="replace") or "daemon exited"
                    raise MountError(f"cannot mount {mountpoint}: {message}")
                if not ready and not changed and not is_mounted(mountpoint):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise MountError(f"cannot mount {mountpoint}: the daemon did not start")
                table.seek(0)
                table.read()  # re-arm the mount-table notification
        finally:
            table.close()
            os.close(pidfd)
            os.close(err_r)
        self._daemons[mountpoint] = pid
        return pid

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
