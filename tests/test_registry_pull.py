"""Pull from Debian's docker-registry, with images put there by skopeo (the oracle)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cowfs.errors import RegistryError
from cowfs.registry.pull import ensure_image, pull
from cowfs.store import Store
from tests.conftest import need_fuse
from tests.registry_fixtures import (
    Layer,
    OciImage,
    Registry,
    registry_fixture,  # noqa: F401 - the fixture registry
    skopeo_copy,
    skopeo_to_registry,
)

COWFS = [sys.executable, "-c", "from cowfs.cli import main; main()"]
FILES_A = {
    "etc": None,
    "etc/hostname": b"cowfs\n",
    "bin": None,
    "bin/tool": b"\x7fELF" * 500,
    "lib": None,
    "lib/link": ("sym", "../bin/tool"),
}
FILES_B = {
    "etc": None,
    "etc/hostname": b"changed\n",
    "etc/.wh.gone": b"",
    "data.bin": bytes(range(256)) * 64,
}


def remote_digest(reg: Registry, name: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{reg.host}/{name}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)["Digest"]


def two_layer_image() -> OciImage:
    return OciImage([Layer(dict(FILES_A)), Layer(dict(FILES_B), compression="none")]).build()


def tree(store: Store, image_id: str) -> dict[str, object]:
    """path -> content bytes / 'dir' / ('sym', target) / 'wh' over the image's layers, merged."""
    out: dict[str, object] = {}
    for layer_id in store.image(image_id).layers:
        toc = store.load_toc(layer_id)
        for path in toc.whiteouts:
            out.pop(path, None)
        for e in toc.entries.values():
            if e.kind == "f":
                data = b""
                if e.size:
                    r = store.objects.open(e.digest)
                    data = r.pread(e.size, 0)
                    r.close()
                out[e.path] = data
            elif e.kind == "d":
                out[e.path] = None
            elif e.kind == "l":
                out[e.path] = ("sym", e.target)
    out.pop("", None)
    return out


def expected_tree() -> dict[str, object]:
    out = {**FILES_A, **FILES_B}
    del out["etc/.wh.gone"]
    return out


def test_pull_skopeo_image_has_right_content(registry: Registry, tmp_path: Path) -> None:
    img = two_layer_image()
    skopeo_to_registry(img.write_layout(tmp_path / "layout"), registry, "app:v1")
    store = Store(tmp_path / "store")
    res = pull(store, f"{registry.host}/app:v1")
    assert res.tag == f"{registry.host}/app:v1"
    assert store.resolve(f"{registry.host}/app:v1").id == res.image_id
    assert (res.layers, res.downloaded) == (2, 2)
    assert tree(store, res.image_id) == expected_tree()
    config = store.image(res.image_id).config
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert list((tmp_path / "store" / "tmp").iterdir()) == []

    # Again: nothing is downloaded, same image.
    again = pull(store, f"{registry.host}/app:v1")
    assert (again.image_id, again.downloaded) == (res.image_id, 0)


def test_shared_layers_are_not_downloaded_again(registry: Registry, tmp_path: Path) -> None:
    base = Layer(dict(FILES_A)).build()
    one = OciImage([base]).build()
    two = OciImage([base, Layer({"extra": b"x"}).build()]).build()
    skopeo_to_registry(one.write_layout(tmp_path / "one"), registry, "one")
    skopeo_to_registry(two.write_layout(tmp_path / "two"), registry, "two")
    store = Store(tmp_path / "store")
    assert pull(store, f"{registry.host}/one").downloaded == 1
    res = pull(store, f"{registry.host}/two:latest")
    assert (res.layers, res.downloaded) == (2, 1)


def test_pull_by_digest_and_ensure_image(registry: Registry, tmp_path: Path) -> None:
    img = two_layer_image()
    skopeo_to_registry(img.write_layout(tmp_path / "layout"), registry, "app:v1")
    digest = remote_digest(registry, "app:v1")  # skopeo may rewrite the manifest (compression)
    store = Store(tmp_path / "store")
    ref = f"{registry.host}/app@{digest}"
    image_id = ensure_image(store, ref)
    assert store.tags() == {}  # a pull by digest has no tag
    assert tree(store, image_id) == expected_tree()
    # Found again without the registry: stop it and ask once more.
    subprocess.run(["kill", str(registry.pid)], check=True)
    assert ensure_image(store, ref) == image_id


