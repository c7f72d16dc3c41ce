"""The image store: objects, layers, images and tags under one root directory.

Vocabulary (as containerd's snapshotter defines its own once):
  * an *object* is file content, named by the xxh128 of its bytes (objects.py);
  * a *layer* is a TOC (toc.py) naming objects, plus the OCI digests it was imported from; its id is
    the sha256 of its canonical TOC, so the same tree imported twice is one layer;
  * an *image* is an ordered list of layer ids (bottom first) plus an OCI image config; its id is
    the sha256 of both, so images are content-addressed too;
  * a *tag* is a `name:tag` pointing at an image id.

Everything is staged under tmp/ and becomes visible by one rename: a crash or an error never
leaves a half-written layer or image in sight. A layer's small objects go to packs, in the order
they were added (objects.py); packs are closed, made durable with one syncfs and renamed into
place before the layer that references them is published; the TOC, image and tag files are
fsynced and renamed.
Layers and objects are never deleted here: gc (maintenance.py) removes what nothing references.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from cowfs.atomic import fsync_dir, write_atomic, write_json_atomic
from cowfs.errors import InvalidInput, NotFound
from cowfs.objects import PACK_MAX_OBJECT, ObjectStore, digest_bytes, encode_many
from cowfs.toc import REG, Entry, Toc

if TYPE_CHECKING:  # imported where used: it loads logging, ~8 ms of every CLI start
    from concurrent.futures import Future, ThreadPoolExecutor

# Files up to this size are read whole and compressed on a worker thread (zstd drops the GIL);
# larger ones stream frame by frame (on the caller's thread) so that memory stays bounded.
_SMALL_FILE = 64 * 1024 * 1024
_BATCH_BYTES = 4 * 1024 * 1024
_BATCH_FILES = 128
_MAX_PENDING_BATCHES = 4
# Workers overlap one batch's file writes (syscalls, no GIL) with another's compression.
_WORKERS = 2


def normalize_ref(ref: str) -> str:
    """'busybox' -> 'busybox:latest'; 'host:5000/a/b' -> 'host:5000/a/b:latest'."""
    ref = ref.strip()
    if not ref or any(c.isspace() for c in ref) or "\0" in ref:
        raise InvalidInput(f"invalid image reference {ref!r}")
    if "@" in ref:
        return ref
    last = ref.rpartition("/")[2]
    return ref if ":" in last else ref + ":latest"


@dataclass(frozen=True, slots=True)
class Image:
    id: str
    layers: list[str]  # layer ids, bottom first
    config: dict[str, Any]  # the OCI image config (architecture, os, config, rootfs, history)
    created: float = 0.0

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass(slots=True)
class LayerMeta:
    id: str
    diff_id: str | None = None  # sha256 of the uncompressed tar, when known
    blobs: dict[str, str] = field(default_factory=dict)  # blob digest -> media type
    size: int = 0  # content bytes
    entries: int = 0
    created: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"diff_id": self.diff_id, "blobs": self.blobs, "size": self.size,
                "entries": self.entries, "created": self.created}  # fmt: skip


class Store:
    """One store root. Safe for several processes: mutations of tags take a file lock."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).absolute()
        for sub in ("objects", "layers", "images", "tmp", "cache", "containers"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.objects = ObjectStore(self.root / "objects", self.root / "tmp")
        self._tocs: dict[str, Toc] = {}
        self._lock = threading.Lock()

    # -- paths ------------------------------------------------------------------------------

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def containers_dir(self) -> Path:
        return self.root / "containers"

    def layer_dir(self, layer_id: str) -> Path:
        _check_hex(layer_id, 64, "layer id")
        return self.root / "layers" / layer_id

    def mkdtemp(self, prefix: str) -> Path:
        path = self.tmp / f"{prefix}.{os.getpid()}.{os.urandom(6).hex()}"
        path.mkdir()
        return path

    @contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on the store's names (tags, image files) across processes."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- layers -----------------------------------------------------------------------------

    def new_layer(self) -> LayerBuilder:
        return LayerBuilder(self)

    def has_layer(self, layer_id: str) -> bool:
        return (self.layer_dir(layer_id) / "toc").exists()

    def load_toc(self, layer_id: str) -> Toc:
        toc = self._tocs.get(layer_id)
        if toc is None:
            try:
                blob = (self.layer_dir(layer_id) / "toc").read_bytes()
            except FileNotFoundError:
                raise NotFound(f"layer {layer_id[:12]} not found") from None
            toc = Toc.loads(blob, expect_id=layer_id)
            self._tocs[layer_id] = toc
        return toc

    def layer_meta(self, layer_id: str) -> LayerMeta:
        try:
            doc = json.loads((self.layer_dir(layer_id) / "meta.json").read_bytes())
        except FileNotFoundError:
            raise NotFound(f"layer {layer_id[:12]} not found") from None
        blobs = dict(doc.get("blobs") or {})
        return LayerMeta(layer_id, doc.get("diff_id"), blobs, doc.get("size", 0),
                         doc.get("entries", 0), doc.get("created", 0.0))  # fmt: skip

    def update_layer_meta(self, layer_id: str, *, diff_id: str | None = None,
                          blobs: dict[str, str] | None = None) -> None:  # fmt: skip
        """Record OCI digests learned later (e.g. when a layer is exported or pushed)."""
        with self.locked():
            meta = self.layer_meta(layer_id)
            if diff_id and not meta.diff_id:
                meta.diff_id = diff_id
            meta.blobs.update(blobs or {})
            write_json_atomic(self.layer_dir(layer_id) / "meta.json", meta.to_json())

    def layers(self) -> list[str]:
        return sorted(p.name for p in (self.root / "layers").iterdir() if (p / "toc").exists())

    def layer_by_digest(self, digest: str) -> str | None:
        """The layer whose diff_id or one of whose blob digests is `digest`, if any."""
        for layer_id in self.layers():
            try:
                meta = self.layer_meta(layer_id)
            except NotFound:
                continue
            if meta.diff_id == digest or digest in meta.blobs:
                return layer_id
        return None

    # -- images and tags --------------------------------------------------------------------

    def add_image(self, layers: list[str], config: dict[str, Any],
                  tags: list[str] | tuple[str, ...] = ()) -> str:  # fmt: skip
        """Publish an image made of stored layers; returns its id. Idempotent."""
        for layer_id in layers:
            if not self.has_layer(layer_id):
                raise NotFound(f"layer {layer_id[:12]} not found")
        canon = json.dumps({"layers": layers, "config": config}, sort_keys=True,
                           separators=(",", ":")).encode()  # fmt: skip
        image_id = hashlib.sha256(canon).hexdigest()
        path = self.root / "images" / f"{image_id}.json"
        if not path.exists():
            doc = {"layers": layers, "config": config, "created": time.time()}
            write_json_atomic(path, doc)
        for tag in tags:
            self.tag(image_id, tag)
        return image_id

    def image(self, image_id: str) -> Image:
        _check_hex(image_id, 64, "image id")
        try:
            doc = json.loads((self.root / "images" / f"{image_id}.json").read_bytes())
        except FileNotFoundError:
            raise NotFound(f"image {image_id[:12]} not found") from None
        return Image(image_id, list(doc["layers"]), doc["config"], doc.get("created", 0.0))

    def image_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "images").glob("*.json"))

    def images(self) -> list[Image]:
        return [self.image(i) for i in self.image_ids()]

    def tags(self) -> dict[str, str]:
        try:
            return json.loads((self.root / "tags.json").read_bytes())
        except FileNotFoundError:
            return {}

    def tags_of(self, image_id: str) -> list[str]:
        return sorted(t for t, i in self.tags().items() if i == image_id)

    def tag(self, image_id: str, tag: str) -> None:
        tag = normalize_ref(tag)
        if "@" in tag:
            raise InvalidInput(f"cannot tag with a digest reference: {tag}")
        self.image(image_id)  # must exist
        with self.locked():
            tags = self.tags()
            tags[tag] = image_id
            write_json_atomic(self.root / "tags.json", tags)

    def untag(self, tag: str) -> str:
        tag = normalize_ref(tag)
        with self.locked():
            tags = self.tags()
            if tag not in tags:
                raise NotFound(f"image {tag} not found")
            image_id = tags.pop(tag)
            write_json_atomic(self.root / "tags.json", tags)
        return image_id

    def resolve(self, ref: str) -> Image:
        """An image by `name[:tag]`, full id (optionally `sha256:`), or unique id prefix."""
        ref = ref.strip()
        bare = ref.removeprefix("sha256:")
        if len(bare) >= 4 and all(c in "0123456789abcdef" for c in bare):
            matches = [i for i in self.image_ids() if i.startswith(bare)]
            if len(matches) == 1:
                return self.image(matches[0])
            if len(matches) > 1:
                raise InvalidInput(f"image id prefix {bare} is ambiguous")
        image_id = self.tags().get(normalize_ref(ref))
        if image_id is None:
            raise NotFound(f"image {ref} not found")
        return self.image(image_id)

    def remove_image(self, ref: str) -> list[str]:
        """Remove a tag (the image goes when its last tag goes) or an image by id with all its
        tags. Returns the ids of images deleted. Layers and objects stay until gc."""
        image = self.resolve(ref)
        tag = normalize_ref(ref)
        with self.locked():
            tags = self.tags()  # read once, under the lock that guards its replacement
            if tags.get(tag) == image.id:
                del tags[tag]
            else:
                tags = {t: i for t, i in tags.items() if i != image.id}
            write_json_atomic(self.root / "tags.json", tags)
            if image.id in tags.values():
                return []
            (self.root / "images" / f"{image.id}.json").unlink(missing_ok=True)
            fsync_dir(self.root / "images")
        return [image.id]


