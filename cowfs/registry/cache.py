"""What cowfs has learned about registries: which blobs they hold and what each blob is.

Kept in <store>/cache/registry.json (derived data: deleting it only costs speed). It records

* blobs: digest -> {layer, diff_id, size, media_type, repos: ["host/repo", ...]}, learned from
  verified pulls and from pushes. It lets a push skip exporting a layer whose blob in the wanted
  compression is already known, and mount a blob from another repository of the same registry
  (docker keeps the same kind of record);
* manifests: "host/repo@digest" -> image id, so that a pull by digest that already happened is
  found again without the network (the store cannot tag by digest).

Only facts that were verified go in: a blob's diff_id is known because its import or export
computed it. Updates merge under a file lock, so concurrent pulls and pushes keep each other's.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowfs.atomic import write_json_atomic


@dataclass(frozen=True, slots=True)
class BlobRecord:
    digest: str
    layer: str
    diff_id: str
    size: int
    media_type: str
    repos: tuple[str, ...] = ()


class RegistryCache:
    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.path = Path(cache_dir) / "registry.json"
        self._lock = threading.Lock()
        self._doc = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_bytes())
        except (FileNotFoundError, ValueError):
            return {"blobs": {}, "manifests": {}}
        if not isinstance(doc, dict):
            return {"blobs": {}, "manifests": {}}
        doc.setdefault("blobs", {})
        doc.setdefault("manifests", {})
        return doc

    # -- queries ----------------------------------------------------------------------------

    def blob(self, digest: str) -> BlobRecord | None:
        with self._lock:
            rec = self._doc["blobs"].get(digest)
        if not isinstance(rec, dict):
            return None
        try:
            return BlobRecord(digest, rec["layer"], rec["diff_id"], int(rec["size"]),
                              rec["media_type"], tuple(rec.get("repos", ())))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None

    def blobs_of_layer(self, layer_id: str, media_types: tuple[str, ...]) -> list[BlobRecord]:
        with self._lock:
            digests = [d for d, r in self._doc["blobs"].items()
                       if isinstance(r, dict) and r.get("layer") == layer_id
                       and r.get("media_type") in media_types]  # fmt: skip
        return [r for r in map(self.blob, digests) if r is not None]

    def image_of(self, registry: str, repository: str, manifest_digest: str) -> str | None:
        with self._lock:
            return self._doc["manifests"].get(f"{registry}/{repository}@{manifest_digest}")

    # -- updates ----------------------------------------------------------------------------

    def add_blob(self, digest: str, *, layer: str, diff_id: str, size: int, media_type: str,
                 repo: str | None = None) -> None:  # fmt: skip
        with self._lock:
            rec = self._doc["blobs"].setdefault(digest, {})
            rec.update(layer=layer, diff_id=diff_id, size=size, media_type=media_type)
            if repo is not None:
                self._add_repo(rec, repo)

    def add_repo(self, digest: str, repo: str) -> None:
        with self._lock:
            rec = self._doc["blobs"].get(digest)
            if rec is not None:
                self._add_repo(rec, repo)

    @staticmethod
    def _add_repo(rec: dict[str, Any], repo: str) -> None:
        repos = rec.setdefault("repos", [])
        if repo not in repos:
            repos.append(repo)

    def add_manifest(self, registry: str, repository: str, digest: str, image_id: str) -> None:
        with self._lock:
            self._doc["manifests"][f"{registry}/{repository}@{digest}"] = image_id

    def save(self) -> None:
        """Merge with what other processes wrote meanwhile, then replace the file atomically.
        Failing to write is not an error: the cache only saves work."""
        try:
            self._save()
        except OSError:
            pass

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._lock:
                disk = self._read()
                for digest, rec in self._doc["blobs"].items():
                    old = disk["blobs"].get(digest)
                    if isinstance(old, dict):
                        for repo in old.get("repos", ()):
                            self._add_repo(rec, repo)
                    disk["blobs"][digest] = rec
                disk["manifests"].update(self._doc["manifests"])
                self._doc = disk
                write_json_atomic(self.path, disk)
        finally:
            os.close(fd)
