"""Integrity: damaged objects and TOCs are reported, never served as wrong bytes.

Bytes are flipped in stored objects (compressed seekable frames, their seek table and footer, raw
objects and their trailer) and in layer TOCs. Through a real mount, every read of an affected
file either fails with EIO or returns exactly the right bytes (a frame that is intact may still
be served); a read of the whole file fails with EIO; opening it for writing (a copy-up) fails
with EIO and leaves no half-copied file in the upper; the daemon keeps serving every other file.
`cowfs fsck` exits 3 and names each broken object or layer with the images and paths it breaks.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cowfs.objects import FRAME_SIZE
from cowfs.rootfs import import_rootfs
from cowfs.store import Store
from tests.conftest import cowfs_mounted, need_fuse

CHUNK = 64 * 1024


def cowfs_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from cowfs.cli import main; main()", "--root", str(root)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def files() -> dict[str, bytes]:
    rng = random.Random(1)
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(20_000))
    return {
        "data/raw.bin": rng.randbytes(3 * FRAME_SIZE + 1000),  # incompressible: a raw object
        "data/text.txt": text,  # ~600 KiB, zstd seekable, several frames
        "data/small.txt": b"a small file\n" * 10,  # one frame
        "keep/other.txt": b"".join(b"other %d\n" % i for i in range(30_000)),
        "keep/another.bin": rng.randbytes(200_000),
    }


@pytest.fixture
def image(tmp_path: Path) -> tuple[Store, dict[str, bytes]]:
    need_fuse()
    tree = tmp_path / "tree"
    content = files()
    for rel, data in content.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    store = Store(tmp_path / "store")
    import_rootfs(store, tree, "victim:1")
    # A second image holds the same text at another path: fsck must name both.
    tree2 = tmp_path / "tree2"
    (tree2 / "copy").mkdir(parents=True)
    (tree2 / "copy" / "text-again.txt").write_bytes(content["data/text.txt"])
    import_rootfs(store, tree2, "bystander:2")
    return store, content


def digest_of(store: Store, ref: str, rel: str) -> str:
    for layer in store.resolve(ref).layers:
        e = store.load_toc(layer).entries.get(rel)
        if e is not None:
            return e.digest
    raise AssertionError(f"{rel} not in {ref}")


def flip(path: Path, offset: int, count: int = 1, span: tuple[int, int] | None = None) -> None:
    """XOR `count` bytes at `offset` (negative: from the end) of a stored file, or of the span
    (start, length) of it that holds an object (a pack holds many)."""
    data = bytearray(path.read_bytes())
    base, length = span if span is not None else (0, len(data))
    start = base + (offset if offset >= 0 else length + offset)
    for i in range(start, start + count):
        data[i] ^= 0xA5
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def assert_eio_never_wrong(path: Path, want: bytes) -> None:
    """Chunked reads give EIO or the right bytes; the whole file gives EIO."""
    for off in range(0, len(want), CHUNK):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            continue
        try:
            got = os.pread(fd, CHUNK, off)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
        else:
            assert got == want[off : off + CHUNK], f"{path}: wrong bytes at {off}"
        finally:
            os.close(fd)
    with pytest.raises(OSError) as caught:
        path.read_bytes()
    assert caught.value.errno == errno.EIO


# Where to damage an object: (name, file, offset for an object of n frames: >= 0 from the
# start, < 0 from the end). Seekable objects end with a skippable header (8 bytes), one seek entry
# per frame (12: compressed size, decompressed size, checksum) and a footer (9); raw objects with
# a checksum per frame (4) and a trailer (20: size, frame size, magic).
DAMAGE = [
    ("zstd-frame-data", "data/text.txt", lambda n: 200),
    ("zstd-last-frame", "data/text.txt", lambda n: -(9 + n * 12 + 8 + 40)),
    ("seek-table-csize", "data/text.txt", lambda n: -(9 + n * 12)),
    ("seek-table-dsize", "data/text.txt", lambda n: -(9 + n * 12) + 4),
    ("seek-table-checksum", "data/text.txt", lambda n: -(9 + n * 12) + 8),
    ("seek-footer", "data/text.txt", lambda n: -3),
    ("raw-data", "data/raw.bin", lambda n: FRAME_SIZE + 17),
    ("raw-trailer-checksum", "data/raw.bin", lambda n: -(20 + n * 4)),
    ("raw-trailer-size", "data/raw.bin", lambda n: -20),
    ("one-frame-object", "data/small.txt", lambda n: 10),
]


@pytest.mark.parametrize("where, rel, offset", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_object_gives_eio_and_fsck_names_it(tmp_path: Path, image, where: str, rel: str,
                                                    offset: Callable[[int], int]
                                                    ) -> None:  # fmt: skip
    store, content = image
    digest = digest_of(store, "victim:1", rel)
    frames = -(-len(content[rel]) // FRAME_SIZE)
    path, base, length = store.objects.location(digest)  # a loose file or a span of a pack
    flip(path, offset(frames), span=(base, length))

    with cowfs_mounted(store, "victim:1", tmp_path / "m") as (mnt, pid):
        assert_eio_never_wrong(mnt / rel, content[rel])
        # Copy-up of the damaged file fails and leaves nothing half-copied behind.
        with pytest.raises(OSError) as caught:
            os.open(mnt / rel, os.O_RDWR)
        assert caught.value.errno == errno.EIO
        assert not (tmp_path / "m" / "upper" / rel).exists()
        assert os.listdir(tmp_path / "m" / "work") == []
        # Every other file is served, by the same daemon.
        for other, data in content.items():
            if other != rel:
                assert (mnt / other).read_bytes() == data, other
        os.kill(pid, 0)

    proc = cowfs_cli(store.root, "fsck")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"object {digest}:" in proc.stdout
    assert f"affects victim:1: /{rel}" in proc.stdout
    if rel == "data/text.txt":
        assert "affects bystander:2: /copy/text-again.txt" in proc.stdout
    assert "keep/" not in proc.stdout


def test_damage_while_mounted_never_serves_wrong_bytes(tmp_path: Path, image) -> None:
    store, content = image
    with cowfs_mounted(store, "victim:1", tmp_path / "m") as (mnt, _pid):
        assert (mnt / "keep/other.txt").read_bytes() == content["keep/other.txt"]
        for rel in ("data/text.txt", "data/raw.bin"):
            path, base, length = store.objects.location(digest_of(store, "victim:1", rel))
            flip(path, length // 2, span=(base, length))
            assert_eio_never_wrong(mnt / rel, content[rel])
        assert (mnt / "keep/another.bin").read_bytes() == content["keep/another.bin"]


def test_missing_object_is_an_error_not_an_empty_file(tmp_path: Path, image) -> None:
    store, content = image
    digest = digest_of(store, "victim:1", "data/raw.bin")
    store.objects.path(digest).unlink()
    with cowfs_mounted(store, "victim:1", tmp_path / "m") as (mnt, _pid):
        with pytest.raises(OSError) as caught:
            (mnt / "data/raw.bin").read_bytes()
        assert caught.value.errno == errno.EIO  # the layer names it: its absence is damage
        assert (mnt / "data/text.txt").read_bytes() == content["data/text.txt"]
    proc = cowfs_cli(store.root, "fsck")
    assert proc.returncode == 3
    assert f"object {digest}: missing" in proc.stdout
    assert "affects victim:1: /data/raw.bin" in proc.stdout


@pytest.mark.parametrize("offset", [40, -30], ids=["toc-body", "toc-tail"])
def test_damaged_toc_is_refused_and_named(tmp_path: Path, image, offset: int) -> None:
    store, content = image
    (layer,) = store.resolve("victim:1").layers
    toc = store.layer_dir(layer) / "toc"
    flip(toc, offset)

    proc = cowfs_cli(store.root, "fsck")
    assert proc.returncode == 3, proc.stdout
    assert f"layer {layer}:" in proc.stdout and "affects victim:1" in proc.stdout
    assert "bystander" not in proc.stdout

    # With no index cached, the mount refuses the image with one line, not a traceback.
    for cached in store.cache_dir.glob("index-*"):
        cached.unlink()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = cowfs_cli(store.root, "mount", "--read-only", "victim:1", str(mnt))
    assert proc.returncode != 0
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    with open("/proc/self/mountinfo") as f:
        assert str(mnt) not in f.read()


def test_damaged_index_cache_is_rebuilt(tmp_path: Path, image) -> None:
    store, content = image
    with cowfs_mounted(store, "victim:1", tmp_path / "m"):
        pass  # caches the merged index
    (cached,) = store.cache_dir.glob(f"index-{store.resolve('victim:1').id}-*")
    flip(cached, 60, 8)
    with cowfs_mounted(store, "victim:1", tmp_path / "m") as (mnt, _pid):
        for rel, data in content.items():
            assert (mnt / rel).read_bytes() == data
    assert cowfs_cli(store.root, "fsck").returncode == 0


def test_a_damaged_small_file_fails_its_first_open_and_leaves_no_handle(image) -> None:
    """The native engine reads a small lower file whole at its first open (Engine._prefill):
    damage is EIO at that open, and the handle the union opened for it is released, in the
    engine's node and in the union alike. In process, without a kernel: nothing is written to
    /dev/fuse before the content is verified."""
    from cowfs import fuseproto as P
    from cowfs.errors import Corruption
    from cowfs.fuseengine import Engine
    from cowfs.mounting import build_image_fs

    store, content = image
    rel = "data/small.txt"
    path, base, length = store.objects.location(digest_of(store, "victim:1", rel))
    flip(path, 10, span=(base, length))
    fs = build_image_fs(store, "victim:1", None, None, True)
    engine = Engine(fs, -1, "/nonexistent", passthrough=False)
    data = engine._entry(P.ROOT_ID, "data", fs.getattr("data"))
    data_id = P.ENTRY_OUT.unpack_from(data)[0]
    small_id = P.ENTRY_OUT.unpack_from(engine._entry(data_id, "small.txt", fs.getattr(rel)))[0]
    open_in = memoryview(P.OPEN_IN.pack(os.O_RDONLY, 0))
    for _ in range(3):
        with pytest.raises(Corruption):
            engine._open(small_id, 0, 0, open_in)
    assert engine._nodes[small_id].fhs == [] and not engine._nodes[small_id].filled
    assert fs._handles == {}
    # The control: an intact small file of the same image opens, holds its handle until its
    # release, and reads right (its store to the page cache fails here, on fd -1: it is then
    # read by READ requests, as without prefill).
    keep = P.ENTRY_OUT.unpack_from(engine._entry(P.ROOT_ID, "keep", fs.getattr("keep")))[0]
    intact = P.ENTRY_OUT.unpack_from(
        engine._entry(keep, "another.bin", fs.getattr("keep/another.bin")))[0]
    fh = P.OPEN_OUT.unpack_from(engine._open(intact, 0, 0, open_in))[0]
    assert engine._nodes[intact].fhs == [fh] and list(fs._handles) == [fh]
    assert bytes(fs.read(fh, 1 << 20, 0)) == content["keep/another.bin"]
    engine._release(intact, 0, 0, memoryview(P.RELEASE_IN.pack(fh, 0, 0, 0)))
    assert engine._nodes[intact].fhs == [] and fs._handles == {}
