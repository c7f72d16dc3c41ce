"""Inside the container: set up the root, then stay as PID 1 (reaper, signal forwarder).

`container_init` runs in the first process of the new pid namespace. It builds the rootfs
(rootfs.plan), pivots, sets the hostname, brings up loopback, cuts capabilities, sets
no_new_privs, then forks the command and becomes a tini-like init: it reaps every zombie,
forwards signals to the command and exits with the command's status (128+N for a signal), which
takes the whole pid namespace down with it.

Everything used after pivot_root is imported before it: the host's Python library is gone then.
"""

from __future__ import annotations

import _signal  # the signal module's enums would load enum (~7 ms of a start): ints will do
import errno
import fcntl
import os
import termios
import time
import warnings  # noqa: F401 - os.execvpe imports it (in os.get_exec_path), after the pivot

from runtime import capabilities, namespaces, rootfs, users
from runtime import syscalls as sc
from runtime.channel import send
from runtime.process import kill_quietly
from runtime.proctitle import set_title

TYPE_CHECKING = False  # annotations only (docs/ARCHITECTURE.md, "The start path")
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from runtime.channel import Socket
    from runtime.spec import ContainerSpec
    from runtime.syscalls import Syscalls

# tini's choice: forward every signal except the ones the kernel sends synchronously on faults,
# and the terminal job-control ones that would only stop init.
_NOT_FORWARDED = {
    _signal.SIGKILL, _signal.SIGSTOP, _signal.SIGCHLD, _signal.SIGSEGV, _signal.SIGBUS,
    _signal.SIGILL, _signal.SIGFPE, _signal.SIGABRT, _signal.SIGTRAP, _signal.SIGSYS,
    _signal.SIGTTIN, _signal.SIGTTOU,
}
FORWARDED = set(range(1, 32)) - _NOT_FORWARDED
# Python ignores these; an ignored disposition survives execve, so the command would inherit it.
_PY_IGNORED = (_signal.SIGPIPE, _signal.SIGXFSZ)


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def exec_command(
    spec: ContainerSpec, user: users.User, tty_fd: int | None,
    report: Callable[[int, str], None],
) -> NoReturn:
    """Become the command (in a freshly forked child). A failure is reported as (exit code,
    one line) before exiting with that code: 127 not found, 126 not runnable."""
    try:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, set())
        for sig in (*_PY_IGNORED, _signal.SIGINT):
            _signal.signal(sig, _signal.SIG_DFL)
        os.setsid()  # its own session: job control in a shell, and a controlling terminal
        if tty_fd is not None:
            fcntl.ioctl(tty_fd, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(tty_fd, fd)
            if tty_fd > 2:
                os.close(tty_fd)
        os.setgroups(list(user.groups))
        os.setgid(user.gid)
        os.setuid(user.uid)  # drops every capability when uid != 0 (no keepcaps)
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in spec.env)
        env.setdefault("HOME", user.home or "/")
        try:
            os.chdir(spec.cwd)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot enter working directory {spec.cwd}") from None
        os.execvpe(spec.args[0], spec.args, env)
    except BaseException as exc:  # noqa: BLE001 - we must report and _exit, never unwind
        code = 127 if getattr(exc, "errno", None) in (errno.ENOENT, errno.ENOTDIR) else 126
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            report(code, f"{spec.args[0] if spec.args else '?'}: {detail}")
        except OSError:
            pass
        os._exit(code)


def spawn_command(
    spec: ContainerSpec, user: users.User, tty_fd: int | None,
) -> tuple[int, str | None, int]:
    """Fork and exec the command; (pid, error text or None, the exit code if it failed)."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        exec_command(spec, user, tty_fd, lambda c, t: os.write(err_w, f"{c} {t}".encode()))
    os.close(err_w)
    chunks = []
    while chunk := os.read(err_r, 4096):  # EOF when exec succeeded (the pipe is CLOEXEC)
        chunks.append(chunk)
    os.close(err_r)
    if not chunks:
        return pid, None, 0
    code, _, text = b"".join(chunks).decode(errors="replace").partition(" ")
    return pid, text, int(code)


def open_pty(chan: Socket) -> int:
    """A terminal from the container's own devpts: the master goes to the monitor, the slave
    is returned (it becomes the command's controlling terminal)."""
    master, slave = os.openpty()
    send(chan, {"pty": True}, fds=[master])
    os.close(master)
    return slave


def reap_forever(main_pid: int, forwarded: set[int]) -> NoReturn:
    """PID 1's loop: reap every child, forward signals to the command, exit with its status."""
    waitset = forwarded | {_signal.SIGCHLD}
    while True:
        info = _signal.sigwaitinfo(waitset)
        if info.si_signo != _signal.SIGCHLD:
            kill_quietly(main_pid, info.si_signo)
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == main_pid:
                # Exiting kills every process left in the pid namespace: the container is over.
                os._exit(exit_code(status))


def container_init(
    sys: Syscalls, spec: ContainerSpec, root: str, etc_dir: str, chan: Socket,
) -> NoReturn:
    times = [("init", time.time())]  # phase end times, sent back for COWFS_TRACE_START
    try:
        set_title("cowfs-init")
        rootfs.apply(sys, rootfs.plan(root, spec, etc_dir))
        times.append(("init: mounts", time.time()))
        rootfs.pivot(sys, root)
        sys.sethostname(spec.hostname)
        if spec.network != "host":
            namespaces.loopback_up()
        times.append(("init: pivot, hostname, lo", time.time()))
        user = users.resolve(spec.user, _read_text("/etc/passwd"), _read_text("/etc/group"))
        # docker creates a missing WorkingDir, also where an image's symlink points; after the
        # pivot, realpath resolves inside the container's root.
        os.makedirs(os.path.realpath(spec.cwd), exist_ok=True)
        capabilities.drop_to(sys)
        capabilities.no_new_privs(sys)
        tty_fd = open_pty(chan) if spec.tty else None
        # Not dumpable: the container's processes cannot read init's memory or fds via /proc.
        sys.prctl(sc.PR_SET_DUMPABLE, 0)
        _signal.pthread_sigmask(_signal.SIG_BLOCK, FORWARDED | {_signal.SIGCHLD})
        times.append(("init: user, caps", time.time()))
        pid, error, code = spawn_command(spec, user, tty_fd)
        times.append(("init: command exec'd", time.time()))
    except Exception as exc:  # noqa: BLE001 - reported to the monitor as one line
        send(chan, {"error": f"container init: {exc}", "code": 125})
        os._exit(125)
    if error is not None:
        send(chan, {"error": error, "code": code})
    else:
        send(chan, {"started": True, "times": times})
    chan.close()
    if tty_fd is not None:
        os.close(tty_fd)
    reap_forever(pid, FORWARDED)


def exec_target(sys: Syscalls, spec: ContainerSpec, chan: Socket) -> NoReturn:
    """`exec`: a process joining a running container (its namespaces are already entered).

    It gets the same cuts as the container's command and no init of its own: the runtime
    (a subreaper) waits for it. On success the channel just closes (close-on-exec)."""
    try:
        user = users.resolve(spec.user, _read_text("/etc/passwd"), _read_text("/etc/group"))
        capabilities.drop_to(sys)
        capabilities.no_new_privs(sys)
        tty_fd = open_pty(chan) if spec.tty else None
    except Exception as exc:  # noqa: BLE001 - reported to the caller as one line
        send(chan, {"error": f"exec: {exc}", "code": 126})
        os._exit(126)
    exec_command(spec, user, tty_fd, lambda c, t: send(chan, {"error": t, "code": c}))
