"""Capabilities: cut to docker's default set, and no_new_privs.

The bounding set is narrowed first (needs CAP_SETPCAP, which the default set keeps), then
effective/permitted are set to the default set and inheritable/ambient emptied, so neither the
container's init nor anything it execs can regain a dropped capability.
"""

from __future__ import annotations

from runtime import syscalls as sc
from runtime.syscalls import Syscalls

CAPS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
    "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
    "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
    "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}

# docker's default set (moby oci/caps/defaults.go)
DEFAULT = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)


def mask(names: tuple[str, ...] | list[str]) -> int:
    out = 0
    for name in names:
        out |= 1 << CAPS[name]
    return out


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return max(CAPS.values())


def drop_to(sys: Syscalls, keep: tuple[str, ...] = DEFAULT, last: int | None = None) -> None:
    """Narrow bounding, effective and permitted to `keep`; clear inheritable and ambient."""
    keep_mask = mask(keep)
    top = last_cap() if last is None else last
    for cap in range(top + 1):
        if not keep_mask & (1 << cap):
            sys.prctl(sc.PR_CAPBSET_DROP, cap)
    sys.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    _eff, permitted, _inh = sys.capget()
    # Root here may already lack some (CAP_SYS_RESOURCE): never ask for more than we hold.
    keep_mask &= permitted
    sys.capset(keep_mask, keep_mask, 0)


def no_new_privs(sys: Syscalls) -> None:
    """setuid binaries and file capabilities cannot raise privileges after this."""
    sys.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
