"""Mount lifecycle: build the union filesystem, serve it from a daemon, unmount and wait.

`mount()` (an image of the store) and `mount_dirs()` (plain host directories as lowers, as
`mount -t fuse.cowfs -o lowerdir=...` does) start a daemon process and return its pid once the
mount is live: the daemon reports readiness over a pipe from the FUSE init callback, or the
reason it failed; nobody sleeps. The daemon runs in its own session, outside any container
namespace or cgroup (DESIGN decision 7), and records its pid under a run directory so that
`umount()` can stop it: syncfs, unmount, then wait for the daemon to exit.

`python -m cowfs.mounting` is both the daemon entry (`--daemon SPEC`) and the mount(8) helper
(`SOURCE MOUNTPOINT -o lowerdir=A:B,upperdir=U,workdir=W`, leftmost lowerdir on top).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import sys
import time

from cowfs import fastjson
from cowfs.errors import Corruption, CowfsError, InvalidInput, MountError, NotFound

# Annotations only: no pathlib, json or typing on a container's start path (docs/ARCHITECTURE.md)
TYPE_CHECKING = False
if TYPE_CHECKING:  # imported where used: a container start never needs it (~4 ms)
    import subprocess
    from collections.abc import Sequence
    from typing import Any

    # The daemon's side, imported by the daemon: the runtime forks it from a process that
    # must not pay for them (dataclasses, zstandard, xxhash: ~25 ms).
    from cowfs.index import MergedIndex
    from cowfs.toc import Toc

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
# mount(8) passes these generic options to every helper; they mean nothing special here.
_GENERIC_OPTIONS = {
    "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "async", "sync", "dev",
    "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "strictatime",
    "nodiratime", "_netdev", "nofail",
}  # fmt: skip


def run_dir() -> str:
    base = "/run/cowfs" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    path = os.path.join(base, "mounts" if os.geteuid() == 0 else "cowfs-mounts")
    os.makedirs(path, exist_ok=True)
    return path


def _pidfile(mountpoint: str) -> str:
    """<run_dir>/<key>.json; its daemon's log is the same name with .log."""
    try:
        from _sha256 import sha256  # what hashlib would give, without its ~5 ms of imports
    except ImportError:
        from hashlib import sha256

    key = sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    return os.path.join(run_dir(), f"{key}.json")


def _logfile(pidfile: str) -> str:
    return pidfile.removesuffix(".json") + ".log"


# -- building the filesystem ----------------------------------------------------------------------


# The last index image_index() returned, by (store root, image id): a daemon forked early
# loads it before it knows where to mount (runtime/mounter.py), and builds the fs from it then.
# An image id names its layers and so its index for good: it cannot go stale.
_LAST_INDEX: tuple[tuple[str, str], MergedIndex] | None = None


def image_index(store: Any, image: Any) -> MergedIndex:
    """The merged index of an image: from <store>/cache/, or merged and cached."""
    global _LAST_INDEX
    from cowfs.index import INDEX_VERSION, MergedIndex, merge

    key = (store.path(), image.id)
    if _LAST_INDEX is not None and _LAST_INDEX[0] == key:
        return _LAST_INDEX[1]
    path = store.path("cache", f"index-{image.id}-v{INDEX_VERSION}")
    try:
        idx = MergedIndex.load(path)
    except (FileNotFoundError, Corruption):  # a damaged cache is rebuilt: it is derived data
        idx = merge([store.load_toc(layer_id) for layer_id in image.layers])
        from cowfs.atomic import write_atomic

        write_atomic(path, idx.dumps())
    _LAST_INDEX = (key, idx)
    return idx


def _scan_dir(path: str) -> Toc:
    from cowfs.overlaydir import scan

    return scan(path)


def build_image_fs(store: Any, ref: str, upper: str | None, work: str | None,
                   read_only: bool, volatile: bool = False) -> Any:  # fmt: skip
    from cowfs.lowers import StoredLayer
    from cowfs.unionfs import UnionFS

    image = store.resolve(ref)
    idx = image_index(store, image)
    layers = [StoredLayer(store.objects) for _ in image.layers]
    return UnionFS(idx, layers, upper, work, read_only=read_only, volatile=volatile,
                   space=store.path())  # fmt: skip


