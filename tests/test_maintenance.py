"""fsck finds damage and names what it breaks; gc removes exactly what nothing references."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cowfs import maintenance
from cowfs.index import INDEX_VERSION
from cowfs.rootfs import default_config, import_dir_layer
from cowfs.store import Store
from tests.test_image_cli import cowfs, tree


@pytest.fixture
def store(tmp_path: Path, store_root: Path) -> Store:
    """base:1 (one layer) and app:1 (base's layer + its own), plus old:1 (unrelated)."""
    s = Store(store_root)
    base = import_dir_layer(s, tree(tmp_path / "base", {"bin/sh": b"shell" * 1000,
                                                        "etc/passwd": b"root\n"}))  # fmt: skip
    app = import_dir_layer(s, tree(tmp_path / "app", {"app/main": b"app" * 2000}))
    old = import_dir_layer(s, tree(tmp_path / "old", {"old/data": b"old" * 3000}))

    def add(layers: list[str], ref: str) -> None:
        diff_ids = [s.layer_meta(x).diff_id for x in layers]
        s.add_image(layers, default_config(diff_ids, "test"), tags=[ref])

    add([base], "base:1")
    add([base, app], "app:1")
    add([old], "old:1")
    return s


def digest_of(store: Store, ref: str, path: str) -> str:
    for layer in store.resolve(ref).layers:
        e = store.load_toc(layer).entries.get(path)
        if e is not None:
            return e.digest
    raise KeyError(path)


def damage(path: Path, start: int = 0, length: int | None = None) -> None:
    """Flip a byte a third of the way into `path` (or into its span `start`, `length`)."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    length = len(data) - start if length is None else length
    data[start + length // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fsck_clean(store: Store) -> None:
    report = maintenance.fsck(store)
    assert report.ok and (report.objects, report.layers, report.images) == (4, 3, 3)
    assert cowfs(store.root, "fsck") == \
        (0, "checked 4 objects, 3 layers, 3 images: ok\n", "")  # fmt: skip


def test_fsck_names_what_a_broken_object_breaks(store: Store) -> None:
    digest = digest_of(store, "base:1", "bin/sh")
    damage(*store.objects.location(digest))  # a span of a pack: small objects are packed
    report = maintenance.fsck(store)
    assert not report.ok
    [problem] = report.problems
    assert problem.what == f"object {digest}"
    assert "checksum mismatch" in problem.why or "does not" in problem.why
    assert problem.affects == ["app:1: /bin/sh", "base:1: /bin/sh"]
    code, out, err = cowfs(store.root, "fsck")
    assert code == 3 and err == ""
    assert out == (f"checked 4 objects, 3 layers, 3 images: 1 problem(s)\n"
                   f"object {digest}: {problem.why}\n"
                   f"  affects app:1: /bin/sh\n  affects base:1: /bin/sh\n")  # fmt: skip


def test_fsck_missing_object_toc_image_and_tag(store: Store) -> None:
    digest = digest_of(store, "app:1", "app/main")
    store.objects.remove(digest)
    old_layer = store.resolve("old:1").layers[0]
    damage(store.layer_dir(old_layer) / "toc")
    tags = store.tags()
    tags["ghost:1"] = "f" * 64
    (store.root / "tags.json").write_text(json.dumps(tags))
    base_id = store.resolve("base:1").id
    image_file = store.root / "images" / f"{base_id}.json"
    doc = json.loads(image_file.read_text())
    doc["config"]["config"]["Cmd"] = ["/bin/evil"]
    image_file.write_text(json.dumps(doc))

    report = maintenance.fsck(store)
    got = {p.what: (p.why, p.affects) for p in report.problems}
    assert got[f"object {digest}"] == ("missing", ["app:1: /app/main"])
    assert got[f"layer {old_layer}"][0].startswith("TOC ")
    assert got[f"layer {old_layer}"][1] == ["old:1"]
    assert got[f"image {base_id}"][0] == "image file does not hash to its id"
    assert got["tag ghost:1"][0] == f"names missing image {'f' * 12}"
    assert len(report.problems) == 4
    code, out, _ = cowfs(store.root, "fsck", "--json")
    assert code == 3 and json.loads(out)["ok"] is False


def test_gc_removes_only_unreferenced(store: Store) -> None:
    app = store.resolve("app:1")
    old_layer = store.resolve("old:1").layers[0]
    old_obj = digest_of(store, "old:1", "old/data")
    store.remove_image("old:1")
    store.remove_image("app:1")
    (store.tmp / "stale").write_text("left by a crash")
    base_id = store.resolve("base:1").id
    for name in (f"index-{app.id}-v{INDEX_VERSION}", f"index-{base_id}-v0",
                 f"index-{base_id}-v{INDEX_VERSION}", "registry.json"):
        (store.cache_dir / name).write_text("cached")

    dry = maintenance.gc(store, dry_run=True, grace=0)
    assert sorted(dry.layers) == sorted([old_layer, app.layers[1]]) and dry.objects == 2
    assert store.has_layer(old_layer) and store.objects.has(old_obj)

    young = maintenance.gc(store, grace=3600)  # everything is fresh: nothing goes
    assert young.layers == [] and young.objects == 0 and young.kept_young == 2  # 2 layers

    report = maintenance.gc(store, grace=0)
    assert sorted(report.layers) == sorted(dry.layers)
    assert report.objects == 2 and report.tmp_entries == 1 and report.bytes_freed > 0
    # Cached indexes are derived data: gone with their image (or format), whatever their age.
    assert dry.cache_entries == young.cache_entries == 2 and report.cache_entries == 0
    assert sorted(p.name for p in store.cache_dir.iterdir()) == \
        [f"index-{base_id}-v{INDEX_VERSION}", "registry.json"]  # fmt: skip
    assert not store.has_layer(old_layer) and not store.objects.has(old_obj)
    assert store.has_layer(app.layers[0])  # base:1 still uses it
    assert maintenance.fsck(store).ok
    assert [x.tags for x in maintenance.usage(store)] == [["base:1"]]
    again = maintenance.gc(store, grace=0)
    assert (again.layers, again.objects, again.bytes_freed) == ([], 0, 0)


def test_gc_cli(store: Store) -> None:
    store.remove_image("old:1")
    code, out, err = cowfs(store.root, "gc", "--dry-run", "--grace", "0")
    assert (code, err) == (0, "")
    assert out.startswith("would free ") and out.endswith(
        ": 1 layer(s), 1 object(s), 0 cached index(es), 0 stale tmp entr(ies)\n")
    code, out, _ = cowfs(store.root, "gc")
    assert out == ("freed 0 B: 0 layer(s), 0 object(s), 0 cached index(es), "
                   "0 stale tmp entr(ies)\n"
                   "kept 1 unreferenced item(s) younger than 10m\n")  # fmt: skip
    code, out, _ = cowfs(store.root, "gc", "--grace", "0s", "--json")
    doc = json.loads(out)
    assert (code, len(doc["layers"]), doc["objects"]) == (0, 1, 1)


def test_container_images_are_roots(store: Store) -> None:
    image_id = store.resolve("old:1").id
    (store.containers_dir / "c").mkdir()
    (store.containers_dir / "c" / "state.json").write_text(json.dumps({"image_id": image_id}))
    (store.containers_dir / "broken").mkdir()
    (store.containers_dir / "broken" / "state.json").write_text("{not json")
    assert maintenance.container_image_ids(store) == {image_id}


@pytest.mark.parametrize("dead_size, rewritten", [(100_000, True), (100, False)])
def test_gc_rewrites_packs_mostly_garbage(tmp_path: Path, dead_size: int, rewritten: bool) -> None:
    """One pack, one object still used (by a second image), one not: the pack is rewritten
    when the dead bytes are at least half of it, else the dead object stays in it."""
    s = Store(tmp_path / "store")
    live_data, dead_data = os.urandom(50_000 if not rewritten else 100), os.urandom(dead_size)
    both = import_dir_layer(s, tree(tmp_path / "both", {"live": live_data, "dead": dead_data}))
    only = import_dir_layer(s, tree(tmp_path / "only", {"live": live_data}))
    for layer, ref in ((both, "both:1"), (only, "only:1")):
        s.add_image([layer], default_config([s.layer_meta(layer).diff_id], "test"), tags=[ref])
    (pack,) = s.objects.packs()  # the second layer stored nothing new
    dead = digest_of(s, "both:1", "dead")
    s.remove_image("both:1")
    report = maintenance.gc(s, grace=0)
    assert report.layers == [both]
    if rewritten:
        assert (report.objects, report.packs_rewritten, report.kept_in_packs) == (1, 1, 0)
        assert pack not in s.objects.packs() and not s.objects.has(dead)
        assert report.bytes_freed >= dead_size
    else:
        assert (report.objects, report.packs_rewritten, report.kept_in_packs) == (0, 0, 1)
        assert list(s.objects.packs()) == [pack] and s.objects.has(dead)
    assert maintenance.fsck(s).ok
    assert Store(s.root).objects.read(digest_of(s, "only:1", "live")) == live_data


def test_fsck_names_a_damaged_pack(store: Store) -> None:
    (pack, *_) = store.objects.packs()
    path = store.objects.pack_path(pack)
    damage(path, path.stat().st_size - 40, 8)  # in the index at the pack's end
    report = maintenance.fsck(Store(store.root))
    whats = [p.what for p in report.problems]
    assert f"pack {pack}" in whats
    assert any(w.startswith("object ") for w in whats)  # its objects are missing now
