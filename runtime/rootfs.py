"""The container's root: the mounts made inside its mount namespace, then pivot_root onto it.

Ordering is data: `plan()` returns the list of steps (pure, unit-tested), `apply()` performs them
through a Syscalls object, `pivot()` swaps the root. Every target is resolved inside the rootfs
with `secure_join`, so a symlink in the image (say /proc -> /) cannot aim a mount at the host.
"""

from __future__ import annotations

import errno
import os

from cowfs.record import record
from runtime import syscalls as sc
from runtime.devices import DEVICES, LINKS
from runtime.spec import ContainerSpec
from runtime.syscalls import Syscalls

# /proc files hidden behind /dev/null and directories hidden behind an empty read-only tmpfs:
# they leak host kernel state or let root poke the kernel.
MASKED_FILES = ("kcore", "keys", "timer_list", "sched_debug")
MASKED_DIRS = ("acpi", "scsi")
# /proc entries that stay visible but read-only: writes there reconfigure the host kernel.
READONLY_PROC = ("sys", "sysrq-trigger", "irq", "bus")
# files generated per container and bind-mounted over the image's copies (not part of a commit)
ETC_FILES = ("hostname", "hosts", "resolv.conf")

_PROC_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
# The container keeps CAP_MKNOD, as in docker, and an image may ship device nodes; docker's
# device cgroup refuses to open them. cowfs has none: every mount the container can make a
# node on is nodev instead, but for the safe devices of /dev, each bound onto itself.
_NODEV_WHY = "nodev: a device node made by the container or shipped in its image opens nothing"


@record(frozen=True)
class Step:
    """One thing done to the rootfs. `op` is a Syscalls method name; `args` its arguments."""

    op: str
    args: tuple
    why: str = ""
    optional: bool = False  # skip when the target does not exist on this kernel


