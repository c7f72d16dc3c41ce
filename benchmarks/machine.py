"""What the benchmark ran on: CPU, cores, memory, kernel, the filesystem under the data, tools."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from cowfs.settling import keeps_metadata_in_order


def _first_line(cmd: list[str], containing: str = "") -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = [ln for ln in (out.stdout or out.stderr).strip().splitlines() if containing in ln]
    return lines[0] if lines else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def filesystem_of(path: Path) -> dict[str, object]:
    """The mount holding `path`: the longest mountpoint prefix in /proc/self/mounts, and
    whether that filesystem keeps its metadata in order (ext4 only with its journal)."""
    real = os.path.realpath(path)
    best: dict[str, object] = {"mountpoint": "/", "fstype": "unknown", "device": "unknown",
                               "options": ""}  # fmt: skip
    best_len = -1
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype, opts = line.split()[:4]
            mnt = mnt.replace("\\040", " ")
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) > best_len:
                best_len = len(mnt)
                best = {"mountpoint": mnt, "fstype": fstype, "device": dev, "options": opts}
    fd = os.open(real if os.path.exists(real) else best["mountpoint"], os.O_RDONLY)
    try:
        best["metadata_in_order"] = keeps_metadata_in_order(fd)
    finally:
        os.close(fd)
    return best


def describe(data_dir: Path, work_dir: Path) -> dict[str, object]:
    """`work_dir`: where the samples' upper and scratch dirs are made."""
    uname = os.uname()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "ram_bytes": _ram_bytes(),
        "kernel": f"{uname.sysname} {uname.release} {uname.machine}",
        "os": _os_name(),
        "python": platform.python_version(),
        "data_filesystem": filesystem_of(data_dir),
        "work_filesystem": filesystem_of(work_dir),
        "tools": {
            "fuse-overlayfs": _first_line(["fuse-overlayfs", "--version"], "fuse-overlayfs"),
            "libfuse (fusermount3)": _first_line(["fusermount3", "--version"]),
            "runc": _first_line(["runc", "--version"]),
            "fio": _first_line(["fio", "--version"]),
        },
    }


def unordered_warning(fs: dict) -> str:
    """What is off about measuring with the uppers on `fs` (machine.filesystem_of), or ''."""
    if fs.get("metadata_in_order", True):
        return ""
    return (
        f"the uppers are on {fs['fstype']} ({fs['device']}), which does not keep its metadata "
        "in order (ext4 without a journal?): there cowfs syncs each copy-up before its rename, "
        "and ext4 without a journal scans the inodes freed in the last minutes on every create, "
        "so the create rows measure what ran before them. scripts/bench-disk.sh makes a "
        "journaled ext4 to run on."
    )
