"""OCI layout, OCI archive and docker-archive import/export, with umoci and skopeo as oracles.

The image under test is built by umoci itself: several layers, deleted files and directories
(umoci writes `.wh.` whiteouts), an opaque directory (a raw layer with `.wh..wh..opq`), hard
links, xattrs, devices and a full config. What umoci unpacks from our export must be what it
unpacks from its own image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cowfs import oci
from cowfs.errors import DigestMismatch, InvalidInput, NotFound
from cowfs.store import Store
from tests.conftest import need_root, need_tool
from tests.test_layertar import listing, make_tree


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def umoci_unpack(image: str, dest: Path) -> dict[str, tuple]:
    run("umoci", "unpack", "--image", image, str(dest))
    return listing(dest / "rootfs")


@pytest.fixture(scope="module")
def umoci_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An OCI layout with tag `v3`: three layers from umoci, deletions and an opaque dir."""
    need_root()
    need_tool("umoci", "skopeo", "tar")
    base = tmp_path_factory.mktemp("umoci")
    layout, bundle = base / "L", base / "B"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:base")
    run("umoci", "unpack", "--image", f"{layout}:base", str(bundle))
    rootfs = bundle / "rootfs"
    make_tree(rootfs)
    (rootfs / "gone").mkdir()
    (rootfs / "gone/file").write_text("deleted in v2\n")
    (rootfs / "opq").mkdir()
    (rootfs / "opq/old").write_text("hidden by the opaque dir in v3\n")
    run("umoci", "repack", "--image", f"{layout}:v1", str(bundle))
    # repack diffs against the image the bundle was unpacked from: start v2 from v1.
    shutil.rmtree(bundle)
    run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    shutil.rmtree(rootfs / "gone")
    os.unlink(rootfs / "empty")
    (rootfs / "dir/file").write_text("changed in v2\n")
    run("umoci", "repack", "--image", f"{layout}:v2", str(bundle))
    raw = base / "opaque.tar"
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("opq/", None), ("opq/.wh..wh..opq", b""), ("opq/new", b"new\n")):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    run("umoci", "raw", "add-layer", "--image", f"{layout}:v2", "--tag", "v3", str(raw))
    run("umoci", "config", "--image", f"{layout}:v3", "--config.env", "FOO=bar",
        "--config.cmd", "/bin/sh", "--config.entrypoint", "/entry", "--config.workingdir",
        "/work", "--config.user", "1000:1000", "--config.label", "a=b",
        "--config.exposedports", "8080/tcp")  # fmt: skip
    shutil.rmtree(bundle)
    yield layout
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def store(store_root: Path) -> Store:
    return Store(store_root)


def test_umoci_image_round_trip(umoci_image: Path, store: Store, tmp_path: Path) -> None:
    image_id = oci.import_image(store, f"{umoci_image}:v3")
    img = store.image(image_id)
    assert store.tags() == {"l:v3": image_id}  # named after the layout dir, tag from ref.name
    cfg = img.config["config"]
    assert "FOO=bar" in cfg["Env"] and cfg["Cmd"] == ["/bin/sh"]
    assert cfg["Entrypoint"] == ["/entry"] and cfg["WorkingDir"] == "/work"
    assert cfg["User"] == "1000:1000" and cfg["Labels"] == {"a": "b"}
    assert "8080/tcp" in cfg["ExposedPorts"]
    assert img.config["os"] == "linux" and img.config["architecture"]
    assert [store.layer_meta(x).diff_id for x in img.layers] == img.config["rootfs"]["diff_ids"]
    top = store.load_toc(img.layers[-1])
    assert top.opaque == {"opq"}
    assert "gone" in store.load_toc(img.layers[1]).whiteouts

    out = tmp_path / "out"
    oci.export_image(store, "l:v3", f"{out}:exported")
    inspect = json.loads(run("skopeo", "inspect", f"oci:{out}:exported"))
    assert len(inspect["Layers"]) == 3
    assert inspect["Labels"] == {"a": "b"}
    want = umoci_unpack(f"{umoci_image}:v3", tmp_path / "want")
    got = umoci_unpack(f"{out}:exported", tmp_path / "got")
    assert got == want
    assert "opq/new" in got and "opq/old" not in got and "gone" not in got
    assert "hardlink" in got and got["hardlink"][-1] == ("dir/file", "hardlink")

    # Importing the export gives the same layers back.
    again = oci.import_image(store, f"{out}:exported", "again:1")
    assert store.image(again).layers == img.layers


