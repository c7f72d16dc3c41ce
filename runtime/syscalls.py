"""Every kernel call the runtime makes, behind one small interface.

`Syscalls` is the real thing (ctypes on libc: Python 3.11 has no os.unshare, os.setns or
os.mount). `RecordingSyscalls` is its test double: it records each call as data and can inject an
OSError into any of them, so the order of namespace, mount and pivot steps and the error paths are
unit-tested without root. Code in runtime/ receives a Syscalls object and never calls libc itself.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os

from cowfs.record import field, record

TYPE_CHECKING = False  # annotations only (docs/ARCHITECTURE.md, "The start path")
if TYPE_CHECKING:
    from collections.abc import Callable

# clone(2) / unshare(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUSER = 0x10000000

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_STRICTATIME = 0x1000000

# umount2(2) flags
MNT_DETACH = 0x2

# prctl(2) options
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _bytes(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


class Syscalls:
    """The real kernel interface. Methods raise OSError (with errno and the path) on failure."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mount.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
        ]
        self._libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._libc.pivot_root.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        self._libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        self._libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

    def _check(self, rc: int, what: str, path: str | None = None) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}", path)

    def unshare(self, flags: int) -> None:
        self._check(self._libc.unshare(flags), "unshare")

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self._libc.setns(fd, nstype), "setns")

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int = 0,
        data: str | None = None,
    ) -> None:
        rc = self._libc.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data))
        self._check(rc, f"mount {fstype or source or ''}", target)

    def umount2(self, target: str, flags: int = 0) -> None:
        self._check(self._libc.umount2(_bytes(target), flags), "umount2", target)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        rc = self._libc.pivot_root(_bytes(new_root), _bytes(put_old))
        self._check(rc, "pivot_root", new_root)

    def sethostname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._libc.sethostname(raw, len(raw)), "sethostname")

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0) -> None:
        self._check(self._libc.prctl(option, arg2, arg3, 0, 0), f"prctl({option})")

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        for i in range(2):
            data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
            data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
            data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
        self._check(self._libc.capset(ctypes.byref(header), data), "capset")

    def capget(self) -> tuple[int, int, int]:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        self._check(self._libc.capget(ctypes.byref(header), data), "capget")
        eff = data[0].effective | (data[1].effective << 32)
        prm = data[0].permitted | (data[1].permitted << 32)
        inh = data[0].inheritable | (data[1].inheritable << 32)
        return eff, prm, inh

    # Filesystem steps of the rootfs plan go through here too, so the double sees them in order.
    def makedirs(self, path: str, mode: int = 0o755) -> None:
        os.makedirs(path, mode=mode, exist_ok=True)

    def touch(self, path: str) -> None:
        if not os.path.lexists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))

    def mknod(self, path: str, mode: int, device: int) -> None:
        os.mknod(path, mode, device)
        os.chmod(path, mode & 0o7777)  # the umask must not narrow device permissions

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, path)

    def chdir(self, path: str) -> None:
        os.chdir(path)


@record
class RecordingSyscalls:
    """Test double: records every call as (name, args...) and fails where told to.

    `fail_on` maps a call name to a predicate on the call's args; when it matches, the call
    raises OSError(`errno`) instead of being recorded as done.
    """

    fail_on: dict[str, Callable[..., bool]] = field(default_factory=dict)
    errno: int = _errno.EPERM
    calls: list[tuple] = field(default_factory=list)
    caps: tuple[int, int, int] = ((1 << 41) - 1, (1 << 41) - 1, 0)

    def _do(self, name: str, *args: object) -> None:
        check = self.fail_on.get(name)
        if check is not None and check(*args):
            raise OSError(self.errno, f"{name}: injected failure", None)
        self.calls.append((name, *args))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def unshare(self, flags: int) -> None:
        self._do("unshare", flags)

    def setns(self, fd: int, nstype: int) -> None:
        self._do("setns", fd, nstype)

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int = 0,
        data: str | None = None,
    ) -> None:
        self._do("mount", source, target, fstype, flags, data)

    def umount2(self, target: str, flags: int = 0) -> None:
        self._do("umount2", target, flags)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        self._do("pivot_root", new_root, put_old)

    def sethostname(self, name: str) -> None:
        self._do("sethostname", name)

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0) -> None:
        self._do("prctl", option, arg2, arg3)

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        self._do("capset", effective, permitted, inheritable)
        self.caps = (effective, permitted, inheritable)

    def capget(self) -> tuple[int, int, int]:
        return self.caps

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        self._do("makedirs", path)

    def touch(self, path: str) -> None:
        self._do("touch", path)

    def mknod(self, path: str, mode: int, device: int) -> None:
        self._do("mknod", path, mode, device)

    def symlink(self, target: str, path: str) -> None:
        self._do("symlink", target, path)

    def chdir(self, path: str) -> None:
        self._do("chdir", path)
