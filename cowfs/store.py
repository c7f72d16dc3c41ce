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
import os
import time

from cowfs import fastjson
from cowfs.atomic import fsync_dir, write_json_atomic
from cowfs.errors import InvalidInput, NotFound
from cowfs.record import field, record

# Annotations only. The store is on the start path of every container and FUSE daemon, where
# pathlib, json and typing (with the re and enum they load: ~25 ms) are not imported; so the
# methods `cowfs run` uses work on str paths (`path()`), and `root` is made on first use.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from cowfs.layerbuilder import LayerBuilder
    from cowfs.objects import ObjectStore
    from cowfs.toc import Toc


def normalize_ref(ref: str) -> str:
    """'busybox' -> 'busybox:latest'; 'host:5000/a/b' -> 'host:5000/a/b:latest'."""
    ref = ref.strip()
    if not ref or any(c.isspace() for c in ref) or "\0" in ref:
        raise InvalidInput(f"invalid image reference {ref!r}")
    if "@" in ref:
        return ref
    last = ref.rpartition("/")[2]
    return ref if ":" in last else ref + ":latest"


@record(frozen=True)
class Image:
    id: str
    layers: list[str]  # layer ids, bottom first
    config: dict[str, Any]  # the OCI image config (architecture, os, config, rootfs, history)
    created: float = 0.0

    @property
    def short_id(self) -> str:
        return self.id[:12]


@record
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
        self._root = absolute(root)
        for sub in ("objects", "layers", "images", "tmp", "cache", "containers"):
            os.makedirs(self.path(sub), exist_ok=True)
        self._root_path: Path | None = None
        self._objects: ObjectStore | None = None
        self._tocs: dict[str, Toc] = {}

    @property
    def root(self) -> Path:
        if self._root_path is None:
            from pathlib import Path

            self._root_path = Path(self._root)
        return self._root_path

    def path(self, *parts: str) -> str:
        """A path under the root, as a str."""
        return os.path.join(self._root, *parts)

    @property
    def objects(self) -> ObjectStore:
        """The content objects. Made when first asked for: `cowfs run` and the other commands
        that only read names and images do not load zstandard and xxhash (~5 ms)."""
        if self._objects is None:
            from cowfs.objects import ObjectStore

            self._objects = ObjectStore(self.path("objects"), self.path("tmp"))
        return self._objects

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

    def _layer_path(self, layer_id: str, *parts: str) -> str:
        """`layer_dir` (or a file in it) as a str: what the start path uses."""
        _check_hex(layer_id, 64, "layer id")
        return self.path("layers", layer_id, *parts)

    def mkdtemp(self, prefix: str) -> str:
        """A new private directory under tmp/ (a str: see `path`)."""
        path = self.path("tmp", f"{prefix}.{os.getpid()}.{os.urandom(6).hex()}")
        os.mkdir(path)
        return path

    def locked(self) -> _Lock:
        """An exclusive lock on the store's names (tags, image files) across processes, for a
        `with` block."""
        return _Lock(self.path("lock"))

    # -- layers -----------------------------------------------------------------------------

    def new_layer(self) -> LayerBuilder:
        from cowfs.layerbuilder import LayerBuilder

        return LayerBuilder(self)

    def has_layer(self, layer_id: str) -> bool:
        return (self.layer_dir(layer_id) / "toc").exists()

    def load_toc(self, layer_id: str) -> Toc:
        toc = self._tocs.get(layer_id)
        if toc is None:
            try:
                with open(self._layer_path(layer_id, "toc"), "rb") as f:
                    blob = f.read()
            except FileNotFoundError:
                raise NotFound(f"layer {layer_id[:12]} not found") from None
            from cowfs.toc import Toc

            toc = Toc.loads(blob, expect_id=layer_id)
            self._tocs[layer_id] = toc
        return toc

    def layer_meta(self, layer_id: str) -> LayerMeta:
        try:
            doc = _read_json(self._layer_path(layer_id, "meta.json"))
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
        import json

        canon = json.dumps({"layers": layers, "config": config}, sort_keys=True,
                           separators=(",", ":")).encode()  # fmt: skip
        import hashlib

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
            doc = _read_json(self.path("images", f"{image_id}.json"))
        except FileNotFoundError:
            raise NotFound(f"image {image_id[:12]} not found") from None
        return Image(image_id, list(doc["layers"]), doc["config"], doc.get("created", 0.0))

    def image_ids(self) -> list[str]:
        names = os.listdir(self.path("images"))
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def images(self) -> list[Image]:
        return [self.image(i) for i in self.image_ids()]

    def tags(self) -> dict[str, str]:
        try:
            return _read_json(self.path("tags.json"))
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


def absolute(path: str | os.PathLike) -> str:
    """`str(Path(path).absolute())` without pathlib: joined to the cwd, with empty and `.`
    parts dropped and `..` kept."""
    path = os.fspath(path)
    if not path.startswith("/"):
        path = os.getcwd() + "/" + path
    return "/" + "/".join(p for p in path.split("/") if p and p != ".")


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return fastjson.loads(f.read())


class _Lock:
    __slots__ = ("_path", "_fd")

    def __init__(self, path: str) -> None:
        self._path = path

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            raise

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def _check_hex(value: str, length: int, what: str) -> None:
    if len(value) != length or not all(c in "0123456789abcdef" for c in value):
        raise NotFound(f"not a valid {what}: {value!r}")
