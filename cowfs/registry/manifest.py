"""Manifests, image indexes and descriptors of the OCI distribution API (and Docker schema 2).

Parsing checks what the rest of a pull relies on: digests are sha256, sizes are non-negative
integers, layer media types are ones cowfs can import. Building gives canonical bytes (the digest
of a manifest is the sha256 of exactly the bytes pushed).

This module is pure.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from cowfs.errors import DigestMismatch, InvalidInput, RegistryError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

# Layer media types cowfs imports, mapped to the compression the importer expects.
LAYER_COMPRESSION = {
    OCI_LAYER: None,
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    DOCKER_LAYER_GZIP: "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": None,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
# Foreign (Windows base) layers live outside the registry: cowfs does not fetch them.
_FOREIGN = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
)

MAX_MANIFEST_SIZE = 4 << 20  # containerd's limit: a bigger "manifest" is not one
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def short(digest: str) -> str:
    return digest[:19]


@dataclass(frozen=True, slots=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInput(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


def _descriptor(obj: object, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise RegistryError(f"malformed manifest: {what} is not an object")
    digest, size, media = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise RegistryError(f"malformed manifest: {what} has digest {digest!r} (sha256 expected)")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"malformed manifest: {what} has size {size!r}")
    if not isinstance(media, str):
        raise RegistryError(f"malformed manifest: {what} has media type {media!r}")
    platform = None
    p = obj.get("platform")
    if isinstance(p, dict):
        platform = Platform(str(p.get("os", "")), str(p.get("architecture", "")), p.get("variant"))
    annotations = obj.get("annotations") if isinstance(obj.get("annotations"), dict) else {}
    return Descriptor(media, digest, size, platform, annotations)


def parse(body: bytes, content_type: str | None) -> Manifest | Index:
    """Parse a manifest or an index; the media type comes from the header, else the body."""
    try:
        data = json.loads(body)
    except ValueError:
        raise RegistryError("malformed manifest: not JSON") from None
    if not isinstance(data, dict):
        raise RegistryError("malformed manifest: not a JSON object")
    media = (content_type or "").split(";")[0].strip()
    if media in ("", "application/json", "text/plain", "application/octet-stream"):
        media = data.get("mediaType") or ""
    if not media:
        # OCI lets mediaType be absent: the shape tells which it is.
        media = OCI_INDEX if "manifests" in data else OCI_MANIFEST
    if media in DOCKER_SCHEMA1 or data.get("schemaVersion") == 1:
        raise RegistryError("Docker schema 1 manifests are not supported (deprecated in 2017)")
    if media in INDEX_TYPES:
        items = data.get("manifests")
        if not isinstance(items, list):
            raise RegistryError("malformed index: 'manifests' is not a list")
        return Index(media, tuple(_descriptor(m, f"manifests[{i}]") for i, m in enumerate(items)))
    if media in MANIFEST_TYPES:
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise RegistryError("malformed manifest: 'layers' is not a list")
        config = _descriptor(data.get("config"), "config")
        descs = tuple(_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers))
        for d in descs:
            if d.media_type in _FOREIGN:
                raise RegistryError(
                    f"layer {short(d.digest)} is a non-distributable layer ({d.media_type})"
                )
            if d.media_type not in LAYER_COMPRESSION:
                raise RegistryError(f"layer {short(d.digest)} has unsupported type {d.media_type}")
        return Manifest(media, config, descs)
    raise RegistryError(f"unsupported manifest media type {media!r}")


def verify(body: bytes, expected: str | None, header_digest: str | None) -> str:
    """The manifest digest, checked against what was asked for and what the registry said."""
    digest = sha256_digest(body)
    if expected and expected != digest:
        raise DigestMismatch(f"manifest {short(expected)} has digest {short(digest)}")
    if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
        raise DigestMismatch(
            f"manifest digest {short(digest)} differs from the registry's {short(header_digest)}"
        )
    return digest


def select_platform(index: Index, want: Platform) -> Descriptor:
    """The manifest for `want` in an index; a missing variant matches any (v8 preferred)."""
    candidates = [
        d
        for d in index.manifests
        if d.media_type in MANIFEST_TYPES + INDEX_TYPES or not d.media_type
        if d.platform and d.platform.os == want.os and d.platform.architecture == want.architecture
    ]
    if want.variant:
        candidates = [d for d in candidates if d.platform and d.platform.variant == want.variant]
    if not candidates:
        have = sorted({str(d.platform) for d in index.manifests if d.platform}) or ["none"]
        raise RegistryError(f"no image for platform {want} (index has: {', '.join(have)})")
    # First match wins, as in containerd; attestation manifests say unknown/unknown and drop out.
    return candidates[0]


def build_manifest(config: Descriptor, layers: list[Descriptor], media_type: str) -> bytes:
    """Canonical manifest bytes (sorted keys, no spaces): what is pushed is what is hashed."""
    data = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
