"""Resource limits: memory, pids and cpu, on cgroup v1, v2, and v1/v2 hybrids.

Each controller is found where the caller itself sits (/proc/self/cgroup), so container cgroups
are children of the caller's own cgroup and nothing else is ever touched. On a hybrid host (v1
memory/pids/cpu plus an empty unified hierarchy) each controller goes where it is actually
attached. Locating is pure (`locate`); `Cgroup` does the file writes.
"""

from __future__ import annotations

import errno
import os
import time
from _signal import SIGKILL  # signal.py loads enum: not on the start path

from cowfs.errors import ContainerError
from cowfs.record import record
from runtime.process import kill_quietly
from runtime.spec import Limits

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")


def parse_mountinfo(text: str) -> tuple[dict[str, tuple[str, str]], tuple[str, str] | None]:
    """v1 controller -> (mount point, mount root), and the v2 (mount point, root) if mounted."""
    v1: dict[str, tuple[str, str]] = {}
    v2 = None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if rfields[0] == "cgroup2" and v2 is None:
            v2 = (point, root)
        elif rfields[0] == "cgroup":
            for opt in rfields[2].split(","):
                v1.setdefault(opt, (point, root))
    return v1, v2


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """v1 controller -> path, and the v2 path (the `0::` line) if any."""
    v1: dict[str, str] = {}
    v2 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        if controllers == "":
            v2 = path
        else:
            for c in controllers.split(","):
                v1[c] = path
    return v1, v2


def _under(point: str, root: str, path: str) -> str:
    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    return os.path.normpath(os.path.join(point, rel))


def locate(
    name: str, proc_cgroup: str, mountinfo: str, v2_controllers: str | None = None,
) -> dict[str, tuple[str, str]]:
    """controller -> (version, directory of the container's cgroup), pure.

    `v2_controllers` is the content of the caller's v2 cgroup.controllers (None: read it).
    """
    mounts_v1, mount_v2 = parse_mountinfo(mountinfo)
    paths_v1, path_v2 = parse_proc_cgroup(proc_cgroup)
    out: dict[str, tuple[str, str]] = {}
    for ctl in CONTROLLERS:
        if ctl in paths_v1 and ctl in mounts_v1:
            point, root = mounts_v1[ctl]
            out[ctl] = ("v1", os.path.join(_under(point, root, paths_v1[ctl]), name))
    missing = [c for c in CONTROLLERS if c not in out]
    if missing and mount_v2 is not None and path_v2 is not None:
        parent = _under(mount_v2[0], mount_v2[1], path_v2)
        if v2_controllers is None:
            try:
                with open(os.path.join(parent, "cgroup.controllers")) as f:
                    v2_controllers = f.read()
            except OSError:
                v2_controllers = ""
        available = v2_controllers.split()
        for ctl in missing:
            if ctl in available:
                out[ctl] = ("v2", os.path.join(parent, name))
    return out


def limit_files(version: str, ctl: str, limits: Limits) -> list[tuple[str, str]]:
    """(file, value) pairs to write, in order, for one controller (pure)."""
    if ctl == "memory" and limits.memory is not None:
        if version == "v1":
            # memsw after the plain limit (it must never be below it): no swap beyond the limit
            return [("memory.limit_in_bytes", str(limits.memory)),
                    ("memory.memsw.limit_in_bytes?", str(limits.memory))]
        return [("memory.max", str(limits.memory)), ("memory.swap.max?", "0")]
    if ctl == "pids" and limits.pids is not None:
        return [("pids.max", str(limits.pids))]
    if ctl == "cpu" and limits.cpus is not None:
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        if version == "v1":
            return [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", str(quota))]
        return [("cpu.max", f"{quota} {CPU_PERIOD_US}")]
    return []


def _write(path: str, value: str) -> None:
    optional = path.endswith("?")
    path = path.rstrip("?")
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        if not optional:
            raise


def locate_here(name: str) -> dict[str, tuple[str, str]]:
    """`locate` for the calling process: its /proc/self/cgroup and mountinfo."""
    with open("/proc/self/cgroup") as f:
        proc_cgroup = f.read()
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    return locate(name, proc_cgroup, mountinfo)


def warm_attach() -> None:
    """Ready the kernel for a container's cgroup join, ahead of it (run from a thread).

    The first write to a cgroup.procs after a quiet spell waits for an RCU grace period (the
    rcu_sync of the kernel's cgroup_threadgroup_rwsem): 5-20 ms here, on the way to every
    container's first instruction. Writes within a grace period of another take ~0.1 ms. So
    the runtime starts one at once, while it imports and creates the container: the caller's
    own pid into the caller's own cgroup of a controller the container will use (the process
    is there already: nothing moves). Any failure only means no head start."""
    try:
        for _version, path in locate_here("-").values():
            with open(os.path.join(os.path.dirname(path), "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            return
    except OSError:
        pass


@record
class Cgroup:
    """The container's cgroups: controller -> (version, directory)."""

    dirs: dict[str, tuple[str, str]]

    @classmethod
    def for_container(cls, container_id: str) -> Cgroup:
        return cls(locate_here(f"cowfs-{container_id[:12]}"))

    def unique_dirs(self) -> list[str]:
        return sorted({d for _v, d in self.dirs.values()})

    def create(self, limits: Limits) -> None:
        try:
            for ctl, (version, path) in self.dirs.items():
                if version == "v2":
                    self._enable_v2(os.path.dirname(path), ctl)
                os.makedirs(path, exist_ok=True)
                for name, value in limit_files(version, ctl, limits):
                    _write(os.path.join(path, name), value)
        except OSError as exc:
            self.remove()
            raise ContainerError(f"cannot set up cgroup: {exc}") from exc
        wanted = {"memory": limits.memory, "pids": limits.pids, "cpu": limits.cpus}
        for ctl, value in wanted.items():
            if value is not None and ctl not in self.dirs:
                self.remove()
                raise ContainerError(f"cannot limit {ctl}: no {ctl} cgroup controller here")

    @staticmethod
    def _enable_v2(parent: str, ctl: str) -> None:
        # v2 only hands a controller to children that the parent enables in subtree_control.
        try:
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                if ctl in f.read().split():
                    return
            _write(os.path.join(parent, "cgroup.subtree_control"), f"+{ctl}")
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise ContainerError(
                    f"cannot enable {ctl} below {parent}: it holds processes (cgroup v2's "
                    "no-internal-process rule); run cowfs from a delegated leaf cgroup"
                ) from exc
            raise

    def join(self, pid: int) -> None:
        for path in self.unique_dirs():
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def pids(self) -> set[int]:
        out: set[int] = set()
        for path in self.unique_dirs():
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    out.update(int(x) for x in f.read().split())
            except OSError:
                pass
        return out

    def oom_killed(self) -> bool:
        entry = self.dirs.get("memory")
        if entry is None:
            return False
        version, path = entry
        name = "memory.oom_control" if version == "v1" else "memory.events"
        try:
            with open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
        except OSError:
            pass
        return False

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left inside (only our own cgroup's pids) and remove the directories."""
        deadline = time.monotonic() + timeout
        for path in self.unique_dirs():
            while os.path.isdir(path):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise ContainerError(f"cannot remove cgroup {path}: {exc}") from exc
                    for pid in self.pids():
                        kill_quietly(pid, SIGKILL)
                    time.sleep(0.01)
