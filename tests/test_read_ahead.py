"""Directory read-ahead (Engine._read_ahead): small lower files opened in their directory's
listing order are prefilled ahead of the reader, while the loop waits for its next request.

In process, the engine writes to a pipe instead of /dev/fuse, so each NOTIFY_STORE it sends is
read back and checked: which node, which bytes, and that nothing is sent for a file opened out of
order, a damaged one, or one changed in the upper. Through a real mount, a reader going through
a directory in listing order gets every file's right content, changed files and a damaged one
included.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from cowfs import fuseproto as P
from cowfs.errors import Corruption
from cowfs.fuseengine import AHEAD_FILES, Engine
from cowfs.mounting import build_image_fs
from cowfs.rootfs import import_rootfs
from cowfs.store import Store
from tests.conftest import cowfs_mounted, need_fuse
from tests.test_integrity import digest_of, flip

N = 24  # small files in src/, more than AHEAD_FILES ahead of any reader


def _content(i: int) -> bytes:
    return b"".join(b"file %d line %d\n" % (i, j) for j in range(40 + 37 * i))


@pytest.fixture
def image(tmp_path: Path) -> tuple[Store, dict[str, bytes]]:
    tree = tmp_path / "tree"
    src = tree / "src"
    (src / "sub").mkdir(parents=True)
    content = {f"src/f{i:02d}.txt": _content(i) for i in range(N)}
    content["src/big.bin"] = random.Random(3).randbytes(600 << 10)  # over the prefill limit
    content["src/empty"] = b""
    content["src/sub/inner.txt"] = b"inner\n"
    for rel, data in content.items():
        (tree / rel).write_bytes(data)
    store = Store(tmp_path / "store")
    import_rootfs(store, tree, "src:1")
    return store, content


class _Harness:
    """An Engine over image src:1 with a pipe for its /dev/fuse; the src/ listing sent."""

    def __init__(self, store: Store, upper: Path | None = None) -> None:
        upper_s = str(upper) if upper else None
        work_s = str(upper.parent / "work") if upper else None
        if upper:
            upper.mkdir(parents=True)
            (upper.parent / "work").mkdir()
        self.fs = build_image_fs(store, "src:1", upper_s, work_s, upper is None)
        self.rfd, wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        self.engine = Engine(self.fs, wfd, "/nonexistent", passthrough=False)
        entry = self.engine._entry(P.ROOT_ID, "src", self.fs.getattr("src"))
        self.src = P.ENTRY_OUT.unpack_from(entry)[0]
        self.listing = [n for n, _ in self.fs.readdir("src") if n not in (".", "..")]
        offset = 0
        while True:  # READDIRPLUS until the end of the listing, as the kernel asks
            body = memoryview(P.READ_IN.pack(0, offset, 4096, 0, 0, 0, 0))
            out = self.engine._readdirplus(self.src, 0, 0, body)
            if not out:
                break
            offset += out.count(b".txt") + out.count(b"big.bin") + out.count(b"empty") \
                + out.count(b"sub\0")  # fmt: skip
        self.node = {name: n.id for (parent, name), n in self.engine._names.items()
                     if parent == self.src}  # fmt: skip
        self.small = [n for n in self.listing if n.endswith(".txt")]

    def open(self, name: str) -> int:
        out = self.engine._open(self.node[name], 0, 0, memoryview(P.OPEN_IN.pack(os.O_RDONLY, 0)))
        fh = P.OPEN_OUT.unpack_from(out)[0]
        self.engine._release(self.node[name], 0, 0, memoryview(P.RELEASE_IN.pack(fh, 0, 0, 0)))
        return fh

    def idle(self) -> None:
        """What the loop does while no request waits: every queued prefill."""
        while self.engine._ahead:
            self.engine._fetch_ahead(self.engine._ahead.pop(0))

    def stores(self) -> dict[int, bytes]:
        """NOTIFY_STOREs sent since the last call: node -> bytes stored at offset 0."""
        got: dict[int, bytes] = {}
        try:
            raw = os.read(self.rfd, 1 << 20)
        except BlockingIOError:
            return got
        while raw:
            size, code, _ = P.OUT_HEADER.unpack_from(raw)
            assert code == P.NOTIFY_STORE
            nid, offset, length, _ = P.NOTIFY_STORE_OUT.unpack_from(raw, P.OUT_HEADER.size)
            start = P.OUT_HEADER.size + P.NOTIFY_STORE_OUT.size
            assert offset == 0 and length == size - start
            got[nid] = raw[start:size]
            raw = raw[size:]
        return got

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.engine.fd)


def test_files_opened_in_listing_order_are_prefilled_ahead(image, tmp_path: Path) -> None:
    store, content = image
    h = _Harness(store)
    try:
        small, node = h.small, h.node
        assert len(small) == N
        # The first open prefills only itself: one file is no order yet.
        h.open(small[0])
        assert h.stores() == {node[small[0]]: content[f"src/{small[0]}"]}
        h.idle()
        assert h.stores() == {}
        # The second in a row starts the read-ahead: the next two, stored while idle, and
        # exactly their bytes. The big file, the empty one and the subdirectory are skipped.
        h.open(small[1])
        assert list(h.stores()) == [node[small[1]]]
        assert h.engine._ahead == [node[n] for n in small[2:4]]
        h.idle()
        assert h.stores() == {node[n]: content[f"src/{n}"] for n in small[2:4]}
        # Their own opens store nothing more; the window doubles up to AHEAD_FILES, and each
        # file is stored once, ahead of its open.
        windows, ahead = [], {}
        for i in range(2, 12):
            h.open(small[i])
            assert h.stores() == {}, small[i]
            windows.append(h.engine._window)
            h.idle()
            got = h.stores()
            assert not set(got) & set(ahead)
            assert node[small[i]] not in got
            ahead.update(got)
        assert windows == [4, 8, *[AHEAD_FILES] * 8]
        assert ahead == {node[n]: content[f"src/{n}"] for n in small[4 : 12 + AHEAD_FILES]}
        # An open out of order stops it: nothing queued, and the next in order restarts it
        # only after two in a row again.
        h.open(small[N - 1])  # not read ahead: its own open stores it
        assert h.stores() == {node[small[N - 1]]: content[f"src/{small[N - 1]}"]}
        assert h.engine._ahead == [] and h.engine._window == 0
        h.open(small[0])  # filled already: no store, no order
        assert h.engine._ahead == [] and h.stores() == {}
    finally:
        h.close()


def test_files_opened_out_of_order_are_never_prefilled_ahead(image) -> None:
    """A container's start opens libraries here and there: none of their neighbours is read."""
    store, _ = image
    h = _Harness(store)
    try:
        for i in (3, 0, 7, 5, 12, 2, 20):
            h.open(h.small[i])
            assert h.engine._ahead == []
            h.idle()
            assert list(h.stores()) == [h.node[h.small[i]]]
    finally:
        h.close()


