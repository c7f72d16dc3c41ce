"""The FUSE kernel protocol (linux/fuse.h, 7.x) as struct formats and constants.

Layouts are copied from include/uapi/linux/fuse.h (7.38 locally, 7.40 for the init reply's
max_stack_depth); everything is little-endian and naturally aligned, so no padding is implied.
Nothing here knows about cowfs: it is the wire format only.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR = 38  # the newest layout this module describes
ROOT_ID = 1

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 17, 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT, BMAP, DESTROY = 31, 32, 33, 34, 35, 36, 37, 38
IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE, READDIRPLUS = 39, 40, 41, 42, 43, 44
RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING, SYNCFS, TMPFILE = (
    45, 46, 47, 48, 49, 50, 51,
)  # fmt: skip

_NOT_OPCODES = ("KERNEL_VERSION", "KERNEL_MINOR", "ROOT_ID")
OPCODE_NAMES = {v: k for k, v in dict(globals()).items()
                if k.isupper() and isinstance(v, int) and k not in _NOT_OPCODES}  # fmt: skip

# init flags (flags | flags2 << 32)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
INIT_EXT = 1 << 30
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# setattr valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0

NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_STORE = 4

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
# fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid
# rdev blksize flags
ATTR_FMT = "QQQQQQIIIIIIIIII"
# fuse_entry_out: nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec attr
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR_FMT)
ATTR_OUT = struct.Struct("<QII" + ATTR_FMT)  # attr_valid attr_valid_nsec dummy attr
DIRENT = struct.Struct("<QQII")  # ino off namelen type
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows if INIT_EXT)
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # see fuse_setattr_in
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags backing_id
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")  # size padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")  # size padding
SETXATTR_IN = struct.Struct("<II")  # size flags (the compat layout: no FUSE_SETXATTR_EXT)
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags
NOTIFY_STORE_OUT = struct.Struct("<QQII")  # nodeid offset size padding
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding
# _IOW(229, 1, struct fuse_backing_map): FUSE_DEV_IOC_BACKING_OPEN
DEV_IOC_BACKING_OPEN = (1 << 30) | (BACKING_MAP.size << 16) | (229 << 8) | 1
DEV_IOC_BACKING_CLOSE = (1 << 30) | (4 << 16) | (229 << 8) | 2  # _IOW(229, 2, uint32_t)
