"""Crash-safe file replacement: stage next to the target, fsync, rename, fsync the directory."""

from __future__ import annotations

import os

from cowfs import fastjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content."""
    parent, name = os.path.split(os.fspath(path))
    tmp = os.path.join(parent, f".{name}.tmp.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(parent or ".")


def write_json_atomic(path: str | os.PathLike, doc: Any) -> None:
    write_atomic(path, fastjson.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
