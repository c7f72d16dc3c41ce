"""An OCI runtime-spec config.json for a container: the same process, namespaces, mounts and
restrictions `cowfs run` applies, so another runtime (runc) can run it on the cowfs mount."""

from __future__ import annotations

from runtime import capabilities, rootfs
from runtime.spec import ContainerSpec

_DEFAULT_MOUNTS = [
    {"destination": "/proc", "type": "proc", "source": "proc",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs",
     "options": ["nosuid", "noexec", "nodev", "ro"]},
]  # fmt: skip


def _user(spec: ContainerSpec) -> dict:
    # The OCI spec wants numbers; names would need the image's passwd file (resolved at run).
    name, _, group = spec.user.partition(":")
    uid = int(name) if name.isdigit() else 0
    gid = int(group) if group.isdigit() else 0
    return {"uid": uid, "gid": gid}


def oci_config(spec: ContainerSpec, root: str, etc_dir: str, name: str = "cowfs") -> dict:
    """`name` names the runtime's cgroup: relative, so runc puts it below its caller's own."""
    caps = ["CAP_" + c for c in capabilities.DEFAULT]
    mounts = list(_DEFAULT_MOUNTS)
    for name in rootfs.ETC_FILES:
        mounts.append({"destination": f"/etc/{name}", "type": "bind",
                       "source": f"{etc_dir}/{name}", "options": ["rbind"]})  # fmt: skip
    for vol in spec.volumes:
        mounts.append({"destination": vol.container, "type": "bind", "source": vol.host,
                       "options": ["rbind", "ro" if vol.read_only else "rw"]})  # fmt: skip
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if spec.network != "host":
        namespaces.append({"type": "network"})
    resources: dict = {}
    if spec.limits.memory:
        resources["memory"] = {"limit": spec.limits.memory, "swap": spec.limits.memory}
    if spec.limits.pids:
        resources["pids"] = {"limit": spec.limits.pids}
    if spec.limits.cpus:
        resources["cpu"] = {"quota": int(spec.limits.cpus * 100000), "period": 100000}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": spec.tty,
            "user": _user(spec),
            "args": spec.args,
            "env": spec.env,
            "cwd": spec.cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": root, "readonly": spec.read_only},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": f"cowfs-bundle-{name}",
            "resources": resources,
            "maskedPaths": [f"/proc/{n}" for n in rootfs.MASKED_FILES + rootfs.MASKED_DIRS],
            "readonlyPaths": [f"/proc/{n}" for n in rootfs.READONLY_PROC],
        },
    }
