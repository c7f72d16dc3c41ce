"""Image references: `[registry/]repository[:tag][@digest]`, with Docker's defaults.

A name whose first component has no '.' or ':' and is not 'localhost' lives on Docker Hub
(docker.io), and a one-component Hub name is an official image under `library/`. Without tag or
digest the tag is `latest`. When both are given the digest wins, as in docker. The familiar form
(`busybox:latest`, `localhost:5000/app:v1`) is what a pulled image is tagged as in the store.

This module is pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cowfs.errors import InvalidInput

DOCKER_HUB = "docker.io"
# docker.io is a name, not a host: the v2 API of Docker Hub answers here.
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?\Z"
)


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str  # as written, normalised: "docker.io", "localhost:5000", "ghcr.io"
    repository: str  # "library/busybox", "app", "org/team/app"
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """host[:port] that serves the v2 API."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        """The host without port or IPv6 brackets."""
        host = self.registry
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def is_local(self) -> bool:
        """A registry on this machine: plain HTTP is allowed for it as docker does."""
        host = self.hostname
        return host == "localhost" or host.startswith("127.") or host == "::1"

    @property
    def reference(self) -> str:
        """What goes into /v2/<repo>/manifests/<reference>: the digest, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def familiar_name(self) -> str:
        """The repository as docker shows it: 'busybox', 'user/app', 'localhost:5000/app'."""
        if self.registry == DOCKER_HUB:
            return self.repository.removeprefix("library/")
        return f"{self.registry}/{self.repository}"

    @property
    def local_tag(self) -> str | None:
        """The store tag a pulled image gets ('name:tag'), None for a pull by digest only."""
        if self.tag is None:
            return None if self.digest else f"{self.familiar_name}:{DEFAULT_TAG}"
        return f"{self.familiar_name}:{self.tag}"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse(text: str) -> Reference:
    """Parse an image reference; InvalidInput names what is wrong with it."""
    if not text or text != text.strip():
        raise InvalidInput(f"invalid image reference {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidInput(f"invalid image reference {text!r}: bad digest {digest!r}")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidInput(f"invalid image reference {text!r}: bad tag {tag!r}")
    parts = rest.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, parts[1:]
        if not _DOMAIN.match(registry):
            raise InvalidInput(f"invalid image reference {text!r}: bad registry {registry!r}")
        if registry == "index.docker.io":
            registry = DOCKER_HUB
    else:
        registry, path = DOCKER_HUB, parts
    for comp in path:
        if not _COMPONENT.match(comp):
            raise InvalidInput(
                f"invalid image reference {text!r}: repository names are lowercase "
                "letters, digits and separators (. _ __ -)"
            )
    if registry == DOCKER_HUB and len(path) == 1:
        path = ["library", *path]
    repository = "/".join(path)
    if len(repository) > 255:
        raise InvalidInput(f"invalid image reference {text!r}: repository name too long")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)
