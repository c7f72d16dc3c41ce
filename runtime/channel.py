"""The socket between the runtime on the host and the processes it starts in the container.

One message is one JSON object in one sendmsg, optionally carrying file descriptors
(SCM_RIGHTS): the pty master opened inside the container travels this way.
"""

from __future__ import annotations

import json
import socket

from cowfs.errors import ContainerError

_MAX = 65536


def pair() -> tuple[socket.socket, socket.socket]:
    """(runtime end, container end). SOCK_SEQPACKET keeps message boundaries."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(chan: socket.socket, msg: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(chan, [data], fds)
    else:
        chan.send(data)


def recv(chan: socket.socket, eof_ok: bool = False) -> tuple[dict | None, list[int]]:
    """The next message and the fds it carried. At end of stream (the peer exited or exec'd:
    the socket is close-on-exec) None if `eof_ok`, else ContainerError."""
    data, fds, _flags, _addr = socket.recv_fds(chan, _MAX, 4)
    if not data:
        if eof_ok:
            return None, fds
        raise ContainerError("the container process exited during set-up")
    return json.loads(data), fds