def build_dir_fs(lowers: Sequence[str], upper: str | None, work: str | None,
                 read_only: bool, volatile: bool = False) -> Any:  # fmt: skip
    """Lowers top first, as overlayfs's lowerdir= lists them."""
    from cowfs.index import merge
    from cowfs.lowers import DirLayer
    from cowfs.unionfs import UnionFS

    bottom_first = list(reversed(lowers))
    idx = merge([_scan_dir(d) for d in bottom_first])
    return UnionFS(idx, [DirLayer(d) for d in bottom_first], upper, work, read_only=read_only,
                   volatile=volatile, space=lowers[0])  # fmt: skip


# -- the daemon ------------------------------------------------------------------------------------


def _check_dirs(mountpoint: str, upper: str | None, work: str | None, read_only: bool) -> None:
    if not os.path.isdir(mountpoint):
        raise NotFound(f"mount point {mountpoint} is not a directory")
    if (upper is None) != (work is None):
        raise InvalidInput("--upper and --work go together")
    for what, d in (("upper", upper), ("work", work)):
        if d is not None and not os.path.isdir(d):
            raise NotFound(f"{what} directory {d} does not exist")
    same_fs = upper is None or work is None or os.stat(upper).st_dev == os.stat(work).st_dev
    if not read_only and not same_fs:
        raise InvalidInput("upper and work directories must be on the same filesystem")


def _spawn(spec: dict[str, Any]) -> int:
    """Start the daemon for `spec` and return its pid once the mount is live."""
    import subprocess

    r, w = os.pipe()
    spec = dict(spec, ready_fd=w)
    # The daemon's own errors (an unexpected exception in a FUSE call) go to a log beside its
    # pid file: it has no terminal.
    log = open(_logfile(_pidfile(spec["mountpoint"])), "ab")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cowfs.mounting", "--daemon", fastjson.dumps(spec)],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log if not spec.get("debug") else None,
            start_new_session=True,  # terminal signals to the caller must not kill the mount
            cwd="/",
        )
    finally:
        os.close(w)
        log.close()
    try:
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
    finally:
        os.close(r)
    answer = b"".join(chunks).decode(errors="replace")
    if answer.startswith("ready"):
        _DAEMONS[proc.pid] = proc
        return proc.pid
    proc.wait()
    message = answer.removeprefix("error ").strip() or f"daemon exited with {proc.returncode}"
    raise MountError(f"cannot mount {spec['mountpoint']}: {message}")


_DAEMONS: dict[int, subprocess.Popen] = {}


def _daemon_main(spec: dict[str, Any], errors: list[str] | None = None) -> int:
    """Build the filesystem and serve it until unmounted. Why it could not start goes to the
    ready pipe (background daemon) and to `errors` (foreground)."""
    from cowfs.fuse import serve

    ready_fd = spec["ready_fd"]
    os.umask(0)  # modes are set explicitly on every created entry
    try:
        if spec.get("store"):
            from cowfs.store import Store

            fs = build_image_fs(Store(spec["store"]), spec["ref"], spec["upper"], spec["work"],
                                spec["read_only"], spec.get("volatile", False))  # fmt: skip
        else:
            fs = build_dir_fs(spec["lowers"], spec["upper"], spec["work"], spec["read_only"],
                              spec.get("volatile", False))  # fmt: skip
    except (CowfsError, OSError) as exc:
        msg = exc.message if isinstance(exc, CowfsError) else str(exc)
        _tell(ready_fd, f"error {msg}", errors)
        return 2

    # Computed before serving: realpath() stats the mount point, which from inside the FUSE
    # loop itself would wait for this very process.
    pidfile = _pidfile(spec["mountpoint"])

    live = False

    def ready(granted: dict[str, bool]) -> None:
        nonlocal ready_fd, live
        live = True
        with open(pidfile, "w") as f:  # daemon_info() reads it
            f.write(fastjson.dumps({"pid": os.getpid(), **granted}))
        if ready_fd >= 0:
            os.write(ready_fd, b"ready")
            os.close(ready_fd)
            ready_fd = -1

    try:
        serve(fs, spec["mountpoint"], fsname=spec.get("fsname", "cowfs"),
              read_only=spec["read_only"], threads=spec.get("threads", False),
              writeback=spec.get("writeback", False), debug=spec.get("debug", False),
              on_ready=ready)  # fmt: skip
    except CowfsError as exc:
        _tell(ready_fd, f"error {exc.message}", None if live else errors)
        return 2
    finally:
        try:
            os.unlink(pidfile)
        except FileNotFoundError:
            pass
        logfile = _logfile(pidfile)
        try:
            if not os.path.getsize(logfile):  # nothing logged: nothing to keep
                os.unlink(logfile)
        except FileNotFoundError:
            pass
    if not live:
        _tell(ready_fd, "error FUSE did not start (is /dev/fuse usable?)", errors)
    return 0


