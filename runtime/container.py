"""Containers: the lifecycle verbs over a store (create, run, start, stop, kill, rm, exec, ...).

The order of a start, and why:
  1. mount the image with cowfs (upper/work in the state dir). The FUSE daemon is forked here,
     before any namespace or cgroup exists, so it stays outside both; it mounts in the
     background while steps 2-3 run (they do not need the mount).
  2. create the cgroups (children of our own) and write the limits.
  3. launch: intermediate joins the cgroups, unshares every namespace but the mount one, then
     waits until the mount is live (the mount namespace it creates next copies the mount
     table), unshares that one, forks PID 1.
  4. PID 1 mounts /proc, /dev, /sys ..., pivots onto the FUSE mount, cuts capabilities, forks
     the command and reaps.
  5. the monitor (the attached CLI, or a detached copy of it) relays output and waits; at exit
     it records the status, removes the cgroups and unmounts.
"""

from __future__ import annotations

import os
import sys as _sys
import time
from _signal import SIGKILL, SIGTERM  # signal.py would load enum: not on the start path

from cowfs.errors import AlreadyExists, ContainerError, CowfsError, InUse, InvalidInput, NotFound
from cowfs.record import replace
from cowfs.store import Image, Store
from runtime import background, channel, init, monitor, namespaces, process, rootfs
from runtime.cgroups import Cgroup
from runtime.mounter import CowfsMounter, is_mounted, start_mount
from runtime.spec import ContainerSpec, RunOptions, build, merge_env, parse_env
from runtime.state import State, StateDir, Status
from runtime.syscalls import Syscalls

# Annotations only: this module is on every container's start path, where typing, pathlib,
# contextlib, shutil and signal are not loaded (docs/ARCHITECTURE.md, "The start path").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from typing import Any

    from runtime.mounter import Mounter

_TRACE = os.environ.get("COWFS_TRACE_START") == "1"


def _phase(name: str, when: float | None = None) -> None:
    """COWFS_TRACE_START=1: where the start-up time goes: `cowfs-trace <epoch> <phase>` on
    stderr (the benchmark subtracts its own start time)."""
    if _TRACE:
        print(f"cowfs-trace {when or time.time():.4f} {name}", file=_sys.stderr)


def _signal_number(sig: str | int) -> int:
    if isinstance(sig, int) or str(sig).isdigit():
        return int(sig)
    name = str(sig).upper()
    name = name if name.startswith("SIG") else "SIG" + name
    import signal

    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidInput(f"invalid signal {sig}") from None


