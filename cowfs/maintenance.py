"""Store maintenance: fsck (is everything intact?), gc (remove what nothing references), usage.

Roots of reachability are the image files (tagged or not) and the images that containers were
created from (containers/<id>/state.json `image_id`). An image references its layers, a layer's
TOC references objects. Everything else in objects/ and layers/ is garbage, except what is
younger than the grace period: an import in progress writes objects and publishes layers before
the image that references them, and gc must not pull them out from under it (as git's
gc.pruneExpire protects fresh loose objects).

Packs (objects.py) are collected whole: a pack none of whose objects is referenced is removed; one
whose unreferenced objects make at least REPACK_GARBAGE of its bytes is rewritten with only its
live objects (the new pack is durable before the old one goes, so a crash keeps one of them);
below that, dead objects stay in their pack (reported as kept_in_packs) until more of it dies. A
pack younger than the grace period is left alone. As for loose objects, an import that finds an
object already stored does not write it again: gc must not run with a grace period shorter than
an import takes.

fsck rehashes every object (every frame checksum and the xxh128 of the content), loads every TOC
against its layer id, checks that every object a TOC names exists, that every image file hashes
to its id and names stored layers, and that every tag names a stored image. A broken object is
reported with the images and paths it breaks; a pack whose index is damaged is reported itself
(its objects then show up as missing, with what they break).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cowfs.errors import CowfsError
from cowfs.index import INDEX_VERSION
from cowfs.store import Store
from cowfs.toc import REG, Toc

DEFAULT_GRACE = 600.0  # seconds
# Merged indexes cached per image by mounting.py: cache/index-<image id>-v<format>.
_INDEX_CACHE = re.compile(r"index-([0-9a-f]{64})-v(\d+)")


@dataclass
class Problem:
    what: str  # "object <digest>", "layer <id>", "image <id>", "tag <name>"
    why: str
    affects: list[str] = field(default_factory=list)  # "busybox:latest: /bin/busybox", ...

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "why": self.why, "affects": self.affects}


@dataclass
class FsckReport:
    objects: int = 0
    layers: int = 0
    images: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"objects": self.objects, "layers": self.layers, "images": self.images,
                "ok": self.ok, "problems": [p.to_json() for p in self.problems]}  # fmt: skip


def _image_names(store: Store) -> dict[str, str]:
    """image id -> a name for people: its tags, or its short id."""
    names: dict[str, list[str]] = {}
    for tag, image_id in store.tags().items():
        names.setdefault(image_id, []).append(tag)
    return {i: ", ".join(sorted(names.get(i, []))) or i[:12] for i in store.image_ids()}


def fsck(store: Store, progress: Callable[[int], None] | None = None) -> FsckReport:
    """Check the whole store; `progress` is called once per object checked."""
    report = FsckReport()
    bad_objects: dict[str, Problem] = {}
    store.objects.refresh()
    for digest in store.objects:
        report.objects += 1
        try:
            store.objects.verify(digest)
        except CowfsError as exc:
            bad_objects[digest] = Problem(f"object {digest}", exc.message)
        if progress is not None:
            progress(1)

    for name, why in sorted(store.objects.damaged_packs.items()):
        # Its objects cannot be found: the layers naming them are reported as missing objects.
        report.problems.append(Problem(f"pack {name}", why))

    tocs: dict[str, Toc] = {}
    bad_layers: dict[str, Problem] = {}
    for layer_id in store.layers():
        report.layers += 1
        try:
            blob = (store.layer_dir(layer_id) / "toc").read_bytes()
            tocs[layer_id] = Toc.loads(blob, expect_id=layer_id)
            store.layer_meta(layer_id)
        except (CowfsError, ValueError, OSError) as exc:
            why = exc.message if isinstance(exc, CowfsError) else f"meta.json: {exc}"
            bad_layers[layer_id] = Problem(f"layer {layer_id}", why)

    names = _image_names(store)
    users: dict[str, list[str]] = {}  # layer id -> names of images using it
    for image_id in store.image_ids():
        report.images += 1
        problem = _check_image(store, image_id)
        if problem is not None:
            report.problems.append(problem)
            continue
        for layer_id in store.image(image_id).layers:
            users.setdefault(layer_id, []).append(names[image_id])
            if layer_id not in tocs and layer_id not in bad_layers:
                report.problems.append(Problem(f"image {image_id}",
                                               f"layer {layer_id[:12]} is missing",  # fmt: skip
                                               [names[image_id]]))

    for layer_id, problem in bad_layers.items():
        problem.affects = sorted(users.get(layer_id, []))
        report.problems.append(problem)

    missing: dict[str, Problem] = {}
    for layer_id, toc in tocs.items():
        for e in toc:
            if e.kind != REG or not e.digest:
                continue
            problem = bad_objects.get(e.digest)
            if problem is None and e.digest not in missing and not store.objects.has(e.digest):
                missing[e.digest] = Problem(f"object {e.digest}", "missing")
            problem = problem or missing.get(e.digest)
            if problem is None:
                continue
            for image in users.get(layer_id, []) or [f"(unused layer {layer_id[:12]})"]:
                problem.affects.append(f"{image}: /{e.path}")
    for problem in (*bad_objects.values(), *missing.values()):
        problem.affects = sorted(set(problem.affects))
        report.problems.append(problem)

    images = set(store.image_ids())
    for tag, image_id in sorted(store.tags().items()):
        if image_id not in images:
            report.problems.append(Problem(f"tag {tag}", f"names missing image {image_id[:12]}"))
    return report


def _check_image(store: Store, image_id: str) -> Problem | None:
    path = store.root / "images" / f"{image_id}.json"
    try:
        doc = json.loads(path.read_bytes())
        canon = json.dumps({"layers": doc["layers"], "config": doc["config"]}, sort_keys=True,
                           separators=(",", ":")).encode()  # fmt: skip
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return Problem(f"image {image_id}", f"unreadable image file ({exc})")
    if hashlib.sha256(canon).hexdigest() != image_id:
        return Problem(f"image {image_id}", "image file does not hash to its id")
    return None


# -- gc --------------------------------------------------------------------------------------


@dataclass
class GcReport:
    layers: list[str] = field(default_factory=list)  # removed (or removable, dry run)
    objects: int = 0
    bytes_freed: int = 0
    tmp_entries: int = 0
    cache_entries: int = 0  # merged indexes of images that are gone (or of an old format)
    kept_young: int = 0  # unreferenced but younger than the grace period
    # Unreferenced objects left in packs that are mostly live (see REPACK_GARBAGE).
    kept_in_packs: int = 0
    packs_rewritten: int = 0  # packs rewritten without their garbage, or removed if all of it
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "objects": self.objects, "bytes_freed": self.bytes_freed,
                "tmp_entries": self.tmp_entries, "cache_entries": self.cache_entries,
                "kept_young": self.kept_young, "kept_in_packs": self.kept_in_packs,
                "packs_rewritten": self.packs_rewritten,
                "dry_run": self.dry_run}  # fmt: skip


def container_image_ids(store: Store) -> set[str]:
    """Ids of the images that existing containers were made from (they must outlive gc)."""
    out: set[str] = set()
    base = store.containers_dir
    if not base.exists():
        return out
    for d in base.iterdir():
        try:
            doc = json.loads((d / "state.json").read_bytes())
        except (OSError, ValueError):
            continue
        image_id = doc.get("image_id") if isinstance(doc, dict) else None
        if isinstance(image_id, str):
            out.add(image_id)
    return out


def _age(path: os.PathLike | str, now: float) -> float:
    try:
        return now - os.lstat(path).st_mtime
    except FileNotFoundError:
        return float("inf")


def gc(store: Store, *, dry_run: bool = False, grace: float = DEFAULT_GRACE) -> GcReport:
    """Remove layers no image references, then objects no layer references; cached indexes of
    images that are gone; and stale tmp."""
    report = GcReport(dry_run=dry_run)
    now = time.time()
    keep_layers: set[str] = set()
    for image_id in set(store.image_ids()):
        keep_layers.update(store.image(image_id).layers)
    # A container whose image file is gone still needs its layers; they are only known while
    # the image exists, so `image rm` refuses images in use (see cli/image.py).
    live_layers: list[str] = []
    for layer_id in store.layers():
        ldir = store.layer_dir(layer_id)
        if layer_id in keep_layers:
            live_layers.append(layer_id)
        elif _age(ldir / "toc", now) < grace:
            report.kept_young += 1
            live_layers.append(layer_id)
        else:
            report.layers.append(layer_id)
            report.bytes_freed += sum(p.stat().st_size for p in ldir.iterdir())
            if not dry_run:
                store._tocs.pop(layer_id, None)
                shutil.rmtree(ldir)

    keep_objects: set[str] = set()
    for layer_id in live_layers:
        keep_objects |= store.load_toc(layer_id).digests()
    objects = store.objects
    objects.refresh()
    for digest in objects.loose():
        if digest in keep_objects:
            continue
        path = objects.path(digest)
        if _age(path, now) < grace:
            report.kept_young += 1
            continue
        report.objects += 1
        report.bytes_freed += path.stat().st_size
        if not dry_run:
            path.unlink(missing_ok=True)
    for name, digests in objects.packs().items():
        _gc_pack(objects, name, digests, keep_objects, report, now, grace)

    images = set(store.image_ids())
    for entry in store.cache_dir.iterdir():
        m = _INDEX_CACHE.fullmatch(entry.name)
        if m is None or (m[1] in images and int(m[2]) == INDEX_VERSION):
            continue
        report.cache_entries += 1
        report.bytes_freed += entry.lstat().st_size
        if not dry_run:
            entry.unlink(missing_ok=True)

    for entry in store.tmp.iterdir():
        if _age(entry, now) < grace:
            continue
        report.tmp_entries += 1
        if not dry_run:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return report


# A pack is rewritten (its live objects copied to a new pack, the old one removed) once at least
# this fraction of its bytes is garbage; below that its dead objects stay: rewriting a mostly
# live pack to save a little would cost a copy of all of it.
REPACK_GARBAGE = 0.5


def _gc_pack(objects, name: str, digests: list[str], keep: set[str], report: GcReport,
             now: float, grace: float) -> None:  # fmt: skip
    dead = [d for d in digests if d not in keep]
    if not dead:
        return
    path = objects.pack_path(name)
    if _age(path, now) < grace:  # written by an import that may not have published its layer
        report.kept_young += len(dead)
        return
    dead_bytes = sum(objects.stored_size(d) for d in dead)
    if len(dead) < len(digests) and dead_bytes < REPACK_GARBAGE * path.stat().st_size:
        report.kept_in_packs += len(dead)
        return
    report.objects += len(dead)
    report.packs_rewritten += 1
    if report.dry_run:
        report.bytes_freed += dead_bytes
    else:
        report.bytes_freed += objects.rewrite_pack(name, lambda d: d in keep)[1]


# -- usage -----------------------------------------------------------------------------------


@dataclass
class ImageUsage:
    image_id: str
    tags: list[str]
    layers: int
    content: int  # bytes of file content of all its layers (uncompressed, each object once)
    stored: int  # bytes on disk of the objects it references
    shared: int  # of `stored`: objects that other images reference too
    unique: int  # of `stored`: objects only this image references

    def to_json(self) -> dict[str, Any]:
        return {"id": self.image_id, "tags": self.tags, "layers": self.layers,
                "content_bytes": self.content, "stored_bytes": self.stored,
                "shared_bytes": self.shared, "unique_bytes": self.unique}  # fmt: skip


def usage(store: Store) -> list[ImageUsage]:
    """Per image: what it costs on disk, split into bytes shared with other images and its own."""
    tags: dict[str, list[str]] = {}
    for tag, image_id in store.tags().items():
        tags.setdefault(image_id, []).append(tag)
    objects_of: dict[str, dict[str, int]] = {}  # image id -> {digest: content size}
    for image in store.images():
        objs: dict[str, int] = {}
        for layer_id in image.layers:
            for e in store.load_toc(layer_id):
                if e.kind == REG and e.digest:
                    objs[e.digest] = e.size
        objects_of[image.id] = objs
    users: dict[str, int] = {}
    for objs in objects_of.values():
        for d in objs:
            users[d] = users.get(d, 0) + 1
    stored: dict[str, int] = {}
    for d in users:
        try:
            stored[d] = store.objects.stored_size(d)
        except FileNotFoundError:
            stored[d] = 0  # fsck reports it
    out = []
    for image in store.images():
        objs = objects_of[image.id]
        shared = sum(stored[d] for d in objs if users[d] > 1)
        unique = sum(stored[d] for d in objs if users[d] == 1)
        out.append(ImageUsage(image.id, sorted(tags.get(image.id, [])), len(image.layers),
                              sum(objs.values()), shared + unique, shared, unique))  # fmt: skip
    return out
