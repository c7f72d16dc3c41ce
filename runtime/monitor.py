"""The host side of a running container (what conmon/containerd-shim are to docker).

`relay` copies the container's output to the log (and the terminal when attached), the
terminal's input to the container, forwards signals, and returns the wait status of the
container's first process. It waits with a pidfd, so it never polls.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path

# Signals the attached CLI receives and hands on to the container instead of dying from them.
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2)  # fmt: skip
DRAIN_SECONDS = 2.0  # how long output may keep arriving after the process exited


class Log:
    """The container's log: one JSON object per chunk, {"time", "stream", "log"} (docker's
    json-file shape), appended and flushed as it comes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, stream: str, data: bytes) -> None:
        rec = {"time": time.time(), "stream": stream, "log": data.decode(errors="replace")}
        os.write(self._fd, json.dumps(rec).encode() + b"\n")

    def close(self) -> None:
        os.close(self._fd)


def read_log(path: str | os.PathLike, follow_while=None) -> Iterator[tuple[str, str]]:
    """(stream, text) records of a log; with `follow_while` keep reading while it returns True."""
    path = Path(path)
    if not path.exists() and follow_while is None:
        return
    with open(path, "a+") as f:
        f.seek(0)
        pending = ""
        while True:
            line = f.readline()
            if line:
                pending += line
                if pending.endswith("\n"):
                    rec = json.loads(pending)
                    pending = ""
                    yield rec["stream"], rec["log"]
                continue
            if follow_while is None or not follow_while():
                # one last pass: the writer may have appended before it stopped
                for line in f:
                    rec = json.loads(pending + line)
                    pending = ""
                    yield rec["stream"], rec["log"]
                return
            time.sleep(0.1)


def copy_winsize(src_fd: int, dst_fd: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(src_fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        fcntl.ioctl(dst_fd, termios.TIOCSWINSZ, size)


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The attached terminal in raw mode (keys go to the container's pty as typed)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keep what was typed ahead
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def forwarding_signals(pid: int, pty_master: int | None = None) -> Iterator[None]:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def resize(_signum: int, _frame: object) -> None:
        if pty_master is not None:
            copy_winsize(sys.stdin.fileno(), pty_master)

    saved = {sig: signal.signal(sig, forward) for sig in RELAYED}
    saved[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resize)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def relay(
    pid: int,
    outputs: dict[int, str],
    *,
    log: Log | None = None,
    echo: bool = False,
    stdin_to: int | None = None,
    wait_eof: bool = True,
) -> int:
    """Copy output until the process `pid` exited and its output ended; its wait status.

    outputs: fd -> stream name ("stdout"/"stderr"); a pty master is one "stdout" stream.
    stdin_to: copy our stdin there (the pty master) until stdin ends.
    wait_eof: keep reading after the exit until EOF (the pid namespace died, so every writer
    is gone); exec only drains what is already there.
    """
    pidfd = os.pidfd_open(pid)
    live = dict(outputs)
    status: int | None = None
    deadline = 0.0
    stdin_fd = sys.stdin.fileno() if stdin_to is not None else None
    try:
        while True:
            if status is not None and (not live or time.monotonic() > deadline):
                break
            watch = list(live)
            if status is None:
                watch.append(pidfd)
                if stdin_fd is not None:
                    watch.append(stdin_fd)
            timeout = None if status is None else (0 if not wait_eof else 0.05)
            ready, _, _ = select.select(watch, [], [], timeout)
            if not ready and status is not None and not wait_eof:
                break
            for fd in ready:
                if fd == pidfd:
                    status = os.waitpid(pid, 0)[1]
                    deadline = time.monotonic() + DRAIN_SECONDS
                elif fd == stdin_fd:
                    data = os.read(fd, 65536)
                    if data:
                        os.write(stdin_to, data)
                    else:
                        stdin_fd = None
                else:
                    try:
                        data = os.read(fd, 65536)
                    except OSError as exc:
                        if exc.errno != errno.EIO:  # EIO: a pty whose last slave closed
                            raise
                        data = b""
                    if not data:
                        del live[fd]
                        continue
                    stream = live[fd]
                    if log is not None:
                        log.write(stream, data)
                    if echo:
                        out = sys.stderr if stream == "stderr" else sys.stdout
                        out.buffer.write(data)
                        out.buffer.flush()
    finally:
        os.close(pidfd)
    assert status is not None
    return status
