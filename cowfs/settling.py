"""Copy-ups made durable after their rename, not before it.

A copy-up is atomic (DESIGN decision 5): the copy is built in the work dir and renamed over its
place in the upper. For a host crash to leave either the lower file or the whole copy there, and
never a copy whose blocks were not written yet (holes where the lower had bytes), the copy's
data has to be on the disk before its rename is. Kernel overlayfs fdatasyncs the copy before the
rename; for a 256 MiB file that is as long again as the copy itself.

cowfs marks the copy instead, and syncs it later:

1. Before the rename, the copy gets the xattr `trusted.cowfs.pending` (the digest of the object
   it was copied from) and the work dir the entry `pending.<boot id>`. Both are metadata: a
   journaling filesystem (ext4, xfs, btrfs) puts them on the disk no later than the rename
   after them, so a rename that survives a crash has its mark beside it.
2. After the rename, the Settler's thread fdatasyncs the copy and then removes its mark, in
   that order: a mark gone from the disk means the data is there.
3. An fsync of the file settles it first (the mark removed before the fsync, which commits the
   removal), so a file's fsync is worth what it is worth on the host. Unmount settles every
   copy, syncs, and removes the work dir's entry.
4. A mount that finds `pending.<boot id>` in its work dir follows a mount that did not end
   cleanly (UnionFS._recover). If the boot id is this boot's, only the daemon died: the page
   cache had every byte, and the marks are settled. If the host went down, each marked file's
   holes are filled from its object where the object has bytes (`ObjectReader.restore_holes`):
   a copy's block that never reached the disk reads back as a hole; what the user wrote after
   the copy and what the copy did write are data, and stay.

Step 1 needs a filesystem that keeps its metadata in order (`keeps_metadata_in_order`). On one
that does not (ext4 without a journal, ext2, vfat, a network or FUSE filesystem), a copy's mark
could reach the disk after its rename, so there copies are synced before their rename, as
overlayfs does.

What a crash can lose is what it may lose anywhere: writes that were never fsynced (a hole the
user punched into a copy within that second is filled again). What it cannot do any more is
hide a lower file behind a copy of holes.
"""

from __future__ import annotations

import _thread
import os

from cowfs.errors import InvalidInput
from cowfs.hostdir import start_writeback

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

PENDING_XATTR = "trusted.cowfs.pending"
MARK_PREFIX = "pending."
# At most this many copies wait for their sync (each holds an fd); more are settled at once.
MAX_WAITING = 256


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


# Filesystems whose metadata reaches the disk in the order it was made (a journal, or copy on
# write), and those whose content does not outlive the host anyway.
_ORDERED = {"xfs", "btrfs", "tmpfs", "ramfs"}


def keeps_metadata_in_order(fd: int) -> bool:
    """Whether the filesystem of `fd` puts a metadata change on the disk no later than the
    ones made after it, so that a mark set before a rename survives whenever the rename does.

    ext4 does so only with its journal: without one (as on some VM images) metadata blocks
    are written back in any order. Anything not known to keep the order is taken not to."""
    dev = os.fstat(fd).st_dev
    where = f"{os.major(dev)}:{os.minor(dev)}"
    fstype = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == where:
                fstype = fields[fields.index("-") + 1]
                break
    if fstype in ("ext4", "ext3"):  # ext3 is the ext4 driver too
        try:  # the journal's thread, or "<none>"; the dir is named as the kernel names the disk
            name = os.path.basename(os.readlink(f"/sys/dev/block/{where}"))
            with open(f"/sys/fs/ext4/{name}/journal_task") as f:
                return f.read().strip() not in ("", "<none>")
        except OSError:
            return False
    return fstype in _ORDERED


def unsettled(path: str) -> InvalidInput:
    """The error for reading the upper file `path` straight from the disk while it is marked:
    after a host crash it may hold holes that only a writable mount repairs."""
    return InvalidInput(f"/{path}: a copy-up not yet synced to the disk ({PENDING_XATTR}): its "
                        f"mount is settling it, or ended before it could; mount the upper "
                        f"writable once, which settles it, then try again")  # fmt: skip


