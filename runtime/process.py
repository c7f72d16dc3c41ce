"""Starting a process inside (new or existing) namespaces and cgroups.

    runtime (subreaper) ── fork ─> intermediate: setsid, stdio, join cgroup,
                                   unshare all but the mount namespace (run),
                                   [waits for "go": the runtime's `gate`]
                                   unshare the mount namespace (run) or setns (exec)
                                   ── fork ─> target
                                   sends the target's host pid, exits

The pid namespace only applies to children of the process that unshared it, hence the
intermediate. It exits at once; the runtime is a child subreaper, so the target is re-parented
to it and the runtime waits on it directly. The cgroup is joined before the fork so the target
never runs a moment outside its limits. Joining a fresh v1 cgroup can take 10-20 ms (the
kernel waits for an RCU grace period), so `gate` lets the caller overlap it with its own work:
the intermediate joins and makes the other namespaces, then waits for the gate to open before
it creates the mount namespace (which copies the mount table, so the container's root must be
mounted by then).
"""

from __future__ import annotations

import gc
import os
from _signal import SIGKILL

from cowfs.errors import ContainerError
from runtime import channel, namespaces
from runtime import syscalls as sc

# Annotations only: on a container's start path `typing`, socket and signal (with the enum they
# load) are not imported (docs/ARCHITECTURE.md, "The start path").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from runtime.cgroups import Cgroup
    from runtime.channel import Socket
    from runtime.namespaces import Namespace
    from runtime.syscalls import Syscalls


def kill_quietly(pid: int, sig: int) -> None:
    """os.kill, where a process already gone is no error."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _close_other_fds(keep: set[int]) -> None:
    # Nothing of the host may leak in through an inherited descriptor.
    top = 3
    for fd in sorted(keep | {2}):
        if fd >= top:
            os.closerange(top, fd)
            top = fd + 1
    os.closerange(top, os.sysconf("SC_OPEN_MAX"))


def launch(
    sys: Syscalls,
    target: Callable[[Socket], NoReturn],
    *,
    namespaces_: list[Namespace],
    join_pid: int | None = None,
    cgroup: Cgroup | None = None,
    stdio: tuple[int, int, int] = (0, 1, 2),
    gate: Callable[[], object] | None = None,
) -> tuple[int, Socket]:
    """Start `target(chan)` in the namespaces; returns its host pid and our end of the channel.
    `gate()` runs here while the intermediate joins the cgroup; namespaces come after it
    returns. If it raises, the intermediate is killed and the exception passes on."""
    ours, theirs = channel.pair()
    sys.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    # Objects inherited by the child stay out of its garbage collector: a collection would
    # touch (and so copy) every page of the parent's heap.
    gc.freeze()
    pid = os.fork()
    if pid == 0:  # intermediate
        try:
            ours.close()
            os.setsid()  # no terminal signals from the caller's session reach the container
            for fd, src in enumerate(stdio):
                if src != fd:
                    os.dup2(src, fd)
            _close_other_fds({theirs.fileno()})
            if cgroup is not None:
                cgroup.join(os.getpid())
            # Only the mount namespace needs the gate (it copies the mount table, which must
            # hold the container's root by then); the others, a network namespace above all
            # (2-10 ms here), are made while the runtime still waits for the mount.
            mount_ns = [ns for ns in namespaces_ if ns.flag == sc.CLONE_NEWNS]
            if join_pid is None:
                namespaces.unshare_all(sys, [ns for ns in namespaces_ if ns not in mount_ns])
            if gate is not None:
                go, _ = channel.recv(theirs, eof_ok=True)
                if not go:
                    os._exit(125)  # the runtime gave up (its error is its own to report)
            if join_pid is None:
                namespaces.unshare_all(sys, mount_ns)
            else:
                namespaces.join(sys, join_pid, namespaces_)
            child = os.fork()
            if child == 0:
                target(theirs)  # never returns
            channel.send(theirs, {"pid": child})
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001 - report and _exit, never unwind a fork
            try:
                channel.send(theirs, {"error": f"cannot start container process: {exc}"})
            finally:
                os._exit(125)
    theirs.close()
    if gate is not None:
        try:
            gate()
        except BaseException:
            ours.close()
            kill_quietly(pid, SIGKILL)
            os.waitpid(pid, 0)
            raise
        try:
            channel.send(ours, {"go": True})
        except OSError:
            pass  # it failed before the gate (an unshare): its error waits on the channel
    try:
        msg, _ = channel.recv(ours)
        assert msg is not None
    finally:
        os.waitpid(pid, 0)
    if "error" in msg:
        ours.close()
        raise ContainerError(msg["error"])
    return int(msg["pid"]), ours