class Runtime:
    """The container verbs over one store. `sys` and `mounter` are replaceable for tests."""

    def __init__(self, store: Store, *, sys: Syscalls | None = None,
                 mounter: Mounter | None = None) -> None:  # fmt: skip
        self.store = store
        self.sys = sys or Syscalls()
        self.mounter = mounter or CowfsMounter()

    # -- lookup --------------------------------------------------------------------------------

    def _dirs(self) -> list[StateDir]:
        base = self.store.path("containers")
        dirs = [StateDir(os.path.join(base, name)) for name in sorted(os.listdir(base))]
        return [sd for sd in dirs if os.path.exists(sd.state_file)]

    def states(self) -> list[State]:
        out = []
        for sd in self._dirs():
            try:
                out.append(sd.load())
            except CowfsError:
                pass
        return sorted(out, key=lambda s: s.created, reverse=True)

    def find(self, ref: str) -> StateDir:
        """A container by name, full id or unique id prefix."""
        dirs = self._dirs()
        for sd in dirs:
            if sd.id == ref:
                return sd
        for sd in dirs:
            try:
                if sd.load().name == ref:
                    return sd
            except CowfsError:
                pass
        matches = [sd for sd in dirs if len(ref) >= 3 and sd.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidInput(f"container id prefix {ref} is ambiguous")
        raise NotFound(f"no such container: {ref}")

    # -- create / run / start ------------------------------------------------------------------

    def _image(self, ref: str) -> Image:
        """The store's image; a reference naming a registry host is pulled when missing
        (as docker run does). Plain names never go to the network."""
        try:
            return self.store.resolve(ref)
        except NotFound:
            first = ref.split("/", 1)[0]
            if "/" not in ref or not ("." in first or ":" in first or first == "localhost"):
                raise
        from cowfs.registry.pull import ensure_image

        return self.store.resolve(ensure_image(self.store, ref))

    def create(self, image: str, opts: RunOptions, *, name: str | None = None,
               auto_remove: bool = False) -> State:  # fmt: skip
        img = self._image(image)
        cid = os.urandom(32).hex()
        spec = build(img.config, opts, cid)
        for vol in spec.volumes:
            if not os.path.exists(vol.host):
                raise NotFound(f"volume source {vol.host} does not exist")
        name = name or f"cowfs_{cid[:8]}"
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise InvalidInput(f"invalid container name {name!r}")
        with self.store.locked():
            if any(s.name == name for s in self.states()):
                raise AlreadyExists(f"container name {name} is already in use")
            tmp = self.store.mkdtemp("container")
            sd = StateDir(tmp)
            for sub in (sd.upper, sd.work, sd.rootfs, sd.etc):
                os.mkdir(sub)
            state = State(id=cid, name=name, image=image, image_id=img.id, spec=spec,
                          auto_remove=auto_remove)  # fmt: skip
            sd.save(state)
            os.rename(tmp, self.store.path("containers", cid))  # visible only when complete
        return state

    def run(self, state: State, *, detach: bool) -> int:
        """Start a created or exited container; attached, its exit code; detached, 0 once it
        runs."""
        sd = StateDir(self.store.path("containers", state.id))
        if not state.can_start():
            raise ContainerError(f"container {state.name} is already running")
        if detach:
            return self._start_detached(sd)
        return self._supervise(sd, attached=True)

    def _start_detached(self, sd: StateDir) -> int:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)  # the monitor is re-parented to init: it outlives the CLI
            code = 0
            try:
                background.detach(w, f"cowfs-monitor {sd.id[:12]}")
                self._supervise(sd, attached=False, ready_fd=w)
            except CowfsError as exc:
                background.report(w, f"error {exc.exit_code} {exc.message}")
                code = 1
            except BaseException as exc:  # noqa: BLE001 - a forked monitor must never unwind
                background.report(w, f"error 125 monitor: {exc!r}")
                code = 1
            os._exit(code)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            answer = f.read().decode()
        if answer.startswith("error "):
            _, code, message = answer.split(" ", 2)
            err = ContainerError(message)
            err.exit_code = int(code)
            raise err
        if answer != "ok":
            raise ContainerError("the container monitor exited before the container started")
        return 0

    def _supervise(self, sd: StateDir, *, attached: bool, ready_fd: int | None = None) -> int:
        """Start the container and watch it to the end. Runs in the attached CLI or in the
        detached monitor. Returns the exit code (attached)."""
        lock = sd.lock()  # one start at a time: a second one finds it running
        state = sd.load()
        spec = state.spec
        cgroup: Cgroup | None = None
        _phase("supervise")
        wait_mount: Callable[[], Any] | None = None
        try:
            if not state.can_start():
                raise ContainerError(f"container {state.name} is already running")
            if not is_mounted(sd.rootfs):
                # The daemon mounts while we set up; the intermediate awaits it (gate) right
                # before it creates the namespaces, so its cgroup join overlaps it too.
                # A container removed at its end needs nothing of its upper on disk: a
                # volatile mount (as podman's for --rm) skips every sync, the unmount's too.
                wait_mount = start_mount(self.mounter, self.store, state.image_id,
                                         sd.rootfs, upper=sd.upper, work=sd.work,
                                         volatile=state.auto_remove)  # fmt: skip
            _write_etc(sd, spec)
            cgroup = Cgroup.for_container(state.id)
            cgroup.create(spec.limits)
            state.cgroups = {k: list(v) for k, v in cgroup.dirs.items()}
            sd.save(state)
            _phase("cgroups")

            def mounted() -> None:
                nonlocal wait_mount
                if wait_mount is not None:
                    daemon, wait_mount = wait_mount(), None
                    state.daemon_pid = daemon if isinstance(daemon, int) else 0
                state.mounted = True
                _phase("mounted")

            pid, chan, master, streams = self._launch(sd, spec, cgroup, attached, mounted)
            _phase("started")
        except BaseException as exc:
            if wait_mount is not None:  # let it finish, so that the teardown unmounts it
                try:
                    wait_mount()
                except CowfsError:
                    pass
            if not (isinstance(exc, ContainerError) and state.status == Status.RUNNING):
                self._teardown(sd, state, cgroup)
                if state.auto_remove:
                    _remove_tree(sd.path)
            os.close(lock)
            raise
        state.mark_running(pid, os.getpid())
        sd.save(state)
        os.close(lock)
        if ready_fd is not None:
            os.write(ready_fd, b"ok")
            os.close(ready_fd)
        log = monitor.Log(sd.log)
        try:
            interactive_tty = attached and spec.tty and spec.interactive
            with monitor.Attached(pid, master if attached else None, signals=attached,
                                  raw=interactive_tty):  # fmt: skip
                status = monitor.relay(pid, streams, log=log, echo=attached,
                                       stdin_to=master if interactive_tty else None)  # fmt: skip
        finally:
            log.close()
            for fd in streams:
                os.close(fd)
            chan.close()
        code = init.exit_code(status)
        _phase("exited")
        oom = cgroup.oom_killed()
        self._teardown(sd, state, cgroup)
        _phase("torn down")
        state.mark_exited(code, oom)
        if state.auto_remove:
            _remove_tree(sd.path)
        else:
            sd.save(state)
        _phase("done")
        return code

    def _launch(self, sd: StateDir, spec: ContainerSpec, cgroup: Cgroup, attached: bool,
                gate: Callable[[], object],
                ) -> tuple[int, Any, int | None, dict[int, str]]:  # fmt: skip
        """Fork the container's PID 1 once `gate()` (the root is mounted) has returned;
        (pid, channel, pty master, output fds -> stream)."""
        close_after: list[int] = []
        streams: dict[int, str] = {}
        if spec.tty:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            close_after.append(null)
            stdio = (null, null, null)
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            streams = {out_r: "stdout", err_r: "stderr"}
            close_after += [out_w, err_w]
            if attached and spec.interactive:
                stdin = 0
            else:
                stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                close_after.append(stdin)
            stdio = (stdin, out_w, err_w)
        root, etc = str(sd.rootfs), str(sd.etc)
        try:
            pid, chan = process.launch(
                self.sys,
                lambda ch: init.container_init(self.sys, spec, root, etc, ch),
                namespaces_=namespaces.for_network(spec.network),
                cgroup=cgroup,
                stdio=stdio,
                gate=gate,
            )
        finally:
            for fd in close_after:
                os.close(fd)
        master = None
        try:
            while True:
                msg, fds = channel.recv(chan)
                assert msg is not None
                if msg.get("pty"):
                    master = fds[0]
                    streams = {master: "stdout"}
                    continue
                if "error" in msg:
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
                    err = ContainerError(msg["error"])
                    err.exit_code = int(msg.get("code", 125))
                    raise err
                for name, when in msg.get("times", []):
                    _phase(name, when)
                break
        except BaseException:
            for fd in streams:
                os.close(fd)
            chan.close()
            try:
                os.kill(pid, SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            raise
        return pid, chan, master, streams

    def _teardown(self, sd: StateDir, state: State, cgroup: Cgroup | None) -> None:
        """Remove what a start made: cgroups, the mount. Idempotent."""
        if cgroup is None and state.cgroups:
            cgroup = Cgroup({k: (v[0], v[1]) for k, v in state.cgroups.items()})
        if cgroup is not None:
            cgroup.remove()
        state.cgroups = {}
        if is_mounted(sd.rootfs):
            self.mounter.umount(str(sd.rootfs))
        state.mounted = False
        state.daemon_pid = 0

    # -- signals and removal ---------------------------------------------------------------

    def _running(self, ref: str) -> tuple[StateDir, State]:
        sd = self.find(ref)
        state = sd.load()
        if not state.can_kill():
            raise ContainerError(f"container {state.name} is not running")
        return sd, state

    def kill(self, ref: str, sig: str | int = "KILL") -> State:
        signum = _signal_number(sig)
        _sd, state = self._running(ref)
        process.kill_quietly(state.pid, signum)  # its init forwards it to the command
        return state

    def wait(self, sd: StateDir, timeout: float | None = None) -> State | None:
        """Until the container is no longer running and torn down (None: it removed itself).

        Waits on a pidfd of its monitor, which exits right after recording the exit; with the
        monitor gone, on the container's init, and then tears down itself."""
        import select

        try:
            state = sd.load()
        except NotFound:
            return None
        if state.status != Status.RUNNING:
            return state
        watch = state.monitor_pid if state.monitor_alive() else state.pid
        try:
            pidfd = os.pidfd_open(watch)
        except (ProcessLookupError, ValueError):
            pidfd = None
        if pidfd is not None:
            try:
                select.select([pidfd], [], [], timeout)
            finally:
                os.close(pidfd)
        try:
            state = sd.load()
        except NotFound:
            return None
        if state.status == Status.RUNNING and not state.monitor_alive() and not state.is_alive():
            self._teardown(sd, state, None)  # nobody is left to do it
            state.mark_exited(-1)
            sd.save(state)
        return state

    def stop(self, ref: str, timeout: float = 10.0) -> State | None:
        sd, state = self._running(ref)
        process.kill_quietly(state.pid, SIGTERM)
        state = self.wait(sd, timeout)
        if state is not None and state.status == Status.RUNNING:
            process.kill_quietly(state.pid, SIGKILL)
            state = self.wait(sd, 30)
        return state

    def remove(self, ref: str, *, force: bool = False) -> str:
        sd = self.find(ref)
        state = sd.load()
        if not state.can_delete(force):
            raise InUse(f"container {state.name} is running: stop it first or use rm -f")
        if state.status == Status.RUNNING:
            process.kill_quietly(state.pid, SIGKILL)
            name = state.name
            state = self.wait(sd, 30)
            if state is None:
                return name  # its monitor removed it (--rm)
            if state.status == Status.RUNNING:
                raise ContainerError(f"container {state.name} did not stop")
        name = state.name
        try:
            lock = sd.lock()  # not while a start of it is half-way
        except NotFound:
            return name
        try:
            try:
                state = sd.load()
            except NotFound:
                return name
            if state.status == Status.RUNNING:
                raise InUse(f"container {name} was started again meanwhile")
            self._teardown(sd, state, None)
            _remove_tree(sd.path, ignore_errors=False)
        finally:
            os.close(lock)
        return name

    # -- exec ------------------------------------------------------------------------------

    def exec(self, ref: str, args: list[str], *, tty: bool = False, interactive: bool = False,
             env: list[str] | None = None, workdir: str | None = None,
             user: str | None = None) -> int:  # fmt: skip
        if not args:
            raise InvalidInput("exec needs a command")
        sd, state = self._running(ref)
        spec = replace(
            state.spec,
            args=list(args),
            env=merge_env(state.spec.env, parse_env(env or [])),
            cwd=workdir or state.spec.cwd,
            user=state.spec.user if user is None else user,
            tty=tty,
            interactive=interactive,
        )
        cgroup = Cgroup({k: (v[0], v[1]) for k, v in state.cgroups.items()})
        close_after = []
        if interactive and not tty:
            stdin = 0
        else:
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            close_after.append(stdin)
        try:
            pid, chan = process.launch(
                self.sys,
                lambda ch: init.exec_target(self.sys, spec, ch),
                namespaces_=namespaces.for_network(spec.network),
                join_pid=state.pid,
                cgroup=cgroup,
                stdio=(stdin, 1, 2),
            )
        finally:
            for fd in close_after:
                os.close(fd)
        master = None
        try:
            while True:
                msg, fds = channel.recv(chan, eof_ok=True)
                if msg is None:
                    break  # exec'd
                if msg.get("pty"):
                    master = fds[0]
                    continue
                os.waitpid(pid, 0)
                err = ContainerError(msg["error"])
                err.exit_code = int(msg.get("code", 126))
                raise err
        finally:
            chan.close()
        streams = {master: "stdout"} if master is not None else {}
        try:
            raw = master is not None and interactive
            with monitor.Attached(pid, master, signals=True, raw=raw):
                status = monitor.relay(pid, streams, echo=True, wait_eof=False,
                                       stdin_to=master if interactive else None)  # fmt: skip
        finally:
            if master is not None:
                os.close(master)
        return init.exit_code(status)

    # -- looking at containers ---------------------------------------------------------------

    def logs(self, ref: str, follow: bool = False) -> Iterator[tuple[str, str]]:
        sd = self.find(ref)

        def running() -> bool:
            return os.path.exists(sd.state_file) and sd.load().status == Status.RUNNING

        return monitor.read_log(sd.log, running if follow else None)

    def inspect(self, ref: str) -> dict:
        sd = self.find(ref)
        s = sd.load()
        spec = s.spec
        iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None  # noqa: E731
        return {
            "Id": s.id,
            "Name": s.name,
            "Created": iso(s.created),
            "Image": s.image_id,
            "ImageRef": s.image,
            "State": {
                "Status": s.status,
                "Running": s.status == Status.RUNNING,
                "Pid": s.pid,
                "ExitCode": s.exit_code,
                "OOMKilled": s.oom_killed,
                "StartedAt": iso(s.started_at),
                "FinishedAt": iso(s.finished_at),
            },
            "Config": {
                "Hostname": spec.hostname, "Cmd": spec.args, "Env": spec.env,
                "WorkingDir": spec.cwd, "User": spec.user, "Tty": spec.tty,
                "OpenStdin": spec.interactive,
            },
            "HostConfig": {
                "Memory": spec.limits.memory or 0,
                "PidsLimit": spec.limits.pids,
                "NanoCpus": int((spec.limits.cpus or 0) * 1e9),
                "ReadonlyRootfs": spec.read_only,
                "NetworkMode": spec.network,
                "AutoRemove": s.auto_remove,
                "Binds": [f"{v.host}:{v.container}" + (":ro" if v.read_only else "")
                          for v in spec.volumes],  # fmt: skip
            },
            "GraphDriver": {
                "Name": "cowfs",
                "Data": {"UpperDir": str(sd.upper), "WorkDir": str(sd.work),
                         "MergedDir": str(sd.rootfs), "DaemonPid": s.daemon_pid},  # fmt: skip
            },
            "Cgroups": s.cgroups,
            "LogPath": str(sd.log),
        }

    def merged_view(self, ref: str) -> MergedView:
        """The container's merged tree on the host, for a `with` block that gets (state, path):
        its live mount, or a temporary one."""
        sd = self.find(ref)
        return MergedView(self, sd, sd.load())

    def export(self, ref: str, out: str | os.PathLike) -> None:
        """The merged tree as a tar (docker export): a flat file system, no layers."""
        import tarfile

        with self.merged_view(ref) as (_state, root), tarfile.open(out, "w",
                                                                   format=tarfile.PAX_FORMAT) as tf:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(dirnames) + sorted(filenames):
                    path = os.path.join(dirpath, name)
                    arc = os.path.relpath(path, root)
                    tf.add(path, arcname=arc, recursive=False)

    def bundle(self, ref: str, directory: str | os.PathLike) -> Path:
        """An OCI runtime bundle (config.json) whose root is the container's cowfs mount; the
        mount stays until `rm` (runc does not mount the root itself)."""
        from runtime.bundle import oci_config

        sd = self.find(ref)
        state = sd.load()
        if state.status == Status.RUNNING:
            raise ContainerError(f"container {state.name} is running: stop it first")
        if not is_mounted(sd.rootfs):
            self.mounter.mount(self.store, state.image_id, str(sd.rootfs),
                               upper=str(sd.upper), work=str(sd.work))  # fmt: skip
        state.mounted = True
        sd.save(state)
        _write_etc(sd, state.spec)
        from pathlib import Path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        from cowfs.atomic import write_json_atomic

        cfg = oci_config(state.spec, str(sd.rootfs), str(sd.etc), state.id[:12])
        write_json_atomic(directory / "config.json", cfg)
        return directory / "config.json"


class MergedView:
    """Runtime.merged_view: mounts the container's tree for the block unless it is mounted."""

    def __init__(self, rt: Runtime, sd: StateDir, state: State) -> None:
        self._rt, self._sd, self._state = rt, sd, state
        self._mounted_here = False

    def __enter__(self) -> tuple[State, str]:
        sd, rt = self._sd, self._rt
        if not is_mounted(sd.rootfs):
            rt.mounter.mount(rt.store, self._state.image_id, sd.rootfs, upper=sd.upper,
                             work=sd.work)  # fmt: skip
            self._mounted_here = True
        return self._state, sd.rootfs

    def __exit__(self, *exc: object) -> None:
        if self._mounted_here:
            self._rt.mounter.umount(self._sd.rootfs)


def _write_etc(sd: StateDir, spec: ContainerSpec) -> None:
    for name, text in rootfs.etc_files(spec.hostname, spec.network).items():
        with open(os.path.join(sd.etc, name), "w") as f:
            f.write(text)


def _remove_tree(path: str, *, ignore_errors: bool = True) -> None:
    """shutil.rmtree(path, ignore_errors=...). At the end of a `run --rm` without shutil: it
    loads fnmatch and with it re and enum, ~15 ms of every such run. os.fwalk works relative to
    directory fds and never follows a symlink, as shutil's own rmtree, so what a container left
    in its upper cannot send the removal elsewhere."""
    if ignore_errors:
        try:
            for _top, dirs, files, dir_fd in os.fwalk(path, topdown=False):
                for name in files:
                    os.unlink(name, dir_fd=dir_fd)
                for name in dirs:
                    try:
                        os.rmdir(name, dir_fd=dir_fd)
                    except NotADirectoryError:
                        os.unlink(name, dir_fd=dir_fd)  # a symlink to a directory
            os.rmdir(path)
            return
        except OSError:
            pass  # what is left, shutil tries (and ignores what it cannot remove)
    import shutil

    shutil.rmtree(path, ignore_errors=ignore_errors)