def test_docker_archive_from_skopeo(umoci_image: Path, store: Store, tmp_path: Path) -> None:
    archive = tmp_path / "d.tar"
    run("skopeo", "copy", f"oci:{umoci_image}:v3", f"docker-archive:{archive}:example/app:3")
    from_oci = store.image(oci.import_image(store, f"{umoci_image}:v3"))
    image_id = oci.import_image(store, archive)
    assert store.tags()["example/app:3"] == image_id
    # The same tars, uncompressed instead of gzip: the same layers.
    assert store.image(image_id).layers == from_oci.layers

    # Our docker-archive export goes back through skopeo and umoci unchanged.
    exported = tmp_path / "mine.tar"
    oci.export_image(store, "example/app:3", exported, fmt="docker-archive")
    inspect = json.loads(run("skopeo", "inspect", f"docker-archive:{exported}"))
    assert inspect["RepoTags"] == ["example/app:3"] or inspect["Layers"]
    layout = tmp_path / "via-skopeo"
    run("skopeo", "copy", f"docker-archive:{exported}", f"oci:{layout}:t")
    assert umoci_unpack(f"{layout}:t", tmp_path / "a") == \
        umoci_unpack(f"{umoci_image}:v3", tmp_path / "b")  # fmt: skip


def test_oci_archive_and_zstd_layers(umoci_image: Path, store: Store, tmp_path: Path) -> None:
    zlayout = tmp_path / "z"
    run("skopeo", "copy", "--dest-compress-format", "zstd", f"oci:{umoci_image}:v3",
        f"oci:{zlayout}:v3")  # fmt: skip
    media = {m["mediaType"] for m in json.loads(
        (zlayout / "blobs/sha256" / json.loads((zlayout / "index.json").read_text())
         ["manifests"][0]["digest"].split(":")[1]).read_text())["layers"]}  # fmt: skip
    assert media == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    archive = tmp_path / "z.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(zlayout, arcname=".")
    from_dir = store.image(oci.import_image(store, f"{umoci_image}:v3"))
    from_archive = store.image(oci.import_image(store, f"{archive}:v3", "z:v3"))
    assert from_archive.layers == from_dir.layers

    out = tmp_path / "out"
    oci.export_image(store, "z:v3", out, compression="zstd")
    # umoci 0.4 reads no zstd: skopeo (which does) turns the export back into gzip for it.
    gz = tmp_path / "gz"
    run("skopeo", "copy", "--dest-compress-format", "gzip", f"oci:{out}:v3", f"oci:{gz}:v3")
    assert umoci_unpack(f"{gz}:v3", tmp_path / "a") == \
        umoci_unpack(f"{umoci_image}:v3", tmp_path / "b")  # fmt: skip


def test_layout_with_several_images_needs_a_tag(umoci_image: Path, store: Store) -> None:
    with pytest.raises(InvalidInput, match=r"holds 4 images; pick one .*base, v1, v2, v3"):
        oci.import_image(store, umoci_image)
    with pytest.raises(NotFound, match="no image tagged 'v9'"):
        oci.import_image(store, f"{umoci_image}:v9")
    assert store.images() == []


def test_export_adds_to_an_existing_layout(busybox_image, tmp_path: Path) -> None:
    need_tool("skopeo")
    store = Store(busybox_image[0])
    out = tmp_path / "layout"
    first = oci.export_image(store, "busybox:latest", out)
    oci.export_image(store, "busybox:latest", f"{out}:second")
    again = oci.export_image(store, "busybox:latest", out)  # same tag: replaced, not doubled
    assert first == again
    index = json.loads((out / "index.json").read_text())
    names = sorted(m["annotations"][oci.REF_NAME] for m in index["manifests"])
    assert names == ["latest", "second"]
    assert json.loads(run("skopeo", "inspect", f"oci:{out}:second"))["Os"] == "linux"


