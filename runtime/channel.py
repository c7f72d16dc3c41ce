"""The socket between the runtime on the host and the processes it starts in the container.

One message is one JSON object in one sendmsg, optionally carrying file descriptors
(SCM_RIGHTS): the pty master opened inside the container travels this way.
"""

from __future__ import annotations

# _socket, not socket: socket.py loads enum and selectors (~8 ms of a container's start), for
# wrappers this module does not need. Its sockets are _socket.socket objects.
import _socket
import struct

from cowfs import fastjson
from cowfs.errors import ContainerError

_MAX = 65536
_MAX_FDS = 4
Socket = _socket.socket


def pair() -> tuple[Socket, Socket]:
    """(runtime end, container end). SOCK_SEQPACKET keeps message boundaries."""
    return _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)


def send(chan: Socket, msg: dict, fds: list[int] | None = None) -> None:
    data = fastjson.dumps(msg).encode()
    if fds:  # as socket.send_fds
        rights = struct.pack(f"{len(fds)}i", *fds)
        chan.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    else:
        chan.send(data)


def recv(chan: Socket, eof_ok: bool = False) -> tuple[dict | None, list[int]]:
    """The next message and the fds it carried. At end of stream (the peer exited or exec'd:
    the socket is close-on-exec) None if `eof_ok`, else ContainerError."""
    data, ancdata, _flags, _addr = chan.recvmsg(_MAX, _socket.CMSG_LEN(_MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:  # as socket.recv_fds
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % 4
            fds.extend(struct.unpack(f"{whole // 4}i", payload[:whole]))
    if not data:
        if eof_ok:
            return None, fds
        raise ContainerError("the container process exited during set-up")
    return fastjson.loads(data), fds
