from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs import hostdir, objects
from cowfs.errors import Corruption, NotFound
from cowfs.objects import FRAME_SIZE, ObjectStore, digest_bytes

from .conftest import ext4_mounted, need_root, need_tool


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "objects", tmp_path / "tmp")


def text(n: int) -> bytes:
    line = b"the quick brown fox jumps over the lazy dog %d\n"
    out = b"".join(line % i for i in range(n // 40 + 1))
    return out[:n]


SIZES = [0, 1, 100, FRAME_SIZE - 1, FRAME_SIZE, FRAME_SIZE + 1, 5 * FRAME_SIZE + 7]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["text", "random"])
def test_roundtrip_and_random_access(store: ObjectStore, size: int, kind: str) -> None:
    data = text(size) if kind == "text" else os.urandom(size)
    d = store.put_bytes(data)
    assert d == digest_bytes(data)
    assert store.read(d) == data
    with store.open(d) as r:
        assert r.size == size
        for off, n in [(0, 10), (size // 2, 4096), (max(0, size - 3), 100), (FRAME_SIZE - 2, 5)]:
            assert r.pread(n, off) == data[off : off + n]
        assert r.pread(10, size + 5) == b""
    store.verify(d)


def test_stream_matches_bytes_and_is_idempotent(store: ObjectStore) -> None:
    data = text(3 * FRAME_SIZE + 99)
    d1 = store.put_stream(io.BytesIO(data))
    d2 = store.put_bytes(data)
    assert d1 == d2
    assert list(store) == [d1]
    assert store.read(d1) == data


def test_incompressible_is_raw_and_compressible_is_seekable(store: ObjectStore) -> None:
    rnd = os.urandom(2 * FRAME_SIZE + 5)
    d = store.put_stream(io.BytesIO(rnd))
    raw = store.path(d).read_bytes()
    assert raw.startswith(rnd) and raw.endswith(b"COWRAW01")
    assert store.read(d) == rnd
    d2 = store.put_bytes(text(4 * FRAME_SIZE))
    assert store.stored_size(d2) < FRAME_SIZE


def test_plain_zstd_reads_seekable_objects(store: ObjectStore, tmp_path: Path) -> None:
    need_tool("zstd")
    data = text(3 * FRAME_SIZE + 1)
    d = store.put_bytes(data)
    out = subprocess.run(["zstd", "-dc", str(store.path(d))], capture_output=True, check=True)
    assert out.stdout == data


@pytest.mark.parametrize("kind", ["text", "random"])
def test_flipped_byte_is_corruption_not_wrong_bytes(store: ObjectStore, kind: str) -> None:
    data = text(3 * FRAME_SIZE) if kind == "text" else os.urandom(3 * FRAME_SIZE)
    d = store.put_bytes(data)
    p = store.path(d)
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 3] ^= 0x40
    os.chmod(p, 0o644)
    p.write_bytes(bytes(blob))
    fresh = ObjectStore(store.root, store.tmp)  # no cached frames
    with pytest.raises(Corruption):
        fresh.read(d)
    with pytest.raises(Corruption):
        fresh.verify(d)


@contextlib.contextmanager
def target_dir(tmp_path: Path, where: str) -> Iterator[Path]:
    """Where a copy goes: beside the store, or on a tmpfs of its own (another filesystem, which
    copy_file_range refuses to copy to)."""
    if where == "same-fs":
        yield tmp_path
        return
    with tmpfs(tmp_path / "other") as other:
        yield other


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A tmpfs of the test's own at `path` (mount options e.g. "size=1m"), unmounted after."""
    need_root()
    path.mkdir()
    opts = ["-o", ",".join(options)] if options else []
    subprocess.run(["mount", "-t", "tmpfs", *opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("kind", ["text", "random"])
@pytest.mark.parametrize("read", [objects._COPY_READ, 3 * FRAME_SIZE], ids=["big", "batched"])
@pytest.mark.parametrize("sized", [False, True], ids=["empty", "sized"])
@pytest.mark.parametrize("where", ["same-fs", "other-fs"])
def test_copy_into_writes_verified_bytes_and_keeps_zero_frames_as_holes(
    store: ObjectStore, tmp_path: Path, kind: str, read: int, sized: bool, where: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """`sized`: the target has its size already, as a copy-up's has (a raw object's copy is
    then verified in the target). `where`: the target is on the store's filesystem or not."""
    monkeypatch.setattr(objects, "_COPY_READ", read)  # several reads, several writes
    monkeypatch.setattr(objects, "_COPY_STEP", read)

    def body(n: int) -> bytes:
        return text(n) if kind == "text" else os.urandom(n)

    # Zero frames amid data (few enough that random data still stores raw), a partial last frame.
    data = body(FRAME_SIZE) + bytes(FRAME_SIZE) + body(40 * FRAME_SIZE) + bytes(2 * FRAME_SIZE)
    data += body(1000)
    d = store.put_bytes(data)
    assert store.stored_size(d) < len(data) if kind == "text" else store.stored_size(d) > len(data)
    with target_dir(tmp_path, where) as target:
        fd = os.open(target / "copy", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if sized:
                os.ftruncate(fd, len(data))
            with store.open(d) as r:
                r.copy_into(fd)
            os.ftruncate(fd, len(data))
            assert os.pread(fd, len(data) + 1, 0) == data
            assert os.lseek(fd, FRAME_SIZE, os.SEEK_HOLE) == FRAME_SIZE  # the zero frame: a hole
        finally:
            os.close(fd)


@pytest.mark.parametrize("kind", ["text", "random"])
@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_copy_into_leaves_its_objects_page_cache_as_it_found_it(tmp_path: Path, kind: str,
                                                               cached: bool) -> None:  # fmt: skip
    """A copy of an object none of whose frames were cached drops each stretch it has copied
    (the copy serves reads from then on); an object some reader has cached stays cached. On a
    disk filesystem of its own: a tmpfs' pages cannot be dropped."""
    with ext4_mounted(tmp_path / "ext4", journal=True) as fs:
        store = ObjectStore(fs / "objects", fs / "tmp")
        n = 3 * objects._COPY_STEP + 12345  # several stretches, a partial last one
        data = text(n) if kind == "text" else os.urandom(n)
        d = store.put_bytes(data)
        assert store.stored_size(d) < n if kind == "text" else store.stored_size(d) > n
        obj = os.open(store.path(d), os.O_RDONLY)
        try:
            os.fsync(obj)
            os.posix_fadvise(obj, 0, 0, os.POSIX_FADV_DONTNEED)
            if cached:
                os.pread(obj, 1 << 20, 0)  # a reader's: the copy must not evict it
            before = hostdir.cached_pages(obj)
            assert before is not None, "cachestat(2) needs Linux 6.5"
            fd = os.open(fs / "copy", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, n)
                with store.open(d) as r:
                    r.copy_into(fd)
                assert os.pread(fd, n + 1, 0) == data
            finally:
                os.close(fd)
            after = hostdir.cached_pages(obj)
            whole = (store.stored_size(d) + 4095) // 4096
            if cached:
                assert before > 0 and after == whole  # read whole by the copy, and kept
            else:
                assert before == 0
                assert after is not None and after <= 8  # at most the seek table, at the end
        finally:
            os.close(obj)


class _InlineQueue:
    """Stands in for the prefetcher's queue: each hint is carried out at once, in the caller."""

    def put(self, item: tuple[int, int, object]) -> None:
        objects._prefetch_now(*item)  # type: ignore[arg-type]


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_a_streaming_read_asks_ahead_and_leaves_the_page_cache_as_it_found_it(
        tmp_path: Path, cached: bool, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A sequential read of a big raw object, 1 MiB at a time as the kernel's readahead asks:
    the next _PREFETCH is read ahead whole (in hints the kernel does not cut short), and an
    object none of whose bytes were cached when the read began keeps no more than the last
    stretches cached; one a reader had cached stays cached. The prefetcher's work is done
    inline, so what it did is known when the read returns."""
    monkeypatch.setattr(objects, "_prefetch_queue", _InlineQueue())
    with ext4_mounted(tmp_path / "ext4", journal=True, mib=96) as fs:
        store = ObjectStore(fs / "objects", fs / "tmp")
        step, ahead = 1 << 20, objects._PREFETCH
        n = 5 * ahead + 12345
        data = os.urandom(n)
        d = store.put_bytes(data)
        obj = os.open(store.path(d), os.O_RDONLY)
        try:
            os.fsync(obj)
            os.posix_fadvise(obj, 0, 0, os.POSIX_FADV_DONTNEED)
            if cached:
                assert os.pread(obj, n + 1, 0)[:n] == data
            whole = hostdir.cached_pages(obj)
            assert whole is not None, "cachestat(2) needs Linux 6.5"
            with store.open(d) as r:
                for at in range(0, n, step):
                    assert r.pread(step, at) == data[at : at + step]
                    if at + step == ahead:  # the read that asks for [2 ahead, 3 ahead)
                        assert hostdir.cached_pages(obj, 2 * ahead, ahead) == ahead // 4096
            after = hostdir.cached_pages(obj)
            if cached:
                assert whole == (store.stored_size(d) + 4095) // 4096 and after == whole
            else:
                assert whole <= 1  # the page of the trailer, read at open
                assert after is not None and after * 4096 <= 2 * ahead
        finally:
            os.close(obj)


@pytest.mark.parametrize("kind", ["text", "random"])
@pytest.mark.parametrize("sized", [False, True], ids=["empty", "sized"])
@pytest.mark.parametrize("step", [objects._COPY_STEP, 3 * FRAME_SIZE], ids=["one", "stretches"])
def test_copy_into_refuses_a_damaged_frame(store: ObjectStore, tmp_path: Path, kind: str,
                                           sized: bool, step: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """`stretches`: a raw object is copied a stretch at a time by a thread, while the stretch
    before is verified; the damage is in a stretch of its own."""
    monkeypatch.setattr(objects, "_COPY_STEP", step)
    data = text(20 * FRAME_SIZE) if kind == "text" else os.urandom(20 * FRAME_SIZE)
    d = store.put_bytes(data)
    p = store.path(d)
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    os.chmod(p, 0o644)
    p.write_bytes(bytes(blob))
    fd = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    if sized:
        os.ftruncate(fd, len(data))
    try:
        with ObjectStore(store.root, store.tmp).open(d) as r, pytest.raises(Corruption):
            r.copy_into(fd)
    finally:
        os.close(fd)


def test_a_raw_object_cut_short_fails_its_copy(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(20 * FRAME_SIZE)
    d = store.put_bytes(data)
    with store.open(d) as r:
        p = store.path(d)
        os.chmod(p, 0o644)
        os.truncate(p, 10 * FRAME_SIZE)  # the reader has read the seek table already
        fd = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, len(data))
            with pytest.raises(Corruption, match="shorter than its trailer says"):
                r.copy_into(fd)
        finally:
            os.close(fd)


def test_a_failure_of_the_copier_thread_is_the_copys(store: ObjectStore, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw object is copied a stretch at a time by a thread of its own: its failure (here a
    full filesystem) is raised by copy_into, which returns only once that thread is done."""
    monkeypatch.setattr(objects, "_COPY_STEP", 3 * FRAME_SIZE)
    d = store.put_bytes(os.urandom(20 * FRAME_SIZE))
    with tmpfs(tmp_path / "small", "size=1m") as small:
        fd = os.open(small / "copy", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 20 * FRAME_SIZE)
            with store.open(d) as r, pytest.raises(OSError) as exc:
                r.copy_into(fd)
            assert exc.value.errno == errno.ENOSPC
            assert threading.active_count() == 1
        finally:
            os.close(fd)


def test_truncated_object_is_corruption(store: ObjectStore) -> None:
    d = store.put_bytes(text(2 * FRAME_SIZE))
    p = store.path(d)
    os.chmod(p, 0o644)
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(Corruption):
        ObjectStore(store.root, store.tmp).read(d)


def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        store.open("0" * 32)
    with pytest.raises(NotFound):
        store.path("../../etc/passwd")


def test_no_temp_files_left(store: ObjectStore) -> None:
    store.put_stream(io.BytesIO(os.urandom(3 * FRAME_SIZE)))
    store.put_stream(io.BytesIO(text(3 * FRAME_SIZE)))
    assert os.listdir(store.tmp) == []


def test_frame_size_is_the_unit_of_work() -> None:
    assert objects.FRAME_SIZE % 4096 == 0


def test_put_many_stores_what_put_bytes_stores(tmp_path: Path) -> None:
    datas = [text(n) for n in (1, 500, FRAME_SIZE, 3 * FRAME_SIZE + 11)] + [os.urandom(9000)]
    one = ObjectStore(tmp_path / "one", tmp_path / "tmp")
    many = ObjectStore(tmp_path / "many", tmp_path / "tmp")
    digests = [one.put_bytes(d) for d in datas]
    many.put_many([(d, digest_bytes(d)) for d in datas] + [(datas[0], digests[0])])
    assert sorted(many) == sorted(digests)
    for d, digest in zip(datas, digests, strict=True):
        assert many.path(digest).read_bytes() == one.path(digest).read_bytes()
        assert many.read(digest) == d


# -- packs -----------------------------------------------------------------------------------


def _pack(store: ObjectStore, datas: list[bytes]) -> list[str]:
    w = store.pack_writer()
    digests = [digest_bytes(d) for d in datas]
    w.append(list(zip(digests, objects.encode_many(datas), strict=True)))
    w.publish()
    return digests


def test_packed_objects_copy_into_like_loose_ones(store: ObjectStore, tmp_path: Path) -> None:
    datas = [text(3 * FRAME_SIZE + 5), os.urandom(FRAME_SIZE) + bytes(FRAME_SIZE) + b"y", b"x",
             os.urandom(2 * FRAME_SIZE + 7)]  # the last incompressible: a packed raw object
    for d, data in zip(_pack(store, datas), datas, strict=True):
        assert store.packed(d)
        fd = os.open(tmp_path / d, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, len(data))
            with store.open(d) as r:
                r.copy_into(fd)
            assert os.pread(fd, len(data) + 1, 0) == data
        finally:
            os.close(fd)


def test_packed_objects_read_like_loose_ones(store: ObjectStore) -> None:
    datas = [text(100), os.urandom(5000), text(3 * FRAME_SIZE + 5), b"x"]
    w = store.pack_writer()
    digests = [digest_bytes(d) for d in datas]
    w.append(list(zip(digests, objects.encode_many(datas), strict=True)))
    assert not any(store.has(d) for d in digests)  # nothing visible before publish
    assert os.listdir(store.tmp)  # staged
    (name,) = w.publish()
    assert os.listdir(store.tmp) == []
    for d, data in zip(digests, datas, strict=True):
        assert store.has(d) and store.packed(d)
        assert store.read(d) == data
        with store.open(d) as r:
            assert r.size == len(data) and r.pread(7, 3) == data[3:10]
        store.verify(d)
        path, off, length = store.location(d)
        assert path == store.pack_path(name) and store.stored_size(d) == length
    assert list(store) == digests  # pack order
    assert list(store.packs()) == [name]
    # Another store object (another process) sees the pack; a pack added later is found too.
    other = ObjectStore(store.root, store.tmp)
    assert other.read(digests[0]) == datas[0]
    (late,) = _pack(store, [b"published later"])
    assert other.read(late) == b"published later"


def test_damaged_packed_object_and_pack_index(store: ObjectStore) -> None:
    d1, d2 = _pack(store, [text(2 * FRAME_SIZE), b"second object"])
    path, off, length = store.location(d1)
    blob = bytearray(path.read_bytes())
    blob[off + length // 2] ^= 0x40
    os.chmod(path, 0o644)
    path.write_bytes(bytes(blob))
    fresh = ObjectStore(store.root, store.tmp)
    with pytest.raises(Corruption):
        fresh.read(d1)
    assert fresh.read(d2) == b"second object"  # its neighbour is intact
    blob[-30] ^= 0x40  # the index: the pack's objects can no longer be found
    path.write_bytes(bytes(blob))
    fresh = ObjectStore(store.root, store.tmp)
    assert not fresh.has(d2)
    assert list(fresh.damaged_packs) == [path.name.removesuffix(".pack")]
    assert "checksum" in fresh.damaged_packs[path.name.removesuffix(".pack")]


def test_remove_and_rewrite_pack(store: ObjectStore) -> None:
    datas = [text(1000 + i) for i in range(5)]
    digests = _pack(store, datas)
    store.remove(digests[1])
    assert not store.has(digests[1])
    (name,) = store.packs()
    dropped, freed = store.rewrite_pack(name, lambda d: d == digests[0])
    assert dropped == 3 and freed > 0
    assert [d for d in digests if store.has(d)] == [digests[0]]
    assert store.read(digests[0]) == datas[0]
    (name,) = store.packs()
    store.rewrite_pack(name, lambda d: False)
    assert store.packs() == {} and os.listdir(store.packs_dir) == []


def test_discarded_writer_leaves_nothing(store: ObjectStore) -> None:
    w = store.pack_writer()
    w.append([(digest_bytes(b"a"), objects.encode(b"a"))])
    w.discard()
    assert os.listdir(store.tmp) == [] and not store.has(digest_bytes(b"a"))


def test_duplicates_across_packs_and_loose(store: ObjectStore) -> None:
    (d,) = _pack(store, [b"twice"])
    _pack(store, [b"twice"])
    store.put_bytes(b"twice")
    assert list(store) == [d] and store.read(d) == b"twice"
    for name in list(store.packs()):
        store.rewrite_pack(name, lambda _: False)
    assert store.read(d) == b"twice"  # the loose copy


def test_first_lookups_scan_the_packs_and_agree_with_the_merged_index(store: ObjectStore) -> None:
    # A fresh store (a FUSE daemon) answers its first lookups from the packs' raw indexes,
    # without merging them; the answers are the merged index's (first pack by name wins).
    first = _pack(store, [b"alpha", b"shared", text(300)])
    second = _pack(store, [b"shared", b"omega"])
    fresh = ObjectStore(store.root, store.tmp)
    digests = first + second + [digest_bytes(b"absent")]
    scanned = [fresh._packed(d) for d in digests]
    assert fresh._loc is None  # nothing merged yet
    merged = ObjectStore(store.root, store.tmp)
    merged.refresh()
    assert scanned == [merged._packed(d) for d in digests]
    assert scanned[-1] is None and fresh.read(first[1]) == b"shared"
    for _ in range(objects._SCAN_LOOKUPS):
        fresh.has(first[0])
    assert fresh._loc is not None  # past the scan budget the merged index is built
    assert [fresh._packed(d) for d in digests] == scanned


@pytest.mark.parametrize("head, tail", [("random", "text"), ("text", "random"),
                                        ("random", "random")])  # fmt: skip
def test_long_streams_judged_on_their_head(store: ObjectStore, head: str, tail: str) -> None:
    """Past the probe (8 frames), an incompressible head makes the object raw at once; either
    way every byte reads back and verifies."""
    part = {"random": lambda n: os.urandom(n), "text": text}
    data = part[head](10 * FRAME_SIZE) + part[tail](6 * FRAME_SIZE + 17)
    d = store.put_stream(io.BytesIO(data))
    assert d == digest_bytes(data) and store.read(d) == data
    store.verify(d)
    raw = store.path(d).read_bytes().endswith(b"COWRAW01")
    assert raw == (head == "random")
    with store.open(d) as r:
        assert r.pread(100, 9 * FRAME_SIZE - 50) == data[9 * FRAME_SIZE - 50 : 9 * FRAME_SIZE + 50]
    assert os.listdir(store.tmp) == []


def test_a_big_content_is_looked_for_loose_first_and_found_packed_too(store: ObjectStore) -> None:
    """open(digest, size) of content past PACK_MAX_OBJECT tries the loose file first (no pack
    index read); a compressible one that is packed after all is still found."""
    packed = text(8 * FRAME_SIZE)  # 1 MiB of text: stored in far fewer than PACK_MAX_OBJECT
    assert len(packed) > objects.PACK_MAX_OBJECT
    (d_packed,) = _pack(store, [packed])
    loose = os.urandom(3 * FRAME_SIZE)
    d_loose = store.put_bytes(loose)
    fresh = ObjectStore(store.root, store.tmp)  # no pack index read yet
    with fresh.open(d_loose, len(loose)) as r:
        assert r.pread(len(loose), 0) == loose
    assert fresh._raw is None and fresh._loc is None  # found without reading any pack index
    with fresh.open(d_packed, len(packed)) as r:
        assert r.pread(len(packed), 0) == packed
