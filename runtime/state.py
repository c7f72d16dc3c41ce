"""A container's persistent state: an explicit state machine and its state.json.

    created --start--> running --exit--> exited --start--> running ...
    created/exited --rm--> (gone);  running --rm -f--> (killed, then gone)

state.json is replaced atomically (write, rename), so a reader sees the old or the new
document, never a torn one. A state that says running but whose init process is gone (its monitor
was killed) reads as exited: processes are identified by pid plus start time, never pid alone.
"""

from __future__ import annotations

import os
import time

from cowfs import fastjson
from cowfs.errors import ContainerError, InvalidInput, NotFound
from cowfs.record import asdict, field, record
from runtime.spec import ContainerSpec


class Status:
    """The states, as the str that state.json holds. (Not an Enum: enum is ~7 ms of a start.)"""

    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    ALL = (CREATED, RUNNING, EXITED)

    @classmethod
    def of(cls, value: str) -> str:
        if value not in cls.ALL:
            raise ValueError(f"{value!r} is not a container status")
        return value


def process_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (field 22 of /proc/pid/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None  # a zombie has exited already
    return int(fields[19])


def alive(pid: int, start_time: int | None) -> bool:
    return pid > 0 and start_time is not None and process_start_time(pid) == start_time


@record
class State:
    id: str
    name: str
    image: str  # the reference as given
    image_id: str
    spec: ContainerSpec
    created: float = field(default_factory=time.time)
    status: str = Status.CREATED
    pid: int = 0  # host pid of the container's init
    pid_start: int | None = None
    monitor_pid: int = 0
    monitor_start: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    auto_remove: bool = False
    cgroups: dict[str, list[str]] = field(default_factory=dict)  # controller -> [version, dir]
    mounted: bool = False  # its rootfs is mounted at rootfs/ (running, or bundle)
    daemon_pid: int = 0  # the FUSE daemon serving rootfs/ (outside its namespaces and cgroup)

    # -- the state machine -----------------------------------------------------------------

    def can_start(self) -> bool:
        return self.status in (Status.CREATED, Status.EXITED)

    def can_kill(self) -> bool:
        return self.status == Status.RUNNING

    def can_delete(self, force: bool = False) -> bool:
        return force or self.status != Status.RUNNING

    def mark_running(self, pid: int, monitor_pid: int) -> None:
        if not self.can_start():
            raise ContainerError(f"container {self.name} is already running")
        self.status = Status.RUNNING
        self.pid, self.pid_start = pid, process_start_time(pid)
        self.monitor_pid, self.monitor_start = monitor_pid, process_start_time(monitor_pid)
        self.started_at = time.time()
        self.finished_at, self.exit_code, self.oom_killed = None, None, False

    def mark_exited(self, exit_code: int, oom_killed: bool = False) -> None:
        self.status = Status.EXITED
        self.exit_code = exit_code
        self.oom_killed = oom_killed
        self.finished_at = time.time()
        self.pid, self.pid_start = 0, None

    def is_alive(self) -> bool:
        return self.status == Status.RUNNING and alive(self.pid, self.pid_start)

    def monitor_alive(self) -> bool:
        return alive(self.monitor_pid, self.monitor_start)

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["spec"] = self.spec.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> State:
        doc = dict(doc)
        doc["status"] = Status.of(doc["status"])
        doc["spec"] = ContainerSpec.from_json(doc["spec"])
        return cls(**doc)


class StateDir:
    """<store>/containers/<id>/: state.json, upper/, work/, rootfs/, etc/, container.log."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)  # str paths: pathlib is not loaded on the start path

    @property
    def id(self) -> str:
        return os.path.basename(self.path)

    def __truediv__(self, name: str) -> str:
        return os.path.join(self.path, name)

    upper = property(lambda self: self / "upper")
    work = property(lambda self: self / "work")
    rootfs = property(lambda self: self / "rootfs")
    etc = property(lambda self: self / "etc")
    log = property(lambda self: self / "container.log")
    state_file = property(lambda self: self / "state.json")

    def lock(self) -> int:
        """An exclusive lock on this container (an fd; closing it unlocks)."""
        import fcntl

        try:
            fd = os.open(self / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError as exc:
            raise NotFound(f"container {self.id[:12]} is gone") from exc
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def load(self) -> State:
        try:
            with open(self.state_file, "rb") as f:
                state = State.from_json(fastjson.loads(f.read()))
        except FileNotFoundError as exc:
            raise NotFound(f"container {self.id[:12]} has no state") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidInput(f"container {self.id[:12]}: damaged state.json: {exc}") from exc
        # A running state whose init and monitor are both gone: the container ended unobserved.
        if state.status == Status.RUNNING and not state.is_alive() and not state.monitor_alive():
            state.mark_exited(-1)
        return state

    def save(self, state: State) -> None:
        # Atomic (write + rename) but not fsynced: readers need a whole document, and after a
        # host crash every container has stopped anyway. An fsync costs ~8 ms per start here.
        tmp = self / f".state.json.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(fastjson.dumps(state.to_json(), indent=2, sort_keys=True) + "\n")
        os.rename(tmp, self.state_file)
