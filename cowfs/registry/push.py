"""Push a stored image to a registry.

Layers go as tar+zstd in an OCI manifest by default; `compression="gzip"` writes a Docker
schema 2 manifest with gzip layers, which every registry and older client understands. For each
layer, cheapest first:

1. a blob of this layer in the wanted compression that cowfs already knows (registry.json cache)
   and the target repository has (HEAD): nothing to send;
2. such a blob held by another repository of the same registry: cross-repository mount
   (POST ...?mount=&from=), no bytes sent;
3. otherwise export the layer (deterministic: the same layer gives the same bytes), then HEAD,
   mount or upload it (one PUT, or PATCH chunks of `chunk_size` then a closing PUT).

The config is the stored one with rootfs.diff_ids set to the exported tars' digests; it goes
after the layers and the manifest last, so the tag never names an incomplete image.
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cowfs.errors import InvalidInput, RegistryError
from cowfs.registry import manifest as mf
from cowfs.registry.cache import BlobRecord, RegistryCache
from cowfs.registry.client import RegistryClient
from cowfs.registry.pull import DEFAULT_JOBS, NoProgress, Progress
from cowfs.registry.reference import Reference, parse
from cowfs.registry.workers import Workers

if TYPE_CHECKING:
    from cowfs.store import Store

COMPRESSIONS = ("zstd", "gzip", "none")
# Media types a layer blob may have in the manifest we write, per requested compression.
_WANTED = {
    "zstd": (mf.OCI_LAYER_ZSTD,),
    "gzip": (mf.OCI_LAYER_GZIP, mf.DOCKER_LAYER_GZIP),
    "none": (mf.OCI_LAYER,),
}


@dataclass(frozen=True, slots=True)
class PushResult:
    reference: Reference
    manifest_digest: str
    media_type: str
    layers: int
    uploaded: int  # layers whose bytes were sent
    mounted: int  # layers linked from another repository
    present: int  # layers the repository already had
    uploaded_bytes: int


@dataclass(slots=True)
class _Layer:
    layer_id: str
    digest: str = ""
    size: int = 0
    diff_id: str = ""
    media_type: str = ""
    path: Path | None = None  # exported blob to upload
    location: str | None = None  # an upload session opened by a mount attempt
    how: str = ""  # "present", "mounted" or "upload"


def push(
    store: Store,
    source: str,
    dest: str | Reference,
    *,
    compression: str = "zstd",
    insecure: bool = False,
    authfile: str | None = None,
    chunk_size: int | None = None,
    jobs: int = DEFAULT_JOBS,
    progress: Progress | None = None,
    client: RegistryClient | None = None,
) -> PushResult:
    if compression not in COMPRESSIONS:
        raise InvalidInput(f"unknown compression {compression!r} (zstd, gzip or none)")
    if chunk_size is not None and chunk_size <= 0:
        raise InvalidInput("chunk size must be positive")
    r = parse(dest) if isinstance(dest, str) else dest
    if r.digest:
        raise InvalidInput(f"push to {dest}: give a tag, not a digest")
    image = store.resolve(source)
    client = client or RegistryClient.for_reference(r, insecure=insecure, authfile=authfile)
    client.add_scope(r.repository, "pull,push")
    progress = progress or NoProgress()
    cache = RegistryCache(store.cache_dir)
    repo = f"{r.registry}/{r.repository}"
    staging = Path(store.mkdtemp("push"))
    # An image may list one layer twice: plan and send it once.
    unique = {layer_id: _Layer(layer_id) for layer_id in image.layers}
    layers = list(unique.values())
    lock = threading.Lock()
    try:
        # Phase 1: find out what each layer needs, exporting only where nothing is known.
        def plan(i: int, layer: _Layer) -> None:
            for rec in cache.blobs_of_layer(layer.layer_id, _WANTED[compression]):
                if _reuse(client, r, rec, layer, lock):
                    return
            from cowfs.layertar import export_layer

            path = staging / f"layer{i}"
            codec = None if compression == "none" else compression
            info = export_layer(store, layer.layer_id, path, compression=codec)
            cache.add_blob(info.digest, layer=layer.layer_id, diff_id=info.diff_id,
                           size=info.size, media_type=info.media_type)  # fmt: skip
            layer.digest, layer.size, layer.diff_id = info.digest, info.size, info.diff_id
            layer.media_type, layer.path = info.media_type, path
            rec = cache.blob(info.digest)
            if rec is not None and _reuse(client, r, rec, layer, lock):
                path.unlink()
                layer.path = None
                return
            layer.how = "upload"

        _parallel(
            client,
            jobs,
            [lambda i=i, layer=layer: plan(i, layer) for i, layer in enumerate(layers)],
        )

        # Phase 2: send the bytes the registry lacks.
        todo = [layer for layer in layers if layer.how == "upload"]
        progress.begin(sum(layer.size for layer in todo), len(todo))
        try:

            def send(layer: _Layer) -> None:
                assert layer.path is not None
                client.upload_blob(r.repository, layer.path, layer.digest, layer.size,
                                   location=layer.location, chunk_size=chunk_size,
                                   progress=progress.advance)  # fmt: skip
                layer.path.unlink()

            _parallel(client, jobs, [lambda layer=layer: send(layer) for layer in todo])
        finally:
            progress.end()
        for layer in layers:
            cache.add_repo(layer.digest, repo)
            if layer.digest not in store.layer_meta(layer.layer_id).blobs:
                # So that pulling this image back into this store downloads nothing.
                store.update_layer_meta(layer.layer_id, blobs={layer.digest: layer.media_type})
        layers = [unique[layer_id] for layer_id in image.layers]

        # Config, then manifest.
        docker = compression == "gzip"
        config = copy.deepcopy(image.config)
        config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_desc = mf.Descriptor(
            mf.DOCKER_CONFIG if docker else mf.OCI_CONFIG,
            mf.sha256_digest(config_bytes),
            len(config_bytes),
        )
        if client.blob_size(r.repository, config_desc.digest) is None:
            config_path = staging / "config.json"
            config_path.write_bytes(config_bytes)
            client.upload_blob(r.repository, config_path, config_desc.digest, config_desc.size)
        media_type = mf.DOCKER_MANIFEST if docker else mf.OCI_MANIFEST
        descs = [
            mf.Descriptor(
                mf.DOCKER_LAYER_GZIP if docker else layer.media_type, layer.digest, layer.size
            )
            for layer in layers
        ]
        body = mf.build_manifest(config_desc, descs, media_type)
        try:
            digest = client.put_manifest(r.repository, r.reference, body, media_type)
        except RegistryError as exc:
            if docker or getattr(exc, "http_status", None) not in (400, 415):
                raise
            # Registries from before OCI 1.1 refuse zstd layers or OCI manifests.
            raise RegistryError(
                f"{exc.message}; an older registry? try --compression gzip"
            ) from None
        cache.add_manifest(r.registry, r.repository, digest, image.id)
        cache.save()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PushResult(
        reference=r,
        manifest_digest=digest,
        media_type=media_type,
        layers=len(layers),
        uploaded=len(todo),
        mounted=sum(layer.how == "mounted" for layer in unique.values()),
        present=sum(layer.how == "present" for layer in unique.values()),
        uploaded_bytes=sum(layer.size for layer in todo),
    )


def _reuse(
    client: RegistryClient, r: Reference, rec: BlobRecord, layer: _Layer, lock: threading.Lock
) -> bool:
    """Use a known blob if the target repository has it or can mount it from another one."""
    size = client.blob_size(r.repository, rec.digest)
    how = "present" if size is not None else ""
    if not how:
        prefix = f"{r.registry}/"
        for source in rec.repos:
            if not source.startswith(prefix) or source == f"{prefix}{r.repository}":
                continue
            src_repo = source[len(prefix) :]
            with lock:  # scopes change the token: one thread at a time
                client.add_scope(src_repo, "pull")
            location = client.start_upload(r.repository, mount=(rec.digest, src_repo))
            if location is None:
                how = "mounted"
                break
            # The registry opened a plain upload instead (no access to the source, or it
            # lacks the blob): keep the session for our own upload.
            layer.location = location
            break
    if not how:
        return False
    layer.digest, layer.size, layer.diff_id = rec.digest, rec.size, rec.diff_id
    layer.media_type, layer.how = rec.media_type, how
    return True


def _parallel(client: RegistryClient, jobs: int, tasks: list[Callable[[], None]]) -> None:
    """Run tasks on a few threads. The first error (or Ctrl-C) aborts the client's transfers in
    flight, so that the others stop at once, and is raised (see workers.py)."""
    with Workers(client, jobs, "push") as workers:
        workers.run(tasks)
