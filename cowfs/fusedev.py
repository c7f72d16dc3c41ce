"""Opening a FUSE connection: /dev/fuse plus mount(2) as root, fusermount3 otherwise.

As root the mount is made directly (libfuse does the same): open /dev/fuse, then mount(2) with
`fd=N,rootmode=40000,user_id=U,group_id=G,...`. Without root, fusermount3 (setuid) mounts and
hands the /dev/fuse fd back over a socket named by _FUSE_COMMFD, as libfuse does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from cowfs.errors import CowfsError

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
READ_AHEAD_KB = 1024  # see raise_readahead
# linux/fuse.h: _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t)
_BACKING_OPEN = 0x4010E501
_BACKING_CLOSE = 0x4004E502

# The process's own libc (not find_library: that runs `ldconfig -p`, tens of ms of a start).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def open_mount(mountpoint: str, *, fsname: str, read_only: bool, allow_other: bool) -> int:
    """Mount a FUSE filesystem of type fuse.cowfs at `mountpoint`; return the /dev/fuse fd."""
    st = os.stat(mountpoint)
    if os.geteuid() == 0:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = [f"fd={fd}", f"rootmode={st.st_mode & 0o170000:o}", f"user_id={os.getuid()}",
                f"group_id={os.getgid()}", "default_permissions"]  # fmt: skip
        if allow_other:
            opts.append("allow_other")
        # dev and suid stay on, as on overlayfs: the mount is a container's root filesystem.
        flags = MS_RDONLY if read_only else 0
        res = _libc.mount(os.fsencode(fsname.replace(",", "_")), os.fsencode(mountpoint),
                          b"fuse.cowfs", flags, ",".join(opts).encode())  # fmt: skip
        if res != 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise CowfsError(f"FUSE mount of {mountpoint} failed: {os.strerror(code)}",
                             errno=code)  # fmt: skip
        return fd
    return _fusermount(mountpoint, fsname, read_only, allow_other)


def _fusermount(mountpoint: str, fsname: str, read_only: bool, allow_other: bool) -> int:
    import socket  # here, not at the top: a mount as root (a container's) needs neither
    import subprocess

    opts = ["ro" if read_only else "rw", f"fsname={fsname.replace(',', '_')}", "subtype=cowfs",
            "default_permissions"]  # fmt: skip
    if allow_other:
        opts.append("allow_other")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        cmd = ["fusermount3", "-o", ",".join(opts), "--", mountpoint]
        res = subprocess.run(cmd, env=env, pass_fds=(theirs.fileno(),), capture_output=True,
                             text=True)  # fmt: skip
        theirs.close()
        if res.returncode:
            raise CowfsError(f"FUSE mount of {mountpoint} failed: {res.stderr.strip()}",
                             errno=errno.EIO)  # fmt: skip
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise CowfsError(f"FUSE mount of {mountpoint} failed: fusermount3 sent no fd",
                             errno=errno.EIO)  # fmt: skip
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        theirs.close()
        ours.close()


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily, as libfuse does when its loop ends on a signal)."""
    if os.geteuid() == 0 and _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
        return
    import subprocess

    subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], capture_output=True)


def raise_readahead(target: str) -> None:
    """Give the mount at `target` (a real path) 1 MiB of readahead; the kernel caps FUSE at
    128 KiB. Sequential reads then reach the daemon as 1 MiB requests, an eighth as many.

    The kernel lowers the readahead to its own cap when it processes INIT's reply, so this
    waits for the mount to be live first: a stat of its root returns only after INIT. Call it
    beside the serving loop, never from it (the loop answers that stat).
    """
    try:
        os.stat(target)
        bdi = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4].replace("\\040", " ") == target:
                    bdi = fields[2]  # major:minor names the bdi; the last line is the top mount
        if bdi is not None:
            with open(f"/sys/class/bdi/{bdi}/read_ahead_kb", "w") as f:
                f.write(str(READ_AHEAD_KB))
    except OSError:
        pass  # not root, or unmounted already: the kernel's default stays


def backing_open(dev: int, fd: int) -> int:
    """Register host file `fd` with the FUSE connection `dev` for passthrough; its id."""
    return fcntl.ioctl(dev, _BACKING_OPEN, bytearray(struct.pack("<iIQ", fd, 0, 0)), True)


def backing_close(dev: int, backing_id: int) -> None:
    fcntl.ioctl(dev, _BACKING_CLOSE, bytearray(struct.pack("<I", backing_id)), True)
