"""The host side of a running container (what conmon/containerd-shim are to docker).

`relay` copies the container's output to the log (and the terminal when attached), the
terminal's input to the container, forwards signals, and returns the wait status of the
container's first process. It waits with a pidfd, so it never polls.
"""

from __future__ import annotations

import _signal  # signal.py loads enum (~7 ms of a start) for names we do not print
import errno
import fcntl
import os
import select
import struct
import sys
import termios
import time
import tty

from cowfs import fastjson
from runtime.process import kill_quietly

TYPE_CHECKING = False  # annotations only (docs/ARCHITECTURE.md, "The start path")
if TYPE_CHECKING:
    from collections.abc import Iterator

# Signals the attached CLI receives and hands on to the container instead of dying from them.
RELAYED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1,
           _signal.SIGUSR2)  # fmt: skip
DRAIN_SECONDS = 2.0  # how long output may keep arriving after the process exited


class Log:
    """The container's log: one JSON object per chunk, {"time", "stream", "log"} (docker's
    json-file shape), appended and flushed as it comes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, stream: str, data: bytes) -> None:
        rec = {"time": time.time(), "stream": stream, "log": data.decode(errors="replace")}
        os.write(self._fd, fastjson.dumps(rec).encode() + b"\n")

    def close(self) -> None:
        os.close(self._fd)


def read_log(path: str | os.PathLike, follow_while=None) -> Iterator[tuple[str, str]]:
    """(stream, text) records of a log; with `follow_while` keep reading while it returns True."""
    if not os.path.exists(path) and follow_while is None:
        return
    with open(path, "a+") as f:
        f.seek(0)
        pending = ""
        while True:
            line = f.readline()
            if line:
                pending += line
                if pending.endswith("\n"):
                    rec = fastjson.loads(pending)
                    pending = ""
                    yield rec["stream"], rec["log"]
                continue
            if follow_while is None or not follow_while():
                # one last pass: the writer may have appended before it stopped
                for line in f:
                    rec = fastjson.loads(pending + line)
                    pending = ""
                    yield rec["stream"], rec["log"]
                return
            time.sleep(0.1)


def copy_winsize(src_fd: int, dst_fd: int) -> None:
    try:
        size = fcntl.ioctl(src_fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        fcntl.ioctl(dst_fd, termios.TIOCSWINSZ, size)
    except OSError:
        pass


class Attached:
    """For a `with` block of an attached container (run or exec): with `signals`, the signals
    the CLI gets go to `pid` (window changes resize the pty `master`); with `raw`, our stdin's
    terminal is in raw mode, sized like the pty (keys go to the container as typed)."""

    def __init__(self, pid: int, master: int | None, *, signals: bool, raw: bool) -> None:
        self.pid, self.master = pid, master
        self.signals, self.raw = signals, raw
        self._saved_handlers: dict[int, object] = {}
        self._saved_mode: list | None = None

    def _forward(self, signum: int, _frame: object) -> None:
        kill_quietly(self.pid, signum)

    def _resize(self, _signum: int, _frame: object) -> None:
        if self.master is not None:
            copy_winsize(sys.stdin.fileno(), self.master)

    def __enter__(self) -> Attached:
        if self.signals:
            for sig in RELAYED:
                self._saved_handlers[sig] = _signal.signal(sig, self._forward)
            self._saved_handlers[_signal.SIGWINCH] = _signal.signal(_signal.SIGWINCH,
                                                                    self._resize)  # fmt: skip
        if self.raw:
            try:
                fd = sys.stdin.fileno()
                if self.master is not None:
                    copy_winsize(fd, self.master)
                if os.isatty(fd):
                    self._saved_mode = termios.tcgetattr(fd)
                    tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keep what was typed ahead
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved_mode is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved_mode)
        for sig, handler in self._saved_handlers.items():
            _signal.signal(sig, handler)


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
