"""Push to Debian's docker-registry; skopeo and umoci read the result back (the oracles)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cowfs.errors import AuthError, InvalidInput, RegistryError
from cowfs.registry import manifest as mf
from cowfs.registry.pull import pull
from cowfs.registry.push import push
from cowfs.rootfs import import_rootfs
from cowfs.store import Store
from tests.conftest import need_root, need_tool
from tests.registry_fixtures import (
    Layer,
    OciImage,
    Registry,
    fake_registry,
    registry_fixture,  # noqa: F401 - the fixture registry
    skopeo_copy,
    skopeo_to_registry,
)

COWFS = [sys.executable, "-c", "from cowfs.cli import main; main()"]


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello from cowfs\n")
    (root / "bin").mkdir()
    tool = root / "bin" / "tool"
    tool.write_bytes(os.urandom(300_000))  # incompressible: several upload chunks
    tool.chmod(0o755)
    os.link(tool, root / "bin" / "tool-alias")
    os.symlink("tool", root / "bin" / "sym")
    (root / "empty").mkdir()
    (root / "ro").write_bytes(b"read-only\n")
    (root / "ro").chmod(0o444)
    return root


def listing(root: Path) -> dict[str, tuple]:
    """path -> (type, mode, content sha256 or symlink target): what must survive a round trip."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                out[rel] = ("f", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def skopeo_inspect(reg: Registry, name: str, raw: bool = False) -> dict:
    args = ["skopeo", "inspect", "--tls-verify=false", *(["--raw"] if raw else [])]
    out = subprocess.run(
        [*args, f"docker://{reg.host}/{name}"], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def unpack_with_umoci(reg: Registry, name: str, tmp: Path, *copy_args: str) -> Path:
    need_root()  # umoci unpack keeps owners only as root
    need_tool("umoci")
    layout = tmp / "back"
    skopeo_copy(
        f"docker://{reg.host}/{name}", f"oci:{layout}:back", "--src-tls-verify=false", *copy_args
    )
    bundle = tmp / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:back", str(bundle)],
        check=True,
        capture_output=True,
    )
    return bundle / "rootfs"


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_push_round_trips_through_skopeo_and_umoci(
    registry: Registry, tmp_path: Path, compression: str
) -> None:
    src = make_tree(tmp_path / "src")
    store = Store(tmp_path / "store")
    import_rootfs(store, src, "src:v1")
    res = push(store, "src:v1", f"{registry.host}/app:v1", compression=compression)
    assert (res.layers, res.uploaded) == (1, 1)

    raw = skopeo_inspect(registry, "app:v1", raw=True)
    info = skopeo_inspect(registry, "app:v1")
    assert info["Digest"] == res.manifest_digest
    if compression == "zstd":
        assert raw["mediaType"] == mf.OCI_MANIFEST
        assert raw["layers"][0]["mediaType"] == mf.OCI_LAYER_ZSTD
        # umoci 0.4.7 reads no zstd: skopeo recompresses on the way back, checking our blob.
        rootfs = unpack_with_umoci(
            registry, "app:v1", tmp_path, "--dest-compress-format=gzip", "--dest-compress"
        )
    else:
        assert raw["mediaType"] == mf.DOCKER_MANIFEST
        assert raw["layers"][0]["mediaType"] == mf.DOCKER_LAYER_GZIP
        rootfs = unpack_with_umoci(registry, "app:v1", tmp_path)
    assert listing(rootfs) == listing(src)
    assert os.stat(rootfs / "bin" / "tool").st_ino == os.stat(rootfs / "bin" / "tool-alias").st_ino


