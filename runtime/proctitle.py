"""Rename a forked process in ps (its /proc/PID/cmdline), as setproctitle does.

The runtime's forked processes would otherwise show the whole `cowfs run ...` command line:
inside the container as PID 1 that would even leak host paths. The kernel reads cmdline from
the process's original argv area, which we overwrite through /proc/self/mem (always allowed
for a process's own memory).
"""

from __future__ import annotations


def set_title(title: str) -> None:
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        # fields 48 and 49 of stat (arg_start, arg_end); `fields` starts at field 3
        start, end = int(fields[45]), int(fields[46])
        size = end - start
        if size <= 1:
            return
        data = title.encode()[: size - 1]
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(data + b"\0" * (size - len(data)))
    except (OSError, ValueError, IndexError):
        pass  # a title is cosmetic
