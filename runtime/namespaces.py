"""The namespaces a container gets, in the order they are created and joined.

Ordering is data: NAMESPACES lists them in entry order. A container is created with one
unshare() of all of them (the pid namespace only applies to children, so the caller forks PID 1
right after). `exec` joins them with setns() in the same order, the mount namespace last so the
/proc/<pid>/ns files of the target stay reachable until then.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import struct

from runtime import syscalls as sc

TYPE_CHECKING = False  # annotations only: `typing` is not loaded on the start path
if TYPE_CHECKING:
    from runtime.syscalls import Syscalls


class Namespace:
    __slots__ = ("name", "flag", "why")

    def __init__(self, name: str, flag: int, why: str) -> None:
        self.name = name  # the file under /proc/<pid>/ns/
        self.flag = flag
        self.why = why

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"


NAMESPACES: tuple[Namespace, ...] = (
    Namespace("ipc", sc.CLONE_NEWIPC, "private SysV IPC and POSIX message queues"),
    Namespace("uts", sc.CLONE_NEWUTS, "its own hostname"),
    Namespace("net", sc.CLONE_NEWNET, "only a loopback interface (unless --network host)"),
    Namespace("pid", sc.CLONE_NEWPID, "cannot see host processes; the command's init is PID 1"),
    Namespace("mnt", sc.CLONE_NEWNS, "pivot_root and its mounts stay out of the host's tree"),
)


def for_network(network: str) -> list[Namespace]:
    """The namespaces for a container; --network host shares the host's net namespace."""
    return [ns for ns in NAMESPACES if not (network == "host" and ns.name == "net")]


def unshare_all(sys: Syscalls, namespaces: list[Namespace]) -> None:
    flags = 0
    for ns in namespaces:
        flags |= ns.flag
    sys.unshare(flags)


def join(sys: Syscalls, pid: int, namespaces: list[Namespace]) -> None:
    """Enter the namespaces of process `pid` (exec). Children forked afterwards are inside."""
    # Open every handle first: once we are in the container's mount namespace the host's
    # /proc/<pid> path may mean something else.
    fds = []
    try:
        for ns in namespaces:
            fds.append((os.open(f"/proc/{pid}/ns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC), ns))
        for fd, ns in fds:
            sys.setns(fd, ns.flag)
    finally:
        for fd, _ in fds:
            os.close(fd)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """Bring up `lo` in a fresh network namespace (it starts down): 127.0.0.1 must work."""
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        s.close()
