"""Image references and manifests: pure parsing, no network."""

from __future__ import annotations

import json

import pytest

from cowfs.errors import DigestMismatch, InvalidInput, RegistryError
from cowfs.registry import manifest as mf
from cowfs.registry.reference import Reference, parse

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "want", "local_tag"),
    [
        ("busybox", Reference("docker.io", "library/busybox", "latest"), "busybox:latest"),
        ("busybox:1.36", Reference("docker.io", "library/busybox", "1.36"), "busybox:1.36"),
        ("user/app", Reference("docker.io", "user/app", "latest"), "user/app:latest"),
        ("docker.io/library/alpine:3", Reference("docker.io", "library/alpine", "3"), "alpine:3"),
        ("index.docker.io/x/y", Reference("docker.io", "x/y", "latest"), "x/y:latest"),
        ("localhost/app", Reference("localhost", "app", "latest"), "localhost/app:latest"),
        (
            "localhost:5000/a/b/c:v1",
            Reference("localhost:5000", "a/b/c", "v1"),
            "localhost:5000/a/b/c:v1",
        ),
        ("ghcr.io/org/img@" + D, Reference("ghcr.io", "org/img", None, D), None),
        (
            "127.0.0.1:5000/app:v1@" + D,
            Reference("127.0.0.1:5000", "app", "v1", D),
            "127.0.0.1:5000/app:v1",
        ),
        ("[::1]:5000/app", Reference("[::1]:5000", "app", "latest"), "[::1]:5000/app:latest"),
        ("a__b/c-d.e_f", Reference("docker.io", "a__b/c-d.e_f", "latest"), "a__b/c-d.e_f:latest"),
    ],
)
def test_parse(text: str, want: Reference, local_tag: str | None) -> None:
    got = parse(text)
    assert got == want
    assert got.local_tag == local_tag


@pytest.mark.parametrize(
    "text",
    [
        "",
        " busybox",
        "Busybox",
        "a//b",
        "app:",
        "app:-x",
        "app@sha256:abc",
        "app@md5:" + "a" * 32,
        "-app",
        "app-",
        "a...b",
        "host:port/app",
        "x" * 256,
    ],
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid image reference"):
        parse(text)


def test_hosts() -> None:
    assert parse("busybox").api_host == "registry-1.docker.io"
    assert parse("localhost:5000/a").is_local
    assert parse("127.0.0.1:5000/a").is_local
    assert parse("[::1]:5000/a").is_local
    assert not parse("ghcr.io/a").is_local
    assert parse("localhost:5000/a").reference == "latest"
    assert parse("h.io/a:v@" + D).reference == D


# -- manifests ----------------------------------------------------------------------------------


def _desc(media: str = mf.OCI_LAYER_GZIP, size: int = 10, **extra: object) -> dict:
    return {"mediaType": media, "digest": D, "size": size, **extra}


def _manifest(**over: object) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": _desc(mf.OCI_CONFIG),
        "layers": [_desc()],
        **over,
    }
    return json.dumps(doc).encode()


def test_manifest_parse_media_type_from_header_or_body() -> None:
    m = mf.parse(_manifest(), None)
    assert isinstance(m, mf.Manifest) and m.layers[0].size == 10
    m = mf.parse(_manifest(mediaType=None), mf.DOCKER_MANIFEST)
    assert m.media_type == mf.DOCKER_MANIFEST
    idx = mf.parse(json.dumps({"schemaVersion": 2, "manifests": []}).encode(), "application/json")
    assert isinstance(idx, mf.Index)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"[]", "not a JSON object"),
        (b"{", "not JSON"),
        (_manifest(layers=[_desc(size=-1)]), "size -1"),
        (_manifest(layers=[_desc(size="10")]), "size '10'"),
        (_manifest(layers=[{**_desc(), "digest": "sha256:xyz"}]), "sha256 expected"),
        (_manifest(layers="nope"), "'layers' is not a list"),
        (
            _manifest(layers=[_desc("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")]),
            "non-distributable",
        ),
        (_manifest(mediaType="application/x-other"), "unsupported manifest media type"),
    ],
)
def test_manifest_parse_refuses(body: bytes, match: str) -> None:
    with pytest.raises(RegistryError, match=match):
        mf.parse(body, None)


def test_verify_manifest_digest() -> None:
    body = _manifest()
    digest = mf.sha256_digest(body)
    assert mf.verify(body, digest, digest) == digest
    with pytest.raises(DigestMismatch):
        mf.verify(body, D, None)
    with pytest.raises(DigestMismatch):
        mf.verify(body, None, D)


def test_select_platform() -> None:
    def entry(arch: str, variant: str | None = None, os: str = "linux") -> dict:
        p = {"os": os, "architecture": arch, **({"variant": variant} if variant else {})}
        return {
            **_desc(mf.OCI_MANIFEST),
            "digest": mf.sha256_digest((arch + str(variant)).encode()),
            "platform": p,
        }

    index = mf.parse(
        json.dumps(
            {
                "manifests": [
                    entry("unknown", os="unknown"),
                    entry("arm", "v6"),
                    entry("arm", "v7"),
                    entry("amd64"),
                ]
            }
        ).encode(),
        mf.OCI_INDEX,
    )
    assert isinstance(index, mf.Index)
    assert mf.select_platform(index, mf.Platform()).platform == mf.Platform("linux", "amd64")
    assert mf.select_platform(index, mf.Platform.parse("linux/arm/v7")).platform.variant == "v7"
    with pytest.raises(RegistryError, match="linux/amd64, linux/arm/v6, linux/arm/v7"):
        mf.select_platform(index, mf.Platform.parse("linux/riscv64"))
    with pytest.raises(InvalidInput):
        mf.Platform.parse("linux")


def test_build_manifest_is_canonical() -> None:
    config = mf.Descriptor(mf.OCI_CONFIG, D, 3)
    body = mf.build_manifest(config, [mf.Descriptor(mf.OCI_LAYER_ZSTD, D, 5)], mf.OCI_MANIFEST)
    assert b" " not in body
    parsed = mf.parse(body, mf.OCI_MANIFEST)
    assert isinstance(parsed, mf.Manifest)
    assert parsed.layers[0] == mf.Descriptor(mf.OCI_LAYER_ZSTD, D, 5)
