"""The image commands through cowfs.cli.main, as a user runs them: exact output, exit codes."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from cowfs.cli import main
from cowfs.cli.image import human_size
from cowfs.maintenance import usage
from cowfs.store import Store
from tests.conftest import need_tool


def cowfs(root: Path, *args: str) -> tuple[int, str, str]:
    """Run `cowfs --root ROOT ARGS...` in-process: (exit code, stdout, stderr)."""
    runner = CliRunner()
    with runner.isolation() as (out, err, _):
        try:
            main(["--root", str(root), *args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue().decode(), err.getvalue().decode()


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for p in [root, *root.rglob("*")]:
        os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    return root


BASE = {"bin/tool": b"\x7fELF" + bytes(range(256)) * 40, "etc/os-release": b"ID=test\n"}


@pytest.fixture
def two_images(tmp_path: Path, store_root: Path) -> Path:
    """a:1 and b:1 share every file of BASE; each has one file of its own."""
    a = tree(tmp_path / "a", {**BASE, "a.txt": b"only in a\n" * 50})
    b = tree(tmp_path / "b", {**BASE, "b.txt": os.urandom(3000)})
    for src, ref in ((a, "a:1"), (b, "b:1")):
        code, out, err = cowfs(store_root, "image", "import-rootfs", str(src), ref)
        assert (code, err) == (0, "")
        assert out == Store(store_root).resolve(ref).id + "\n"
    return store_root


def test_ls_shows_shared_and_unique(two_images: Path) -> None:
    store = Store(two_images)
    u = {x.tags[0]: x for x in usage(store)}
    shared = sum(store.objects.stored_size(store.load_toc(store.resolve("a:1").layers[0])
                                           .entries[p].digest) for p in BASE)  # fmt: skip
    assert u["a:1"].shared == u["b:1"].shared == shared
    assert u["a:1"].unique == store.objects.stored_size(
        store.load_toc(store.resolve("a:1").layers[0]).entries["a.txt"].digest)

    def row(name: str) -> list[str]:
        x = u[name]
        return [name, x.image_id[:12], "1", human_size(x.content), human_size(x.stored),
                human_size(x.shared), human_size(x.unique)]  # fmt: skip

    rows = [["NAME", "IMAGE ID", "LAYERS", "CONTENT", "STORED", "SHARED", "UNIQUE"],
            row("a:1"), row("b:1")]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    want = "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
                   for r in rows)  # fmt: skip
    assert cowfs(two_images, "image", "ls") == (0, want, "")

    code, out, _ = cowfs(two_images, "image", "ls", "--json")
    doc = {x["tags"][0]: x for x in json.loads(out)}
    assert code == 0
    assert doc["b:1"]["shared_bytes"] == shared
    assert doc["b:1"]["stored_bytes"] == doc["b:1"]["shared_bytes"] + doc["b:1"]["unique_bytes"]


def test_dedup_second_image_adds_no_copies(two_images: Path, tmp_path: Path) -> None:
    store = Store(two_images)
    before = set(store.objects)
    c = tree(tmp_path / "c", {**BASE, "a.txt": b"only in a\n" * 50})  # a's files, new tree
    (c / "extra").mkdir()
    os.utime(c / "extra", (1, 1))
    assert cowfs(two_images, "image", "import-rootfs", str(c), "c:1")[0] == 0
    assert set(store.objects) == before  # every file of c is stored already


def test_inspect_tag_rm(two_images: Path) -> None:
    store = Store(two_images)
    image_id = store.resolve("a:1").id
    code, out, _ = cowfs(two_images, "image", "inspect", "a:1")
    doc = json.loads(out)
    assert code == 0 and doc["id"] == image_id and doc["tags"] == ["a:1"]
    assert doc["config"]["rootfs"]["diff_ids"] == [doc["layers"][0]["diff_id"]]
    assert doc["layers"][0]["entries"] == 6

    assert cowfs(two_images, "image", "tag", "a:1", "again") == (0, "", "")
    assert store.tags_of(image_id) == ["a:1", "again:latest"]
    assert cowfs(two_images, "image", "rm", "a:1") == (0, "Untagged: a:1\n", "")
    assert cowfs(two_images, "image", "rm", "again") == \
        (0, f"Untagged: again\nDeleted: {image_id}\n", "")  # fmt: skip
    b_id = store.resolve("b:1").id
    assert cowfs(two_images, "image", "rm", b_id[:12]) == \
        (0, f"Untagged: b:1\nDeleted: {b_id}\n", "")  # fmt: skip
    assert store.images() == []


def test_rm_refuses_an_image_a_container_uses(two_images: Path) -> None:
    store = Store(two_images)
    image_id = store.resolve("a:1").id
    (store.containers_dir / "c1").mkdir()
    (store.containers_dir / "c1" / "state.json").write_text(json.dumps({"image_id": image_id}))
    code, out, err = cowfs(two_images, "image", "rm", "a:1")
    assert (code, out) == (2, "")
    assert err == "Error: image a:1 is used by a container (remove it first, or use --force)\n"
    assert cowfs(two_images, "image", "rm", "--force", "a:1")[0] == 0


def test_export_import_round_trip(two_images: Path, tmp_path: Path) -> None:
    need_tool("skopeo")
    out = tmp_path / "out"
    code, digest, err = cowfs(two_images, "image", "export", "a:1", str(out))
    assert code == 0 and err == "" and digest.startswith("sha256:")
    archive = tmp_path / "a.tar"
    code, _, _ = cowfs(two_images, "image", "export", "a:1", str(archive), "--format",
                       "docker-archive")  # fmt: skip
    assert code == 0
    other = tmp_path / "other"
    for src, ref in ((f"{out}:1", "x:oci"), (str(archive), "x:docker")):
        code, image_id, err = cowfs(other, "image", "import", src, ref)
        assert (code, err) == (0, "")
        assert Store(other).resolve(ref).layers == Store(two_images).resolve("a:1").layers
    # Without a name, the source's own is used.
    code, image_id, _ = cowfs(other, "image", "import", str(archive))
    assert Store(other).tags()["a:1"] == image_id.strip()


def test_import_rootfs_from_tar(store_root: Path, tmp_path: Path) -> None:
    src = tree(tmp_path / "src", BASE)
    blob = tmp_path / "rootfs.tar"
    with tarfile.open(blob, "w") as t:
        t.add(src, arcname=".")
    code, out, err = cowfs(store_root, "image", "import-rootfs", str(blob), "fromtar")
    assert (code, err) == (0, "")
    assert Store(store_root).tags() == {"fromtar:latest": out.strip()}


ERRORS = [
    (["image", "rm", "nope:1"], 2, "Error: image nope:1 not found\n"),
    (["image", "inspect", "nope"], 2, "Error: image nope not found\n"),
    (["image", "tag", "nope", "x"], 2, "Error: image nope not found\n"),
    (["image", "export", "nope", "/tmp/x"], 2, "Error: image nope not found\n"),
    (["image", "import", "/nonexistent/dir:tag"], 2,
     "Error: /nonexistent/dir:tag: no such image layout or archive\n"),
    (["image", "import-rootfs", "/nonexistent", "x:1"], 2,
     "Error: /nonexistent: no such directory or tar file\n"),
    (["image", "import-rootfs", "/etc/hostname", "bad ref"], 2,
     "Error: invalid image reference 'bad ref'\n"),
    (["gc", "--grace", "soon"], 2,
     "Error: 'soon' is not a duration (e.g. 0, 30s, 10m, 2h)\n"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "code", "err"), ERRORS, ids=[" ".join(a) for a, _, _ in ERRORS])
def test_errors_are_one_line(store_root: Path, args: list[str], code: int, err: str) -> None:
    assert cowfs(store_root, *args) == (code, "", err)


def test_import_of_a_damaged_archive(store_root: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    code, out, err = cowfs(store_root, "image", "import", str(junk))
    assert (code, out) == (2, "")
    assert err.startswith("Error: ") and err.count("\n") == 1


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 40)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 TiB"]  # fmt: skip