def test_index_picks_platform(registry: Registry, tmp_path: Path) -> None:
    amd = OciImage([Layer({"arch": b"amd64\n"})], arch="amd64").build()
    arm = OciImage([Layer({"arch": b"arm64\n"})], arch="arm64").build()
    layout = tmp_path / "multi"
    amd.write_layout(layout)
    arm_dir = arm.write_layout(tmp_path / "arm")
    for blob in (arm_dir / "blobs" / "sha256").iterdir():
        (layout / "blobs" / "sha256" / blob.name).write_bytes(blob.read_bytes())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + hashlib.sha256(m.manifest).hexdigest(),
                "size": len(m.manifest),
                "platform": {"os": "linux", "architecture": a},
            }
            for m, a in ((arm, "arm64"), (amd, "amd64"))
        ],
    }
    index_bytes = json.dumps(index).encode()
    idx_digest = hashlib.sha256(index_bytes).hexdigest()
    (layout / "blobs" / "sha256" / idx_digest).write_bytes(index_bytes)
    top = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": "sha256:" + idx_digest,
        "size": len(index_bytes),
        "annotations": {"org.opencontainers.image.ref.name": "m"},
    }
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    skopeo_copy(
        f"oci:{layout}:m", f"docker://{registry.host}/multi:m", "--all", "--dest-tls-verify=false"
    )
    store = Store(tmp_path / "store")
    res = pull(store, f"{registry.host}/multi:m")
    assert tree(store, res.image_id) == {"arch": b"amd64\n"}
    res = pull(store, f"{registry.host}/multi:m", platform="linux/arm64")
    assert tree(store, res.image_id) == {"arch": b"arm64\n"}
    with pytest.raises(RegistryError, match="no image for platform linux/s390x"):
        pull(store, f"{registry.host}/multi:m", platform="linux/s390x")


def test_missing_tag_is_one_line_error(registry: Registry, tmp_path: Path) -> None:
    proc = subprocess.run(
        [*COWFS, "--root", str(tmp_path / "store"), "pull", f"{registry.host}/nothere:v9"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == RegistryError.exit_code
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "MANIFEST_UNKNOWN" in proc.stderr or "NAME_UNKNOWN" in proc.stderr


def test_pulled_image_mounts_with_right_content(registry: Registry, tmp_path: Path) -> None:
    need_fuse()
    mounting = pytest.importorskip("cowfs.mounting")  # the mount module of another engineer
    img = two_layer_image()
    skopeo_to_registry(img.write_layout(tmp_path / "layout"), registry, "app:v1")
    store = Store(tmp_path / "store")
    image_id = ensure_image(store, f"{registry.host}/app:v1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounting.mount(store, image_id, mnt, read_only=True)
    try:
        seen = {}
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                rel = str(p.relative_to(mnt))
                if p.is_symlink():
                    seen[rel] = ("sym", os.readlink(p))
                elif p.is_dir():
                    seen[rel] = None
                else:
                    seen[rel] = p.read_bytes()
    finally:
        mounting.umount(mnt)
    assert seen == expected_tree()


def test_image_for_mount_and_run_pulls_once(registry: Registry, tmp_path: Path) -> None:
    from cowfs.cli.registry import image_for

    skopeo_to_registry(two_layer_image().write_layout(tmp_path / "layout"), registry, "app:v1")
    store = Store(tmp_path / "store")
    ref = f"{registry.host}/app:v1"
    image_id = image_for(store, ref)
    assert store.resolve(ref).id == image_id
    assert image_for(store, ref) == ref  # now local: no registry needed
    assert image_for(store, image_id[:12]) == image_id[:12]


def test_pull_docker_schema2(registry: Registry, tmp_path: Path) -> None:
    img = two_layer_image()
    layout = img.write_layout(tmp_path / "layout")
    skopeo_copy(
        f"oci:{layout}:latest",
        f"docker://{registry.host}/dock:v2",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
    )
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/dock:v2"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(raw)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    store = Store(tmp_path / "store")
    res = pull(store, f"{registry.host}/dock:v2")
    assert tree(store, res.image_id) == expected_tree()


def test_concurrent_pulls_of_one_image(registry: Registry, tmp_path: Path) -> None:
    skopeo_to_registry(two_layer_image().write_layout(tmp_path / "layout"), registry, "app:v1")
    root = tmp_path / "store"
    Store(root)
    cmd = [*COWFS, "--root", str(root), "pull", f"{registry.host}/app:v1"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip())
    store = Store(root)
    assert len(set(outs)) == 1 and store.image_ids() == [outs[0]]
    assert len(store.layers()) == 2 and list(store.tmp.iterdir()) == []
    assert tree(store, outs[0]) == expected_tree()


def test_path_through_a_lower_symlink(registry: Registry, tmp_path: Path) -> None:
    """Layer 2 writes lib/x where layer 1 made lib a symlink to usr/lib: extracted, as docker
    and umoci do, the file lands in usr/lib (layers are imported in parallel, then rebased)."""
    img = OciImage(
        [
            Layer({"usr": None, "usr/lib": None, "lib": ("sym", "usr/lib")}),
            Layer({"lib/x": b"through the link\n"}),
        ]
    ).build()
    skopeo_to_registry(img.write_layout(tmp_path / "layout"), registry, "link:v1")
    store = Store(tmp_path / "store")
    res = pull(store, f"{registry.host}/link:v1")
    got = tree(store, res.image_id)
    assert got["usr/lib/x"] == b"through the link\n"
    assert got["lib"] == ("sym", "usr/lib")