def _tell(fd: int, message: str, errors: list[str] | None = None) -> None:
    if fd >= 0:
        os.write(fd, message.encode())
    if errors is not None:
        errors.append(message.removeprefix("error "))


# -- public API ------------------------------------------------------------------------------------


def _fresh_upper(store: Any) -> tuple[str, str]:
    base = store.path("mounts", os.urandom(8).hex())
    os.makedirs(os.path.join(base, "upper"))
    os.mkdir(os.path.join(base, "work"))
    return os.path.join(base, "upper"), os.path.join(base, "work")


def mount(
    store: Any,
    ref: str,
    mountpoint: str | os.PathLike,
    upper: str | os.PathLike | None = None,
    work: str | os.PathLike | None = None,
    read_only: bool = False,
    *,
    volatile: bool = False,
    foreground: bool = False,
    threads: bool = False,
    writeback: bool = False,
) -> int:
    """Mount image `ref` of `store` at `mountpoint`; return the daemon pid once it is live.

    Without upper/work a fresh pair is made under <store>/mounts/ (unless read_only).
    `volatile`: nothing of the upper is forced to disk (cowfs.unionfs.UnionFS).
    """
    mountpoint = os.path.abspath(mountpoint)
    up = None if upper is None else os.path.abspath(upper)
    wk = None if work is None else os.path.abspath(work)
    _check_dirs(mountpoint, up, wk, read_only)
    store.resolve(ref)  # a bad reference is the caller's error, reported here
    if up is None and not read_only:
        up, wk = _fresh_upper(store)
    spec = {"store": store.path(), "ref": ref, "mountpoint": mountpoint, "upper": up,
            "work": wk, "read_only": read_only, "volatile": volatile, "threads": threads,
            "writeback": writeback, "fsname": f"cowfs:{ref}"}  # fmt: skip
    return _run(spec, foreground)


def mount_dirs(
    lowers: Sequence[str | os.PathLike],
    mountpoint: str | os.PathLike,
    upper: str | os.PathLike | None = None,
    work: str | os.PathLike | None = None,
    read_only: bool = False,
    *,
    volatile: bool = False,
    foreground: bool = False,
    threads: bool = False,
    writeback: bool = False,
    fsname: str = "cowfs",
) -> int:
    """Mount plain directories (top first, like lowerdir=) with an optional upper."""
    if not lowers:
        raise InvalidInput("at least one lower directory is needed")
    mountpoint = os.path.abspath(mountpoint)
    up = None if upper is None else os.path.abspath(upper)
    wk = None if work is None else os.path.abspath(work)
    _check_dirs(mountpoint, up, wk, read_only or up is None)
    for d in lowers:
        if not os.path.isdir(d):
            raise NotFound(f"lower directory {d} does not exist")
    spec = {"lowers": [os.path.abspath(d) for d in lowers], "mountpoint": mountpoint,
            "upper": up, "work": wk, "read_only": read_only or up is None,
            "volatile": volatile, "threads": threads, "writeback": writeback,
            "fsname": fsname}  # fmt: skip
    return _run(spec, foreground)


def _run(spec: dict[str, Any], foreground: bool) -> int:
    if not foreground:
        return _spawn(spec)
    errors: list[str] = []
    # nobody waits for readiness in the foreground
    rc = _daemon_main(dict(spec, ready_fd=-1), errors)
    if rc or errors:
        why = errors[-1] if errors else f"the daemon failed ({rc})"
        raise MountError(f"cannot mount {spec['mountpoint']}: {why}")
    return os.getpid()


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split()[4].replace("\\040", " ") == target:
                return True
    return False


