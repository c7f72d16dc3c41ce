"""The FUSE adapter over `cowfs.unionfs.UnionFS`: serve() and its two engines.

serve() runs the engine named by $COWFS_FUSE_ENGINE (`engine()`): "native" (cowfs.fuseengine,
the kernel protocol spoken on /dev/fuse) or "libfuse" (cowfs.fuselib: mfusepy on libfuse3). Both
serve the same UnionFS with the same kernel caching; the tests of unionfs semantics run on both.

Why a native engine (DESIGN decision 1 chose mfusepy; this measurement is for amending it).
Per request the two cost about the same daemon CPU: 20k getxattr 0.40 s native vs 0.36 s
libfuse, 5k open+read+close of small lower files 1.14 vs 1.03 s (medians of 3 interleaved
rounds, load 3.5). The loop is a few microseconds of Python either way; the kernel round trip
and unionfs dominate. The native engine wins where libfuse 3.14's high-level API cannot follow
the kernel:
- directory listings: readdirplus entries packed with struct instead of one ctypes filler call
  and one struct stat each, and cached by the kernel (FOPEN_CACHE_DIR, which libfuse 3.14's
  high-level opendir drops) without OPENDIR/RELEASEDIR: a warm `find` of /usr in the bench
  image (4482 directories) sends 41 requests to the native daemon, 14030 before OPENDIR was
  answered ENOSYS (strace -c of the daemon's readv);
- 1 MiB requests (max_pages 256, readahead raised to 1 MiB by fusedev.raise_readahead, which
  the libfuse engine does too: seq 512 MiB 0.79 -> 0.68 s wall, 6 rounds, load 3.5);
- negative entries, FLUSH never sent, cached symlinks: what libfuse's path API gives, kept.

`python scripts/fuse_engines_ab.py --rounds 2 --only find,seq,readall,churn` (the bench image,
a fresh mount per system and round, host caches warm; load 2.7-5; daemon CPU s / wall s):

    workload                  native        libfuse       fuse-overlayfs
    find -printf, cold        1.92 / 4.22   2.67 / 6.55   2.21 / 4.92
    find -printf, warm        0.33 / 1.14   1.50 / 3.80   0.13 / 0.49
    seq read 512 MiB          1.28 / 2.50   1.54 / 3.33   1.00 / 1.72
    read every file, cold    11.70 / 25.0  12.44 / 26.7   4.77 / 17.5
    read every file, warm     6.34 / 14.8   6.25 / 14.7   2.08 / 6.11
    create 10k x 1 KiB        8.15 / 13.4   8.18 / 13.6   5.23 / 6.75
    unlink 10k                2.43 / 9.79   2.18 / 7.38   7.05 / 9.92

(find warm was measured with OPENDIR still answered; it now costs next to no daemon time.)
File reads and churn are unionfs and store work (object open and verify, copy-up, the upper's
syscalls), the same under both engines. The libfuse engine stays for comparison (`cowfs bench
--system cowfs-native --system cowfs-libfuse`) and for its `threads=` loop.
"""

from __future__ import annotations

import errno
import os

from cowfs.errors import CowfsError

TYPE_CHECKING = False  # annotations only (docs/ARCHITECTURE.md, "The start path")
if TYPE_CHECKING:
    from collections.abc import Callable

    from cowfs.unionfs import UnionFS

CACHE_TIMEOUT = 86400.0  # seconds, for entries, attributes and negative entries: decision 2
ENGINES = ("libfuse", "native")
DEFAULT_ENGINE = "native"  # why: this docstring


def engine(threads: bool = False) -> str:
    """The FUSE engine serve() uses: $COWFS_FUSE_ENGINE, else libfuse for a threaded loop (the
    native loop is single-threaded), else DEFAULT_ENGINE."""
    name = os.environ.get("COWFS_FUSE_ENGINE") or ("libfuse" if threads else DEFAULT_ENGINE)
    if name not in ENGINES:
        raise CowfsError(f"COWFS_FUSE_ENGINE={name}: not one of {', '.join(ENGINES)}",
                         errno=errno.EINVAL)  # fmt: skip
    return name


def preload(threads: bool = False) -> None:
    """Import what serve() will use (the engine, the union filesystem, lower layers), ahead of
    the mount: a daemon forked early does it while its caller sets up (runtime/mounter.py)."""
    if engine(threads) == "native":
        import cowfs.fuseengine  # noqa: F401
    else:
        import cowfs.fuselib  # noqa: F401
    import cowfs.lowers  # noqa: F401
    import cowfs.unionfs  # noqa: F401


def serve(
    fs: UnionFS,
    mountpoint: str,
    *,
    fsname: str = "cowfs",
    read_only: bool = False,
    threads: bool = False,
    writeback: bool = False,
    allow_other: bool | None = None,
    debug: bool = False,
    on_ready: Callable[[dict[str, bool]], None] | None = None,
) -> None:
    """Mount `fs` at `mountpoint` and serve it until unmounted (runs in the calling process).

    The engine is `engine(threads)`; `threads` applies to libfuse only. Each engine is
    imported here, when chosen: mfusepy alone costs ~15 ms of a daemon's start. `on_ready` is
    called once the mount is live, with what the kernel granted at INIT ("passthrough",
    "writeback": bools).
    """
    if engine(threads) == "native":
        from cowfs import fuseengine

        fuseengine.serve(fs, mountpoint, fsname=fsname, read_only=read_only,
                         writeback=writeback, allow_other=allow_other, debug=debug,
                         on_ready=on_ready)  # fmt: skip
        return
    from cowfs import fuselib

    fuselib.serve(fs, mountpoint, fsname=fsname, read_only=read_only, threads=threads,
                  writeback=writeback, allow_other=allow_other, debug=debug,
                  on_ready=on_ready)  # fmt: skip


def log_failure(what: object) -> None:
    """Log the exception being handled, with its traceback, to the daemon's log (its stderr).

    logging is imported at the first failure, not at start: it is ~7 ms of every mount's
    start-up, on the path of every container start."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cowfs.fuse").exception("FUSE %s failed", what)