def cut_short(work: str) -> str | None:
    """The mark in work dir `work` of copies a host crash may have cut short (left by a mount
    before this boot), or None. Such an upper must be mounted once, which repairs them,
    before anything reads it directly (`cowfs commit`)."""
    try:
        names = os.listdir(work)
    except FileNotFoundError:
        return None
    this_boot = MARK_PREFIX + boot_id()
    return next((n for n in names if n.startswith(MARK_PREFIX) and n != this_boot), None)


class Settler:
    """Settles copy-ups in a thread of its own: fdatasync, then the mark removed.

    Copies are known by their host inode number (one inode, whatever its names). `failed` is
    called with (inode, error) for a copy whose sync failed; its mark stays, and the next
    mount after a host crash repairs it. `spawn(function, args)` starts the thread (a test
    passes one that does not, to hold copies marked until they are settled by hand)."""

    def __init__(self, failed: Callable[[int, OSError], None],
                 spawn: Callable[[Callable[[], None], tuple], object] = _thread.start_new_thread,
                 ) -> None:  # fmt: skip
        self._failed = failed
        self._spawn = spawn
        self._mutex = _thread.allocate_lock()
        self._queue: dict[int, int] = {}  # host inode -> fd of the copy, not yet taken
        self._busy: dict[int, _thread.LockType] = {}  # taken by the thread: held until settled
        self._wake = _thread.allocate_lock()
        self._wake.acquire()
        self._running = False
        self._stop = False

    def add(self, ino: int, fd: int) -> None:
        """Settle the copy open as `fd` (taken over: closed when settled)."""
        with self._mutex:
            crowded = len(self._queue) + len(self._busy) >= MAX_WAITING
            if not crowded:
                old = self._queue.pop(ino, None)
                self._queue[ino] = fd
                if not self._running:
                    self._running = True
                    self._spawn(self._run, ())
        if crowded:
            self._settle(ino, fd)
            return
        if old is not None:  # the same inode copied again (cannot happen; never leak the fd)
            os.close(old)
        self._poke()

    @property
    def waiting(self) -> bool:
        return bool(self._queue or self._busy)

    def settle(self, ino: int) -> None:
        """Return once the copy of host inode `ino` is settled (at once if it is not waiting)."""
        with self._mutex:
            fd = self._queue.pop(ino, None)
            busy = self._busy.get(ino)
        if fd is not None:
            self._settle(ino, fd)
        elif busy is not None:
            busy.acquire()  # the thread releases it once that copy is settled
            busy.release()

    def settle_all(self) -> None:
        with self._mutex:
            queued, self._queue = self._queue, {}
            busy = list(self._busy.values())
        self._settle_batch(queued)
        for lock in busy:
            lock.acquire()
            lock.release()

    def close(self) -> None:
        """Settle everything and let the thread end."""
        self.settle_all()
        with self._mutex:
            self._stop = True
        self._poke()

    def _poke(self) -> None:
        try:
            self._wake.release()
        except RuntimeError:  # already awake
            pass

    def _run(self) -> None:
        while True:
            self._wake.acquire()
            with self._mutex:
                if self._stop and not self._queue:
                    self._running = False
                    return
                batch, self._queue = self._queue, {}
                for ino in batch:
                    lock = _thread.allocate_lock()
                    lock.acquire()
                    self._busy[ino] = lock
            try:
                self._settle_batch(batch)
            finally:
                with self._mutex:
                    for ino in batch:
                        self._busy.pop(ino).release()

    def _settle_batch(self, batch: dict[int, int]) -> None:
        # Every copy's writing started first: the fdatasyncs then wait on one stream of writes,
        # and the first one's journal commit covers the others' metadata.
        for fd in batch.values():
            start_writeback(fd, 0, 0)
        for ino, fd in batch.items():
            self._settle(ino, fd)

    def _settle(self, ino: int, fd: int) -> None:
        try:
            os.fdatasync(fd)
            os.removexattr(fd, PENDING_XATTR)
        except OSError as exc:
            self._failed(ino, exc)
        finally:
            os.close(fd)