class LayerBuilder:
    """Builds one layer: entries and their content go in, a layer id comes out of commit().

    Nothing is visible in the store before commit(); leaving the `with` block without committing
    discards the staged TOC (objects already written stay for gc, or for the retry that wants them).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.toc = Toc()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._batch: list[tuple[bytes, str]] = []
        self._batch_bytes = 0
        self._known: set[str] = set()  # digests queued or stored by this builder
        self._link_digests: dict[int, tuple[str, int]] = {}
        self.bytes_in = 0
        self._packs = store.objects.pack_writer()
        # Batches are compressed in parallel but appended to the pack in the order they were
        # queued: the pack then holds files in tar order (see objects.py, packs).
        self._turn = threading.Condition()
        self._next_seq = 0
        self._seq = 0
        self._loose: set[str] = set()

    def __enter__(self) -> LayerBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._drain()
        finally:
            self._packs.discard()  # what commit() did not publish (nothing, after a commit)

    def add(self, entry: Entry, data: bytes | BinaryIO | str | os.PathLike | None = None) -> Entry:
        """Add an entry; for a regular file, `data` is its content (bytes, a binary stream
        positioned at the start, or a host path). Sets entry.digest and entry.size."""
        if entry.kind == REG:
            if entry.link and entry.link in self._link_digests and data is None:
                entry.digest, entry.size = self._link_digests[entry.link]
            elif data is not None:
                entry.digest, entry.size = self._store_content(data)
            elif entry.digest and not self.store.objects.has(entry.digest):
                raise NotFound(f"{entry.path}: content object {entry.digest} is missing")
            elif not entry.digest and entry.size:
                raise InvalidInput(f"{entry.path}: no content given for a {entry.size}-byte file")
            if entry.link:
                self._link_digests.setdefault(entry.link, (entry.digest, entry.size))
            self.bytes_in += entry.size
        self.toc.add(entry)
        return entry

    def whiteout(self, path: str) -> None:
        self.toc.whiteouts.add(path)

    def opaque(self, path: str) -> None:
        self.toc.opaque.add(path)

    def _store_content(self, data: bytes | BinaryIO | str | os.PathLike) -> tuple[str, int]:
        # Cheapest test first: a stream is what an import passes for each of thousands of files
        # (isinstance against os.PathLike, an ABC, costs more than the rest of this).
        if hasattr(data, "read"):
            head = data.read(_SMALL_FILE + 1)  # type: ignore[union-attr]
            if len(head) <= _SMALL_FILE:
                data = head
            else:
                self._flush_batch()
                digest = self.store.objects.put_stream(_Chain(head, data))
                with self.store.objects.open(digest) as r:
                    return digest, r.size
        elif isinstance(data, str | os.PathLike):
            with open(data, "rb") as f:
                return self._store_content(f)
        data = bytes(data)  # type: ignore[arg-type]
        if not data:
            return "", 0
        digest = digest_bytes(data)
        if digest not in self._known:
            self._known.add(digest)
            self._batch.append((data, digest))
            self._batch_bytes += len(data)
            if self._batch_bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_FILES:
                self._flush_batch()
        return digest, len(data)

    def _flush_batch(self) -> None:
        """Hand the queued files to a worker thread: zstd releases the GIL, so compression
        runs beside the caller's parsing. Batches keep the per-file handoff cost small."""
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._loose = set(self.store.objects.loose())
            self._pool = ThreadPoolExecutor(max_workers=_WORKERS)
        seq, self._seq = self._seq, self._seq + 1
        self._pending.append(self._pool.submit(self._store_batch, seq, batch))
        while len(self._pending) > _MAX_PENDING_BATCHES:  # bound the memory held by queued files
            self._pending.pop(0).result()

    def _store_batch(self, seq: int, batch: list[tuple[bytes, str]]) -> None:
        """Compress a batch; small objects go to the pack (in queue order), large ones are
        files of their own."""
        packed: list[tuple[str, bytes]] = []
        try:
            objects = self.store.objects
            # No system call per file here (each would hand the GIL over): packs are looked up
            # in memory, loose objects in the listing taken when the builder started storing.
            stored = self._loose
            todo = [(d, g) for d, g in batch if g not in stored and not objects.packed(g)]
            blobs = encode_many([d for d, _ in todo])
            for (_, digest), blob in zip(todo, blobs, strict=True):
                if len(blob) <= PACK_MAX_OBJECT:
                    packed.append((digest, blob))
                else:
                    objects.write_loose(digest, blob)
        finally:
            with self._turn:
                while self._next_seq != seq:
                    self._turn.wait()
                try:
                    self._packs.append(packed)
                finally:
                    self._next_seq += 1
                    self._turn.notify_all()

    def _drain(self) -> None:
        try:
            self._flush_batch()
        finally:
            pending, self._pending = self._pending, []
            try:
                for fut in pending:
                    fut.result()
            finally:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                    self._pool = None

    def commit(self, *, diff_id: str | None = None, blobs: dict[str, str] | None = None) -> str:
        """Publish the layer (idempotent: an identical layer already stored is reused)."""
        self._drain()
        store = self.store
        blob, layer_id = self.toc.dumps()
        final = store.layer_dir(layer_id)
        if (final / "toc").exists():
            self._packs.discard()  # its objects are stored already
            if diff_id or blobs:
                store.update_layer_meta(layer_id, diff_id=diff_id, blobs=blobs)
            return layer_id
        # Every object the TOC names is durable and visible before the TOC appears.
        self._packs.publish()
        stage = store.mkdtemp("layer")
        try:
            meta = LayerMeta(layer_id, diff_id, dict(blobs or {}), self.toc.content_size(),
                             len(self.toc), time.time())  # fmt: skip
            write_atomic(stage / "toc", blob, 0o444)
            write_json_atomic(stage / "meta.json", meta.to_json())
            try:
                os.rename(stage, final)
            except OSError:
                if not (final / "toc").exists():  # a concurrent import of the same layer wins
                    raise
            fsync_dir(final.parent)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        store._tocs[layer_id] = self.toc
        return layer_id


class _Chain:
    """A read()-able stream of `head` followed by the rest of `tail`.

    `head` is consumed through an offset: slicing off what was read would copy the rest of it
    at every read, quadratic in its size (it is up to _SMALL_FILE bytes, read a frame at a time).
    """

    def __init__(self, head: bytes, tail: BinaryIO) -> None:
        self._head = memoryview(head)
        self._pos = 0
        self._tail = tail

    def read(self, n: int = -1) -> bytes:
        head, pos = self._head, self._pos
        if pos < len(head):
            if n < 0:
                self._pos = len(head)
                return bytes(head[pos:]) + self._tail.read()
            out = bytes(head[pos : pos + n])
            self._pos = pos + len(out)
            if len(out) < n:
                out += self._tail.read(n - len(out))
            return out
        return self._tail.read(n)


def _check_hex(value: str, length: int, what: str) -> None:
    if len(value) != length or not all(c in "0123456789abcdef" for c in value):
        raise NotFound(f"not a valid {what}: {value!r}")