def test_a_damaged_file_ahead_is_left_for_its_own_open_to_fail(image) -> None:
    store, content = image
    victim = "f03.txt"
    path, base, length = store.objects.location(digest_of(store, "src:1", f"src/{victim}"))
    flip(path, 12, span=(base, length))
    h = _Harness(store)
    try:
        order = h.small
        i = order.index(victim)
        assert i >= 2, "the victim must come after the two opens that start the read-ahead"
        h.open(order[i - 2])
        h.open(order[i - 1])
        assert h.node[victim] in h.engine._ahead
        h.stores()
        h.idle()
        stored = h.stores()
        assert h.node[victim] not in stored
        assert stored  # the one after it was stored all the same
        assert not h.engine._nodes[h.node[victim]].filled
        with pytest.raises(Corruption):
            h.open(victim)
        assert h.fs._handles == {}
    finally:
        h.close()


def test_a_file_changed_in_the_upper_is_not_prefilled_from_its_lower(image, tmp_path) -> None:
    store, content = image
    h = _Harness(store, tmp_path / "u" / "upper")
    try:
        order = h.small
        changed = order[3]
        fh = h.fs.open(f"src/{changed}", os.O_WRONLY)[0]  # copied up, as through another name
        h.fs.write(fh, b"NEW", 0)
        h.fs.release(fh)
        h.open(order[1])
        h.open(order[2])
        h.stores()
        h.idle()
        stored = h.stores()
        assert h.node[changed] not in stored
        assert h.node[order[4]] in stored
    finally:
        h.close()


def test_a_reader_in_listing_order_gets_every_file_right(image, tmp_path: Path) -> None:
    """Through a real mount: all of src/ read in listing order, twice (the second time from the
    page cache), with one file changed through the mount after the listing was read and one
    truncated by path; then once more after a file is damaged in the store and dropped from the
    caches: that one is EIO, every other file right."""
    need_fuse()
    store, content = image
    with cowfs_mounted(store, "src:1", tmp_path / "m") as (mnt, pid):
        names = os.listdir(mnt / "src")  # the listing: every node known to the daemon
        want = {n: content[f"src/{n}"] for n in names if n != "sub"}
        with open(mnt / "src" / names[5], "r+b") as f:
            f.write(b"changed")
        want[names[5]] = b"changed" + want[names[5]][7:]
        os.truncate(mnt / "src" / names[9], 5)
        want[names[9]] = want[names[9]][:5]
        for _ in range(2):
            got = {n: (mnt / "src" / n).read_bytes() for n in names if n != "sub"}
            assert got == want
        os.kill(pid, 0)
    victim = "f10.txt"
    path, base, length = store.objects.location(digest_of(store, "src:1", f"src/{victim}"))
    flip(path, 12, span=(base, length))
    with cowfs_mounted(store, "src:1", tmp_path / "m2") as (mnt, _):
        for n in os.listdir(mnt / "src"):
            if n == "sub":
                continue
            if n == victim:
                with pytest.raises(OSError) as caught:
                    (mnt / "src" / n).read_bytes()
                assert caught.value.errno == errno.EIO
            else:
                assert (mnt / "src" / n).read_bytes() == content[f"src/{n}"], n