def test_chunked_upload_mount_and_skip(registry: Registry, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    store = Store(tmp_path / "store")
    import_rootfs(store, src, "src:v1")
    first = push(store, "src:v1", f"{registry.host}/a:v1", chunk_size=64 << 10)
    assert (first.uploaded, first.mounted, first.present) == (1, 0, 0)
    # The same layer into another repository of the registry: mounted, not sent.
    other = push(store, "src:v1", f"{registry.host}/team/b:v2")
    assert (other.uploaded, other.mounted, other.present) == (0, 1, 0)
    assert other.manifest_digest == first.manifest_digest
    again = push(store, "src:v1", f"{registry.host}/a:v1")
    assert (again.uploaded, again.mounted, again.present) == (0, 0, 1)
    # What was mounted is really there: a fresh store pulls it and gets the same tree.
    fresh = Store(tmp_path / "fresh")
    pulled = pull(fresh, f"{registry.host}/team/b:v2")
    assert (
        fresh.load_toc(pulled.image_id and fresh.image(pulled.image_id).layers[0]).entries.keys()
        == store.load_toc(store.resolve("src:v1").layers[0]).entries.keys()
    )


def test_pulled_image_pushes_to_another_repo_without_export(
    registry: Registry, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "src")
    store = Store(tmp_path / "store")
    import_rootfs(store, src, "src:v1")
    push(store, "src:v1", f"{registry.host}/origin:v1")
    fresh = Store(tmp_path / "fresh")
    pull(fresh, f"{registry.host}/origin:v1")
    res = push(fresh, f"{registry.host}/origin:v1", f"{registry.host}/copy:v1")
    assert (res.uploaded, res.mounted) == (0, 1)
    assert (
        skopeo_inspect(registry, "copy:v1")["Layers"]
        == skopeo_inspect(registry, "origin:v1")["Layers"]
    )


def test_push_refuses_digest_reference(registry: Registry, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    import_rootfs(store, make_tree(tmp_path / "src"), "src:v1")
    with pytest.raises(InvalidInput, match="give a tag"):
        push(store, "src:v1", f"{registry.host}/a@sha256:" + "0" * 64)


def test_cli_push_and_pull(registry: Registry, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    root = tmp_path / "store"
    import_rootfs(Store(root), src, "src:v1")
    push_cmd = [
        *COWFS,
        "--root",
        str(root),
        "push",
        "src:v1",
        f"{registry.host}/cli:v1",
        "--compression",
        "gzip",
        "--chunk-size",
        "64k",
    ]
    proc = subprocess.run(push_cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.strip()
    assert digest == skopeo_inspect(registry, "cli:v1")["Digest"]
    assert "1 uploaded" in proc.stderr
    fresh = tmp_path / "fresh"
    proc = subprocess.run(
        [*COWFS, "--root", str(fresh), "pull", f"{registry.host}/cli:v1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert Store(fresh).resolve(f"{registry.host}/cli:v1").id == proc.stdout.strip()
    bad = subprocess.run(
        [*COWFS, "--root", str(root), "push", "src:v1", "x", "--chunk-size", "lots"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "not a size" in bad.stderr


def test_failed_upload_leaves_no_staging(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    import_rootfs(store, make_tree(tmp_path / "src"), "src:v1")
    with fake_registry() as fake:
        fake.routes[("POST", "/v2/app/blobs/uploads/")] = (
            403,
            {},
            b'{"errors":[{"code":"DENIED","message":"requested access is denied"}]}',
        )
        with pytest.raises(AuthError, match="access denied.*DENIED"):
            push(store, "src:v1", f"{fake.host}/app:v1")
        fake.routes[("POST", "/v2/app/blobs/uploads/")] = (
            202,
            {"Location": "/v2/app/blobs/uploads/u1"},
            b"",
        )
        fake.routes[("PUT", "/v2/app/blobs/uploads/u1")] = (500, {}, b"disk full")
        with pytest.raises(RegistryError, match="HTTP 500.*disk full"):
            push(store, "src:v1", f"{fake.host}/app:v1")
        assert not [m for m, p, _ in fake.log if "/manifests/" in p]  # no tag for a partial image
    assert list(store.tmp.iterdir()) == []


def test_pushed_image_pulls_back_without_download(registry: Registry, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    import_rootfs(store, make_tree(tmp_path / "src"), "src:v1")
    push(store, "src:v1", f"{registry.host}/app:v1")
    res = pull(store, f"{registry.host}/app:v1")
    assert (res.layers, res.downloaded) == (1, 0)
    assert store.image(res.image_id).layers == store.resolve("src:v1").layers


def test_image_listing_a_layer_twice(registry: Registry, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    import_rootfs(store, make_tree(tmp_path / "src"), "src:v1")
    img = store.resolve("src:v1")
    twice = store.add_image(img.layers * 2, img.config, tags=["twice:v1"])
    res = push(store, twice, f"{registry.host}/twice:v1")
    assert (res.layers, res.uploaded) == (2, 1)
    assert len(skopeo_inspect(registry, "twice:v1")["Layers"]) == 2


def test_chunked_upload_protocol(tmp_path: Path) -> None:
    """PATCH chunks with Content-Range, following each new Location, then PUT ?digest=."""
    from cowfs.registry.client import RegistryClient

    data = os.urandom(250_000)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    got = bytearray()
    ranges = []
    with fake_registry() as fake:

        def patch(h):
            ranges.append((h.path, h.headers["Content-Range"]))
            got.extend(h.body)
            return 202, {"Location": f"/v2/app/blobs/uploads/u{len(ranges) + 1}"}, b""

        fake.routes[("POST", "/v2/app/blobs/uploads/")] = (
            202,
            {"Location": "/v2/app/blobs/uploads/u1"},
            b"",
        )
        for i in range(1, 5):
            fake.routes[("PATCH", f"/v2/app/blobs/uploads/u{i}")] = patch
        fake.routes[("PUT", "/v2/app/blobs/uploads/u5")] = (
            201,
            {"Docker-Content-Digest": digest},
            b"",
        )
        RegistryClient(fake.host, allow_http=True).upload_blob(
            "app", blob, digest, len(data), chunk_size=64 << 10
        )
        put = [p for m, p, _ in fake.log if m == "PUT"]
    assert bytes(got) == data
    assert ranges == [
        ("/v2/app/blobs/uploads/u1", "0-65535"),
        ("/v2/app/blobs/uploads/u2", "65536-131071"),
        ("/v2/app/blobs/uploads/u3", "131072-196607"),
        ("/v2/app/blobs/uploads/u4", "196608-249999"),
    ]
    assert put == [f"/v2/app/blobs/uploads/u5?digest={digest.replace(':', '%3A')}"]


def test_multi_layer_image_with_whiteouts_round_trips(registry: Registry, tmp_path: Path) -> None:
    """skopeo puts a two-layer image (whiteout, opaque dir) in; cowfs pulls it, pushes it as
    zstd elsewhere; skopeo and umoci unpack what cowfs pushed: the merged tree is the same."""
    lower = Layer(
        {
            "etc": None,
            "etc/gone": b"bye\n",
            "etc/kept": b"kept\n",
            "var": None,
            "var/cache": None,
            "var/cache/old": b"old\n",
        }
    )
    upper = Layer(
        {
            "etc": None,
            "etc/.wh.gone": b"",
            "var": None,
            "var/cache": None,
            "var/cache/.wh..wh..opq": b"",
            "var/cache/new": b"new\n",
        }
    )
    img = OciImage([lower, upper]).build()
    skopeo_to_registry(img.write_layout(tmp_path / "layout"), registry, "src:v1")
    store = Store(tmp_path / "store")
    pulled = pull(store, f"{registry.host}/src:v1")
    res = push(store, pulled.image_id, f"{registry.host}/dst:v1")
    assert (res.layers, res.uploaded) == (2, 2)
    rootfs = unpack_with_umoci(
        registry, "dst:v1", tmp_path, "--dest-compress-format=gzip", "--dest-compress"
    )
    got = {k: v for k, v in listing(rootfs).items() if v[0] != "d"}
    assert got == {
        "etc/kept": ("f", 0o644, hashlib.sha256(b"kept\n").hexdigest()),
        "var/cache/new": ("f", 0o644, hashlib.sha256(b"new\n").hexdigest()),
    }


def test_manifest_refused_suggests_gzip(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    import_rootfs(store, make_tree(tmp_path / "src"), "src:v1")
    with fake_registry() as fake:
        fake.routes[("POST", "/v2/app/blobs/uploads/")] = (
            202,
            {"Location": "/v2/app/blobs/uploads/u1"},
            b"",
        )
        fake.routes[("PUT", "/v2/app/blobs/uploads/u1")] = (201, {}, b"")
        fake.routes[("PUT", "/v2/app/manifests/v1")] = (
            400,
            {},
            b'{"errors":[{"code":"MANIFEST_INVALID","message":"manifest invalid"}]}',
        )
        with pytest.raises(RegistryError, match="MANIFEST_INVALID.*try --compression gzip"):
            push(store, "src:v1", f"{fake.host}/app:v1")
