"""The merged index: pure merge rules, inode numbering and the cache format (no FUSE, no root)."""

from __future__ import annotations

import pytest

from cowfs.errors import Corruption
from cowfs.index import INDEX_MAGIC, ROOT_INO, MergedIndex, merge
from cowfs.toc import DIR, REG, SYMLINK, Entry, Toc


def toc(*entries: Entry, whiteouts: tuple[str, ...] = (), opaque: tuple[str, ...] = ()) -> Toc:
    t = Toc()
    for e in entries:
        t.add(e)
    t.whiteouts = set(whiteouts)
    t.opaque = set(opaque)
    return t


def f(path: str, **kw) -> Entry:
    return Entry(path, REG, **kw)


def d(path: str, **kw) -> Entry:
    kw.setdefault("mode", 0o755)
    return Entry(path, DIR, **kw)


def test_upper_layer_wins_and_dirs_merge() -> None:
    low = toc(d("etc"), f("etc/a", size=1), f("etc/b", size=2))
    up = toc(d("etc", mode=0o700), f("etc/b", size=20), f("etc/c", size=3))
    idx = merge([low, up])
    assert idx.children["etc"] == ["a", "b", "c"]
    assert idx.entries["etc/b"].size == 20 and idx.layer["etc/b"] == 1
    assert idx.layer["etc/a"] == 0
    assert idx.entries["etc"].mode == 0o700


def test_whiteout_removes_the_subtree_below_only() -> None:
    low = toc(d("a"), f("a/x"), d("a/sub"), f("a/sub/y"), f("keep"))
    up = toc(f("new"), whiteouts=("a",))
    idx = merge([low, up])
    assert sorted(idx.entries) == ["", "keep", "new"]
    assert idx.children[""] == ["keep", "new"]


def test_whiteout_and_entry_in_the_same_layer_keep_the_entry() -> None:
    low = toc(d("a"), f("a/old"))
    up = toc(d("a"), f("a/new"), whiteouts=("a/old",))
    assert merge([low, up]).children["a"] == ["new"]


def test_opaque_dir_hides_lower_children_but_keeps_its_own() -> None:
    low = toc(d("a"), f("a/x"), d("a/deep"), f("a/deep/z"))
    up = toc(d("a"), f("a/y"), opaque=("a",))
    idx = merge([low, up])
    assert idx.children["a"] == ["y"]
    assert "a/deep/z" not in idx


def test_file_replacing_a_dir_drops_the_subtree_and_back() -> None:
    low = toc(d("a"), f("a/x"))
    mid = toc(f("a", size=5))
    top = toc(d("a"), f("a/y"))
    idx = merge([low, mid])
    assert idx.entries["a"].kind == REG and "a/x" not in idx
    idx = merge([low, mid, top])
    assert idx.children["a"] == ["y"] and "a/x" not in idx


def test_missing_parents_are_implied() -> None:
    idx = merge([toc(f("x/y/z"))])
    assert idx.entries["x"].kind == DIR and idx.entries["x/y"].kind == DIR
    assert idx.children[""] == ["x"] and idx.children["x/y"] == ["z"]


def test_inode_numbers_are_deterministic_and_hard_links_share_one() -> None:
    layer = toc(d("d"), f("d/a", link=1), f("d/b", link=1), f("d/c"), Entry("s", SYMLINK))
    one, two = merge([layer]), merge([toc(*layer.entries.values())])
    assert one.ino == two.ino
    assert one.ino[""] == ROOT_INO
    assert one.ino["d/a"] == one.ino["d/b"] != one.ino["d/c"]
    assert one.nlink["d/a"] == 2 and one.nlink["d/c"] == 1
    assert one.aliases[one.ino["d/a"]] == ["d/a", "d/b"]
    assert len(set(one.ino.values())) == len(one.ino) - 1


def test_link_groups_are_per_layer() -> None:
    low = toc(f("a", link=1), f("b", link=1))
    up = toc(f("c", link=1), f("d", link=1))
    idx = merge([low, up])
    assert idx.ino["a"] == idx.ino["b"] != idx.ino["c"] == idx.ino["d"]