def _corrupt_layout(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    index = json.loads((dest / "index.json").read_text())
    index["manifests"] = [m for m in index["manifests"]
                          if m["annotations"][oci.REF_NAME] == "v3"]  # fmt: skip
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def test_corrupt_blob_is_refused(umoci_image: Path, store: Store, tmp_path: Path) -> None:
    layout = _corrupt_layout(umoci_image, tmp_path / "bad")
    manifest = json.loads((layout / "blobs/sha256" / json.loads(
        (layout / "index.json").read_text())["manifests"][0]["digest"][7:]).read_text())
    top = layout / "blobs/sha256" / manifest["layers"][-1]["digest"][7:]
    os.chmod(top, 0o644)
    data = bytearray(top.read_bytes())
    data[len(data) // 2] ^= 0xFF
    top.write_bytes(bytes(data))
    with pytest.raises((DigestMismatch, InvalidInput)):
        oci.import_image(store, layout)
    assert store.images() == [] and store.tags() == {}


def test_not_an_image(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        oci.import_image(store, tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InvalidInput, match="not an OCI image layout"):
        oci.import_image(store, tmp_path / "plain")
    tar = tmp_path / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "plain", arcname="etc")
    with pytest.raises(InvalidInput, match="use import-rootfs"):
        oci.import_image(store, tar)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0garbage" * 100)
    with pytest.raises(InvalidInput):
        oci.import_image(store, junk)


def test_image_index_picks_the_host_platform(umoci_image: Path, store: Store,
                                             tmp_path: Path) -> None:  # fmt: skip
    """A multi-platform layout (an index whose entry is itself an image index)."""
    layout = _corrupt_layout(umoci_image, tmp_path / "multi")  # only v3 is left in index.json
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    other = {**top, "platform": {"os": "linux", "architecture": "s390x"}}
    mine = {**top, "platform": {"os": "linux", "architecture": oci.host_architecture()}}
    inner = json.dumps({"schemaVersion": 2, "mediaType": oci.MT_INDEX,
                        "manifests": [other, mine]}).encode()  # fmt: skip
    digest = hashlib.sha256(inner).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(inner)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": oci.MT_INDEX, "digest": f"sha256:{digest}", "size": len(inner),
        "annotations": {oci.REF_NAME: "multi"}}]}))  # fmt: skip
    image_id = oci.import_image(store, f"{layout}:multi")
    assert store.tags() == {"multi:multi": image_id}
    assert len(store.image(image_id).layers) == 3


def test_parallel_imports_of_one_image(umoci_image: Path, store: Store) -> None:
    with ThreadPoolExecutor(3) as pool:
        ids = list(pool.map(lambda _: oci.import_image(Store(store.root), f"{umoci_image}:v3"),
                            range(3)))  # fmt: skip
    assert len(set(ids)) == 1 and store.image_ids() == ids[:1]
    assert len(store.layers()) == 3


def test_paths_through_lower_symlinks_follow_them_like_umoci(store: Store,
                                                             tmp_path: Path) -> None:  # fmt: skip
    """A layer that writes bin/foo over a lower bin -> usr/bin: umoci (and docker) put the file
    in usr/bin, inside the root even for links that point out of it; cowfs reads it the same."""
    need_root()
    need_tool("umoci", "tar")
    layout, bundle = tmp_path / "L", tmp_path / "B"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:base")
    run("umoci", "unpack", "--image", f"{layout}:base", str(bundle))
    root = bundle / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/bin/ls").write_text("ls\n")
    (root / "usr/bin/cat").write_text("cat\n")
    os.symlink("usr/bin", root / "bin")
    os.symlink("/usr/lib", root / "lib")
    os.symlink("../../../../tmp", root / "out")  # climbs out of the root: clamped there
    run("umoci", "repack", "--image", f"{layout}:base", str(bundle))
    raw = tmp_path / "top.tar"
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:  # no directory entries
        for name in ("bin/foo", "lib/x.so", "out/pwned", "bin/.wh.cat"):
            info = tarfile.TarInfo(name)
            data = name.encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    run("umoci", "raw", "add-layer", "--image", f"{layout}:base", "--tag", "top", str(raw))

    image = store.image(oci.import_image(store, f"{layout}:top"))
    top = store.load_toc(image.layers[-1])
    assert set(top.entries) == {"usr/bin/foo", "usr/lib/x.so", "tmp/pwned"}
    assert top.whiteouts == {"usr/bin/cat"}
    out = tmp_path / "out"
    oci.export_image(store, image.id, f"{out}:top")
    want = umoci_unpack(f"{layout}:top", tmp_path / "want")
    assert "usr/bin/foo" in want and "usr/bin/cat" not in want and "tmp/pwned" in want
    assert umoci_unpack(f"{out}:top", tmp_path / "got") == want


def test_docker_archive_with_a_repeated_layer(busybox_image, tmp_path: Path) -> None:
    """The same layer twice (docker images have empty layers): two entries, one tar, and
    skopeo reads the archive."""
    need_tool("skopeo")
    store = Store(busybox_image[0])
    img = store.resolve("busybox:latest")
    diff_id = img.config["rootfs"]["diff_ids"][0]
    cfg = {**img.config, "rootfs": {"type": "layers", "diff_ids": [diff_id, diff_id]}}
    cfg.pop("history", None)
    twice = store.add_image(img.layers * 2, cfg, tags=["twice:1"])
    archive = tmp_path / "twice.tar"
    oci.export_image(store, "twice:1", archive, fmt="docker-archive")
    with tarfile.open(archive) as t:
        tars = [m for m in t.getmembers() if m.name.endswith("layer.tar")]
    assert [m.isfile() for m in tars].count(True) == 1 and len(tars) == 2
    assert len(json.loads(run("skopeo", "inspect", f"docker-archive:{archive}"))["Layers"]) == 2
    other = Store(tmp_path / "other")
    assert other.image(oci.import_image(other, archive)).layers == store.image(twice).layers
