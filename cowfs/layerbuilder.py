"""Building one layer of the store: entries and their content in, a layer id out.

Objects are written as they come (small ones batched, compressed on worker threads and
appended to a pack in the order they were queued); the TOC and the layer's meta.json are staged
under tmp/ and renamed into layers/ by commit(). See store.py for the vocabulary.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cowfs.atomic import fsync_dir, write_atomic, write_json_atomic
from cowfs.errors import InvalidInput, NotFound
from cowfs.objects import PACK_MAX_OBJECT, digest_bytes, encode_many
from cowfs.store import LayerMeta
from cowfs.toc import REG, Entry, Toc

if TYPE_CHECKING:  # imported where used: it loads logging, ~8 ms of every CLI start
    from concurrent.futures import Future, ThreadPoolExecutor

    from cowfs.store import Store

# Files up to this size are read whole and compressed on a worker thread (zstd drops the GIL);
# larger ones stream frame by frame (on the caller's thread) so that memory stays bounded.
_SMALL_FILE = 64 * 1024 * 1024
_BATCH_BYTES = 4 * 1024 * 1024
_BATCH_FILES = 128
_MAX_PENDING_BATCHES = 4
# Workers overlap one batch's file writes (syscalls, no GIL) with another's compression.
_WORKERS = 2


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
        stage = Path(store.mkdtemp("layer"))
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
