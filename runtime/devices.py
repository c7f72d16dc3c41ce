"""The device nodes and links of a container's private /dev (docker's default set)."""

from __future__ import annotations

import os
import stat

from cowfs.record import record


@record(frozen=True)
class Device:
    name: str
    major: int
    minor: int
    mode: int = 0o666

    @property
    def st_mode(self) -> int:
        return stat.S_IFCHR | self.mode

    @property
    def rdev(self) -> int:
        return os.makedev(self.major, self.minor)


DEVICES: tuple[Device, ...] = (
    Device("null", 1, 3),
    Device("zero", 1, 5),
    Device("full", 1, 7),
    Device("random", 1, 8),
    Device("urandom", 1, 9),
    Device("tty", 5, 0),
)

# name -> target, created in /dev
LINKS: tuple[tuple[str, str], ...] = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
    ("ptmx", "pts/ptmx"),  # the private devpts instance's multiplexer, not the host's
)
