"""Turning a forked child into a background helper: the monitor of a detached container, a
FUSE daemon. Kept apart from runtime.process (and as light to import) because the FUSE daemon
of a start is forked before the runtime is imported (runtime.mounter)."""

from __future__ import annotations

import os

from runtime.proctitle import set_title


def report(fd: int, message: str) -> None:
    """Tell the parent of a helper that failed why, on `fd`, if it still listens."""
    try:
        os.write(fd, message.encode())
    except OSError:
        pass  # nobody listens any more


def detach(keep_fd: int, title: str) -> None:
    """Turn a forked child into a background helper (monitor, FUSE daemon): stdio on
    /dev/null, no descriptor of the caller's but `keep_fd`, cwd /, a title for ps."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    # A pipe of the caller's kept open here would make whoever reads the CLI's output wait
    # for this process's end.
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, os.sysconf("SC_OPEN_MAX"))
    os.chdir("/")
    set_title(title)