def test_directory_nlink_counts_subdirectories() -> None:
    idx = merge([toc(d("a"), d("a/b"), d("a/c"), f("a/f"))])
    assert idx.nlink["a"] == 4 and idx.nlink[""] == 3


def test_cache_round_trip_keeps_everything() -> None:
    e = f("x", size=3, digest="ab" * 16, xattrs={"user.k": b"\x00v"}, mtime=123456789)
    idx = merge([toc(d("a"), e, f("a/h1", link=1), f("a/h2", link=1))])
    back = MergedIndex.loads(idx.dumps())
    assert back.entries == idx.entries
    assert (back.layer, back.ino, back.nlink) == (idx.layer, idx.ino, idx.nlink)
    assert back.children == idx.children and back.aliases == idx.aliases


def test_damaged_cache_is_corruption() -> None:
    """Damage in the table fails the load; damage in a directory's record fails the first
    lookup that needs the record, whichever way it asks."""
    good = merge([toc(d("a"), f("a/x"), f("y"))]).dumps()
    back = MergedIndex.loads(good)
    assert back.get("a/x") is not None and back.children.get("a") == ["x"]
    for ask in (lambda i: i.get("a/x"), lambda i: "a/x" in i, lambda i: i.children.get("a"),
                lambda i: i.ino["a/x"], lambda i: list(i.entries)):  # fmt: skip
        blob = bytearray(good)
        blob[-3] ^= 0xFF  # in the last record: a's
        damaged = MergedIndex.loads(bytes(blob))
        assert damaged.get("y") is not None  # the root's record is intact
        with pytest.raises(Corruption, match="record of 'a' is damaged"):
            ask(damaged)
    blob = bytearray(good)
    blob[len(INDEX_MAGIC) + 16 + 10] ^= 0x01  # in the table
    with pytest.raises(Corruption):
        MergedIndex.loads(bytes(blob))
    with pytest.raises(Corruption):
        MergedIndex.loads(b"garbage")


def test_cache_columns_follow_the_entry_fields() -> None:
    import inspect

    from cowfs.index import _ENTRY_FIELDS

    assert ("path", *_ENTRY_FIELDS) == Entry.__slots__
    assert Entry.__slots__ == tuple(inspect.signature(Entry).parameters)


def test_cache_loads_directories_on_first_use(tmp_path) -> None:
    idx = merge([toc(d("a"), d("a/b"), f("a/b/x", size=7), f("a/y"), f("top", link=1),
                     f("a/alias", link=1))])  # fmt: skip
    path = tmp_path / "index"
    path.write_bytes(idx.dumps())
    back = MergedIndex.load(path)
    assert len(back) == len(idx)
    assert dict.__len__(back.entries) == 1  # only the root's row is decoded up front
    assert back.entries["a/b/x"].size == 7 and back.ino["a/b/x"] == idx.ino["a/b/x"]
    assert back.get("a/b/nothing") is None and "a/y" in back and "a/y/under-a-file" not in back
    assert back.children.get("a/y") is None and back.children.get("a/b") == ["x"]
    with pytest.raises(KeyError):
        back.nlink["no/such"]
    assert back.nlink["a"] == idx.nlink["a"] and back.layer.get("top") == 0
    assert back.aliases == idx.aliases
    assert sorted(back.entries) == sorted(idx.entries) and dict(back.ino) == idx.ino


def test_damaged_cache_file_is_corruption_and_removed(tmp_path) -> None:
    blob = bytearray(merge([toc(d("a"), f("a/x"))]).dumps())
    blob[-2] ^= 0x01  # in a directory's record
    (tmp_path / "index").write_bytes(bytes(blob))
    idx = MergedIndex.load(tmp_path / "index")
    with pytest.raises(Corruption, match="removed: the next mount rebuilds it"):
        idx.get("a/x")
    assert not (tmp_path / "index").exists()
    blob[-2] ^= 0x01
    blob[len(INDEX_MAGIC) + 16 + 10] ^= 0x01  # in the table
    (tmp_path / "index").write_bytes(bytes(blob))
    with pytest.raises(Corruption):
        MergedIndex.load(tmp_path / "index")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(Corruption):
        MergedIndex.load(tmp_path / "empty")