def secure_join(root: str, path: str) -> str:
    """`root`/`path` with every symlink on the way resolved as if `root` were `/`.

    Like filepath-securejoin: `..` and absolute link targets never leave root. Missing
    components are taken literally (they will be created inside root).
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            target = os.readlink(candidate)
        except OSError:
            resolved.append(part)
            continue
        hops += 1
        if hops > 40:
            raise OSError(errno.ELOOP, "too many symlinks", path)
        if target.startswith("/"):
            resolved = []
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return os.path.join(root, *resolved)


def _bind_ro(path: str, why: str, extra: int = 0, optional: bool = False) -> list[Step]:
    # A bind mount is made read-only by a second, remounting call; one call cannot do both.
    return [
        Step("mount", (path, path, None, sc.MS_BIND | sc.MS_REC, None), why, optional),
        Step(
            "mount",
            (None, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | extra, None),
            why,
            optional,
        ),
    ]


def plan(rootfs: str, spec: ContainerSpec, etc_dir: str) -> list[Step]:
    """Every step from a fresh mount namespace to a rootfs ready for pivot_root."""
    j = lambda p: secure_join(rootfs, p)  # noqa: E731
    dev = j("/dev")
    steps = [
        Step("mount", (None, "/", None, sc.MS_SLAVE | sc.MS_REC, None),
             "host unmounts still reach us, but nothing we mount propagates back to the host"),
        Step("mount", (rootfs, rootfs, None, sc.MS_BIND | sc.MS_REC, None),
             "pivot_root needs the new root to be a mount of its own, in this namespace"),
        Step("mount", (None, rootfs, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_NODEV, None),
             _NODEV_WHY),
        Step("makedirs", (j("/proc"),)),
        Step("mount", ("proc", j("/proc"), "proc", _PROC_FLAGS, None),
             "a proc of the new pid namespace: only the container's processes"),
        Step("makedirs", (j("/sys"),)),
        Step("mount", ("sysfs", j("/sys"), "sysfs", _PROC_FLAGS | sc.MS_RDONLY, None),
             "read-only: writable sysfs reconfigures host devices"),
        Step("makedirs", (dev,)),
        Step("mount", ("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_STRICTATIME,
                       "mode=755,size=65536k"),
             "a private /dev holding only the safe devices, never the host's"),
    ]
    for d in DEVICES:
        node = f"{dev}/{d.name}"
        steps += [
            Step("mknod", (node, d.st_mode, d.rdev)),
            Step("mount", (node, node, None, sc.MS_BIND, None),
                 "a mount of its own, which stays openable when /dev turns nodev below"),
        ]
    steps.append(Step("mount", (None, dev, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_NOSUID
                                | sc.MS_NODEV | sc.MS_STRICTATIME, None), _NODEV_WHY))
    steps += [
        Step("makedirs", (f"{dev}/pts",)),
        Step("mount", ("devpts", f"{dev}/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
                       "newinstance,ptmxmode=0666,mode=0620,gid=5"),
             "a private devpts instance: the container cannot reach host terminals"),
        Step("makedirs", (f"{dev}/shm",)),
        Step("mount", ("shm", f"{dev}/shm", "tmpfs", _PROC_FLAGS, "mode=1777,size=65536k")),
        Step("makedirs", (f"{dev}/mqueue",)),
        Step("mount", ("mqueue", f"{dev}/mqueue", "mqueue", _PROC_FLAGS, None),
             "the message queues of the container's own ipc namespace"),
    ]
    steps += [Step("symlink", (target, f"{dev}/{name}")) for name, target in LINKS]
    proc = j("/proc")
    for name in MASKED_FILES:
        steps.append(Step("mount", (f"{dev}/null", f"{proc}/{name}", None, sc.MS_BIND, None),
                          "masked: host kernel state", optional=True))
    for name in MASKED_DIRS:
        steps.append(Step("mount", ("tmpfs", f"{proc}/{name}", "tmpfs", sc.MS_RDONLY, None),
                          "masked: host hardware", optional=True))
    for name in READONLY_PROC:
        steps += _bind_ro(f"{proc}/{name}", "read-only: writes here reconfigure the host kernel",
                          _PROC_FLAGS, optional=True)
    for name in ETC_FILES:
        target = j(f"/etc/{name}")
        steps += [
            Step("makedirs", (os.path.dirname(target),)),
            Step("touch", (target,)),
            Step("mount", (f"{etc_dir}/{name}", target, None, sc.MS_BIND, None),
                 "generated per container and kept out of its upper layer (and of commits)"),
        ]
    for vol in spec.volumes:
        target = j(vol.container)
        is_dir = os.path.isdir(vol.host)
        steps.append(Step("makedirs", (target if is_dir else os.path.dirname(target),)))
        if not is_dir:
            steps.append(Step("touch", (target,)))
        steps.append(Step("mount", (vol.host, target, None, sc.MS_BIND | sc.MS_REC, None),
                          "volume"))
        ro = sc.MS_RDONLY if vol.read_only else 0
        steps.append(Step("mount", (None, target, None,
                                    sc.MS_BIND | sc.MS_REMOUNT | sc.MS_NODEV | ro, None),
                          "volume: " + ("read-only; " if ro else "") + _NODEV_WHY))
    if spec.read_only:
        steps.append(Step("mount", (None, rootfs, None,
                                    sc.MS_BIND | sc.MS_REMOUNT | sc.MS_NODEV | sc.MS_RDONLY,
                                    None),
                          "--read-only: last, after every mount point above was created"))
    return steps


def pivot_steps(rootfs: str) -> list[Step]:
    return [
        Step("chdir", (rootfs,)),
        Step("pivot_root", (".", "."),
             "pivot_root, not chroot: chroot is escapable, pivot_root changes the namespace's "
             "root; '.' '.' stacks the old root on the new one so the image needs no put_old dir"),
        Step("umount2", (".", sc.MNT_DETACH),
             "detach the host's tree (lazily: host mounts may be busy); after this no host path "
             "is reachable"),
        Step("chdir", ("/",)),
    ]


def apply(sys: Syscalls, steps: list[Step]) -> None:
    for step in steps:
        try:
            getattr(sys, step.op)(*step.args)
        except FileNotFoundError:
            if not step.optional:
                raise
        except OSError as exc:
            if step.optional and exc.errno == errno.ENOENT:
                continue
            raise


def pivot(sys: Syscalls, rootfs: str) -> None:
    apply(sys, pivot_steps(rootfs))


def etc_files(hostname: str, network: str, host_resolv: str = "/etc/resolv.conf") -> dict:
    """The contents of the generated /etc/hostname, /etc/hosts and /etc/resolv.conf."""
    hosts = (
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{hostname}\n"
    )
    resolv = ""
    try:
        with open(host_resolv) as f:
            lines = f.read().splitlines()
        # With its own net namespace the host's 127.x resolvers are unreachable: drop them.
        resolv = "".join(
            line + "\n" for line in lines
            if network == "host" or not line.strip().startswith("nameserver 127.")
        )
    except OSError:
        pass
    return {"hostname": hostname + "\n", "hosts": hosts, "resolv.conf": resolv}
