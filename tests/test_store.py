from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from cowfs.errors import Corruption, InvalidInput, NotFound
from cowfs.objects import FRAME_SIZE
from cowfs.store import Store, normalize_ref
from cowfs.toc import DIR, REG, SYMLINK, Entry


def build(store: Store, files: dict[str, bytes], whiteouts=(), opaque=()) -> str:
    with store.new_layer() as lb:
        lb.add(Entry("", DIR, 0o755))
        for path, data in files.items():
            lb.add(Entry(path, REG, 0o644), data)
        for w in whiteouts:
            lb.whiteout(w)
        for o in opaque:
            lb.opaque(o)
        return lb.commit()


def test_layer_roundtrip(store_root: Path) -> None:
    store = Store(store_root)
    big = os.urandom(3 * FRAME_SIZE) + b"x" * (5 * FRAME_SIZE)
    layer = build(store, {"a": b"hello", "b": big, "empty": b""}, whiteouts=["gone"], opaque=[""])
    fresh = Store(store_root)
    toc = fresh.load_toc(layer)
    assert toc.entries["a"].size == 5
    assert fresh.objects.read(toc.entries["a"].digest) == b"hello"
    assert fresh.objects.read(toc.entries["b"].digest) == big
    assert toc.entries["empty"].digest == "" and toc.entries["empty"].size == 0
    assert toc.whiteouts == {"gone"} and toc.opaque == {""}
    assert fresh.layer_meta(layer).size == 5 + len(big)


def test_streams_and_paths_store_the_same_object(store_root: Path, tmp_path: Path) -> None:
    store = Store(store_root)
    data = b"abc" * 600_000
    host = tmp_path / "f"
    host.write_bytes(data)
    with store.new_layer() as lb:
        e1 = lb.add(Entry("x", REG), io.BytesIO(data))
        e2 = lb.add(Entry("y", REG), host)
        e3 = lb.add(Entry("z", REG), data)
        lb.commit()
    assert e1.digest == e2.digest == e3.digest and e1.size == len(data)
    assert len(list(store.objects)) == 1  # dedup


def test_layer_ids_are_content_addressed_and_idempotent(store_root: Path) -> None:
    store = Store(store_root)
    a = build(store, {"f": b"1"})
    b = build(store, {"f": b"1"})
    c = build(store, {"f": b"2"})
    assert a == b != c
    assert store.layers() == sorted([a, c])


def test_uncommitted_layer_is_invisible(store_root: Path) -> None:
    store = Store(store_root)
    with pytest.raises(RuntimeError), store.new_layer() as lb:
        lb.add(Entry("f", REG), b"data")
        raise RuntimeError("import failed half way")
    assert store.layers() == []
    assert os.listdir(store.tmp) == []


def test_hard_link_group_shares_content(store_root: Path) -> None:
    store = Store(store_root)
    with store.new_layer() as lb:
        lb.add(Entry("a", REG, link=1), b"shared")
        e = lb.add(Entry("b", REG, link=1))
        lb.commit()
    assert e.size == 6 and e.digest


def test_missing_content_is_an_error(store_root: Path) -> None:
    store = Store(store_root)
    with store.new_layer() as lb, pytest.raises(InvalidInput):
        lb.add(Entry("a", REG, size=10))


def test_images_tags_resolve_remove(store_root: Path) -> None:
    store = Store(store_root)
    base = build(store, {"bin/sh": b"#!"})
    top = build(store, {"etc/x": b"1"}, whiteouts=["bin/sh"])
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]}}
    img = store.add_image([base, top], config, tags=["demo"])
    assert store.add_image([base, top], config) == img
    assert store.resolve("demo").layers == [base, top]
    assert store.resolve("demo:latest").id == img
    assert store.resolve(img[:8]).id == img
    assert store.resolve("sha256:" + img).id == img
    store.tag(img, "other:v1")
    assert store.tags_of(img) == ["demo:latest", "other:v1"]
    assert store.remove_image("demo") == []  # still tagged other:v1
    assert store.remove_image("other:v1") == [img]
    with pytest.raises(NotFound):
        store.resolve("demo")
    assert store.images() == []


def test_add_image_needs_its_layers(store_root: Path) -> None:
    with pytest.raises(NotFound):
        Store(store_root).add_image(["0" * 64], {})


def test_layer_by_digest(store_root: Path) -> None:
    store = Store(store_root)
    layer = build(store, {"f": b"1"})
    store.update_layer_meta(layer, diff_id="sha256:" + "a" * 64, blobs={"sha256:" + "b" * 64: "t"})
    assert store.layer_by_digest("sha256:" + "a" * 64) == layer
    assert store.layer_by_digest("sha256:" + "b" * 64) == layer
    assert store.layer_by_digest("sha256:" + "c" * 64) is None


def test_damaged_toc_is_corruption(store_root: Path) -> None:
    store = Store(store_root)
    layer = build(store, {"f": b"1"})
    toc = store.layer_dir(layer) / "toc"
    blob = bytearray(toc.read_bytes())
    blob[-3] ^= 1
    os.chmod(toc, 0o644)
    toc.write_bytes(bytes(blob))
    with pytest.raises(Corruption):
        Store(store_root).load_toc(layer)


def test_symlink_entry(store_root: Path) -> None:
    store = Store(store_root)
    with store.new_layer() as lb:
        lb.add(Entry("l", SYMLINK, 0o777, target="/etc/passwd", size=11))
        layer = lb.commit()
    assert Store(store_root).load_toc(layer).entries["l"].target == "/etc/passwd"


@pytest.mark.parametrize(
    "ref,want",
    [
        ("busybox", "busybox:latest"),
        ("a/b:1", "a/b:1"),
        ("h:5000/a", "h:5000/a:latest"),
        ("h:5000/a:t", "h:5000/a:t"),
        ("a@sha256:00", "a@sha256:00"),
    ],
)
def test_normalize_ref(ref: str, want: str) -> None:
    assert normalize_ref(ref) == want


@pytest.mark.parametrize("bad", ["", "a b", "x\0"])
def test_bad_refs(bad: str) -> None:
    with pytest.raises(InvalidInput):
        normalize_ref(bad)


def test_file_over_the_whole_read_limit_streams(tmp_path: Path, monkeypatch) -> None:
    """A file larger than what the builder reads whole goes through put_stream: its first part
    (already read) and the rest are one object, byte for byte."""
    from cowfs import layerbuilder

    monkeypatch.setattr(layerbuilder, "_SMALL_FILE", 3 * FRAME_SIZE + 5)
    s = Store(tmp_path / "s")
    data = os.urandom(2 * FRAME_SIZE) + b"y" * (7 * FRAME_SIZE + 3)
    with s.new_layer() as lb:
        e = lb.add(Entry("f", REG), io.BytesIO(data))
        layer = lb.commit()
    assert e.size == len(data)
    assert Store(s.root).objects.read(s.load_toc(layer).entries["f"].digest) == data
