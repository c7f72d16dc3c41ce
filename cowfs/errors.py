"""The one exception family of cowfs.

Every error a user can cause or meet derives from CowfsError. Each class carries the errno the FUSE
adapter answers with and the exit code the CLI returns; the message is one line meant for a person.
"""

from __future__ import annotations

import errno as _errno


class CowfsError(Exception):
    """Base of every cowfs error: one line of text, an errno for FUSE, an exit code for the CLI."""

    errno: int = _errno.EIO
    exit_code: int = 1

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class NotFound(CowfsError):
    """A named thing (image, tag, layer, object, container, path) does not exist."""

    errno = _errno.ENOENT
    exit_code = 2


class AlreadyExists(CowfsError):
    errno = _errno.EEXIST
    exit_code = 2


class InvalidInput(CowfsError):
    """Input that cowfs refuses: a malformed archive, manifest, argument or reference."""

    errno = _errno.EINVAL
    exit_code = 2


class UnsafePath(InvalidInput):
    """A path in an image that would escape its root (.., absolute, through a symlink)."""


class DigestMismatch(InvalidInput):
    """Content whose sha256 (or size) is not what the manifest or config says."""


class Corruption(CowfsError):
    """Stored data failed its checksum: never return wrong bytes, report it instead."""

    errno = _errno.EIO
    exit_code = 3


class InUse(CowfsError):
    """Something still references or holds the thing being removed or changed."""

    errno = _errno.EBUSY
    exit_code = 2


class MountError(CowfsError):
    exit_code = 4


class ContainerError(CowfsError):
    exit_code = 125  # docker's exit code for errors of the runtime itself


class RegistryError(CowfsError):
    exit_code = 5


class AuthError(RegistryError):
    errno = _errno.EACCES


class TransferError(RegistryError):
    """A transfer that broke off (connection lost, body cut short, HTTP 5xx): worth a retry."""


class TransferAborted(RegistryError):
    """A transfer broken off on purpose (Ctrl-C, or a sibling transfer failed): never retried."""


class BenchError(CowfsError):
    """The benchmark suite could not build its data, or an operation failed on one system."""