def daemon_info(mountpoint: str | os.PathLike) -> dict[str, Any]:
    """What the daemon serving `mountpoint` recorded once its mount was live: its "pid", and
    what the kernel granted it at INIT ("passthrough", "writeback"); {} if nothing is known."""
    try:
        with open(_pidfile(os.fspath(mountpoint)), "rb") as f:  # _pidfile takes realpath
            info = fastjson.loads(f.read())
    except (FileNotFoundError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def umount(mountpoint: str | os.PathLike, *, lazy: bool = False, pid: int | None = None) -> None:
    """Flush the mount, unmount it and wait until its daemon (`pid`, else the one its pid file
    names) has exited."""
    mountpoint = os.path.abspath(mountpoint)
    if not is_mounted(mountpoint):
        raise NotFound(f"{mountpoint} is not mounted")
    if pid is None:
        pid = daemon_info(mountpoint).get("pid")
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _libc.syncfs(fd)  # write back cached pages to the daemon while it still serves
        finally:
            os.close(fd)
    except OSError:
        pass
    pidfd = _pidfd(pid)
    try:
        code = _umount2(mountpoint, MNT_DETACH if lazy else 0)
        if code:
            if code == errno.EPERM:  # not root: the setuid helper can do it
                import subprocess

                res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True,
                                     text=True)  # fmt: skip
                if res.returncode:
                    raise MountError(f"cannot unmount {mountpoint}: {res.stderr.strip()}")
            else:
                raise MountError(f"cannot unmount {mountpoint}: {os.strerror(code)}")
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable when the daemon has exited
    finally:
        if pidfd is not None:
            os.close(pidfd)
    proc = _DAEMONS.pop(pid, None) if pid is not None else None
    if proc is not None:
        proc.wait()


def _umount2(mountpoint: str, flags: int) -> int:
    """umount2(2); 0 or the errno. EBUSY is retried for a second: right after a mount, a path
    walk still in flight (the daemon's readiness check of its libfuse loop, say) holds the mount
    for a moment; a process that really uses it (an open file, a cwd) still gets EBUSY."""
    for _ in range(20):
        if _libc.umount2(os.fsencode(mountpoint), flags) == 0:
            return 0
        code = ctypes.get_errno()
        if code != errno.EBUSY:
            return code
        time.sleep(0.05)
    return errno.EBUSY


def _pidfd(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


# -- command line of the daemon and of mount(8) ------------------------------------------------


def _helper_main(argv: list[str]) -> int:
    """mount(8) helper: SOURCE MOUNTPOINT [-o opts] (other mount(8) flags are accepted)."""
    args, opts = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o" and i + 1 < len(argv):
            opts.extend(argv[i + 1].split(","))
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts.extend(a[2:].split(","))
        elif a in ("-n", "-s", "-f", "-v"):
            pass
        elif a == "-N":
            i += 1
        else:
            args.append(a)
        i += 1
    if len(args) != 2:
        print("usage: mount.fuse.cowfs SOURCE MOUNTPOINT -o lowerdir=A:B[,upperdir=U,workdir=W]",
              file=sys.stderr)  # fmt: skip
        return 1
    source, mountpoint = args
    values: dict[str, str] = {}
    flags: set[str] = set()
    for opt in filter(None, opts):
        key, sep, value = opt.partition("=")
        if sep:
            values[key] = value
        elif opt not in _GENERIC_OPTIONS:
            flags.add(opt)
    unknown = (set(values) - {"lowerdir", "upperdir", "workdir"}) | (flags - {"ro", "volatile"})
    try:
        if unknown:
            raise InvalidInput(f"unsupported option(s): {', '.join(sorted(unknown))}")
        if "lowerdir" not in values:
            raise InvalidInput("lowerdir= is required")
        lowers = [d for d in values["lowerdir"].split(":") if d]
        mount_dirs(lowers, mountpoint, values.get("upperdir"), values.get("workdir"),
                   read_only="ro" in flags, volatile="volatile" in flags,
                   fsname=source)  # fmt: skip
    except CowfsError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--daemon"]:
        return _daemon_main(fastjson.loads(argv[1]))
    return _helper_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
