"""Pull an image from a registry into the store.

Order of work, so that an interrupted pull leaves nothing half-imported and a retry completes it:
manifest (an index picks the platform, linux/amd64 unless told), then the config, then every
layer the store does not already have (known by blob digest or diff_id) downloads in parallel
into a staging directory under <store>/tmp, verified by size and sha256 as it streams, and is
imported (which checks the digest and the config's diff_id again). Each imported layer is
complete and kept; the image and its tag are published last, only when all layers are in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cowfs.errors import DigestMismatch, InvalidInput, NotFound, RegistryError
from cowfs.registry import manifest as mf
from cowfs.registry.cache import RegistryCache
from cowfs.registry.client import RegistryClient
from cowfs.registry.reference import Reference, parse
from cowfs.registry.workers import Workers

if TYPE_CHECKING:
    from cowfs.store import Store

MAX_CONFIG_SIZE = 16 << 20
DEFAULT_JOBS = 3  # parallel layer downloads: enough to fill a link, few enough for 2 cores


class Progress(Protocol):
    """What a pull or push reports (the CLI draws a bar with it); advance() is called from
    worker threads."""

    def begin(self, total_bytes: int, layers: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def end(self) -> None: ...


class NoProgress:
    def begin(self, total_bytes: int, layers: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def end(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class PullResult:
    image_id: str
    reference: Reference
    manifest_digest: str
    layers: int
    downloaded: int  # layers fetched now; the others were already in the store
    downloaded_bytes: int
    tag: str | None


def pull(
    store: Store,
    ref: str | Reference,
    *,
    platform: str | None = None,
    insecure: bool = False,
    authfile: str | None = None,
    jobs: int = DEFAULT_JOBS,
    progress: Progress | None = None,
    client: RegistryClient | None = None,
) -> PullResult:
    r = parse(ref) if isinstance(ref, str) else ref
    want = mf.Platform.parse(platform) if platform else mf.Platform()
    client = client or RegistryClient.for_reference(r, insecure=insecure, authfile=authfile)
    client.add_scope(r.repository, "pull")
    progress = progress or NoProgress()
    where = f"{r.familiar_name}:{r.tag}" if r.tag and not r.digest else str(r)

    body, ctype, digest = client.get_manifest(r.repository, r.reference)
    doc = mf.parse(body, ctype)
    index_digest = None
    if isinstance(doc, mf.Index):
        index_digest = digest
        desc = mf.select_platform(doc, want)
        body, ctype, digest = client.get_manifest(r.repository, desc.digest)
        if len(body) != desc.size:
            raise DigestMismatch(
                f"{where}: manifest {mf.short(desc.digest)} is {len(body)} bytes, "
                f"the index says {desc.size}"
            )
        doc = mf.parse(body, ctype or desc.media_type)
        if not isinstance(doc, mf.Manifest):
            raise RegistryError(f"{where}: index entry {mf.short(desc.digest)} is not a manifest")
    manifest = doc

    config_bytes = client.fetch_blob_bytes(r.repository, manifest.config, MAX_CONFIG_SIZE)
    config = _parse_config(config_bytes, where)
    diff_ids = config["rootfs"]["diff_ids"]
    if len(diff_ids) != len(manifest.layers):
        raise RegistryError(
            f"{where}: config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers"
        )
    if platform and (config.get("os"), config.get("architecture")) != (want.os, want.architecture):
        raise RegistryError(
            f"{where} is for {config.get('os')}/{config.get('architecture')}, not {want}"
        )

    # Which layers the store lacks; a blob listed twice is fetched once.
    layer_ids: list[str | None] = []
    missing: dict[str, tuple[mf.Descriptor, str]] = {}
    for desc, diff_id in zip(manifest.layers, diff_ids, strict=True):
        have = store.layer_by_digest(desc.digest) or store.layer_by_digest(diff_id)
        layer_ids.append(have)
        if have is None:
            missing.setdefault(desc.digest, (desc, diff_id))

    fetched = _fetch_layers(store, client, r, list(missing.values()), jobs, progress)
    layer_ids = [
        lid or fetched[d.digest] for lid, d in zip(layer_ids, manifest.layers, strict=True)
    ]

    cache = RegistryCache(store.cache_dir)
    repo = f"{r.registry}/{r.repository}"
    for desc, diff_id, layer_id in zip(manifest.layers, diff_ids, layer_ids, strict=True):
        # Only what was verified goes into the cache: a registry must not be able to tie a
        # blob it never sent to a layer of ours (that would poison later pulls and pushes).
        meta = store.layer_meta(layer_id)
        if desc.digest in fetched or (desc.digest in meta.blobs and meta.diff_id == diff_id):
            cache.add_blob(desc.digest, layer=layer_id, diff_id=diff_id, size=desc.size,
                           media_type=desc.media_type, repo=repo)  # fmt: skip
        else:
            cache.add_repo(desc.digest, repo)  # only if known already
    # Layers were imported apart (in parallel): a path through a lower layer's symlink is
    # followed now, as docker's extraction does (rarely needed; then a rewritten layer).
    from cowfs.layertar import rebase_layers

    image_layers = rebase_layers(store, layer_ids)
    tag = r.local_tag
    image_id = store.add_image(image_layers, config, tags=[tag] if tag else [])
    cache.add_manifest(r.registry, r.repository, digest, image_id)
    if index_digest and not platform:
        # What ensure_image() finds a pull by the index's digest under (default platform only).
        cache.add_manifest(r.registry, r.repository, index_digest, image_id)
    cache.save()
    return PullResult(
        image_id=image_id,
        reference=r,
        manifest_digest=digest,
        layers=len(layer_ids),
        downloaded=len(fetched),
        downloaded_bytes=sum(d.size for d, _ in missing.values()),
        tag=tag,
    )


def _parse_config(data: bytes, where: str) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except ValueError:
        raise RegistryError(f"{where}: image config is not JSON") from None
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and d.startswith("sha256:") and len(d) == 71 for d in diff_ids
    ):
        raise RegistryError(f"{where}: image config has no valid rootfs.diff_ids")
    return config


def _fetch_layers(
    store: Store,
    client: RegistryClient,
    r: Reference,
    todo: list[tuple[mf.Descriptor, str]],
    jobs: int,
    progress: Progress,
) -> dict[str, str]:
    """Download and import layers in parallel; blob digest -> layer id. The first error (or
    Ctrl-C) breaks off the other downloads at once; layers already imported stay (they are
    complete, and a retry will not fetch them again)."""
    if not todo:
        return {}
    from cowfs.layertar import import_layer

    with Workers(client, jobs, "cowfs-pull") as workers:
        # Inside the Workers block Ctrl-C is not raised mid-way: the staging directory made
        # here is always removed by the `finally` below.
        staging = Path(store.mkdtemp("pull"))

        def one(desc: mf.Descriptor, diff_id: str) -> str:
            path = staging / desc.digest.removeprefix("sha256:")
            with open(path, "wb") as f:
                client.fetch_blob(r.repository, desc, f, progress=progress.advance,
                                  cancel=workers.cancel)  # fmt: skip
            if workers.cancel.is_set():
                raise RegistryError("cancelled")
            layer_id = import_layer(
                store, path, media_type=desc.media_type, expect_digest=desc.digest,
                expect_diff_id=diff_id,
            )  # fmt: skip
            path.unlink()
            return layer_id

        try:
            progress.begin(sum(d.size for d, _ in todo), len(todo))
            layer_ids = workers.run([partial(one, d, diff) for d, diff in todo])
        finally:
            progress.end()
            shutil.rmtree(staging, ignore_errors=True)
    return {d.digest: layer_id for (d, _), layer_id in zip(todo, layer_ids, strict=True)}


def ensure_image(store: Store, ref: str, **opts: Any) -> str:
    """The id of image `ref`: found in the store (by tag, id or an earlier pull), else pulled.

    Options are pull()'s (platform, insecure, authfile, progress).
    """
    try:
        return store.resolve(ref).id
    except NotFound:
        pass
    try:
        r = parse(ref)
    except InvalidInput:
        raise NotFound(f"image {ref} not found") from None
    if r.local_tag:
        try:
            return store.resolve(r.local_tag).id
        except NotFound:
            pass
    if r.digest:
        image_id = RegistryCache(store.cache_dir).image_of(r.registry, r.repository, r.digest)
        if image_id is not None:
            try:
                return store.image(image_id).id
            except NotFound:
                pass
    return pull(store, r, **opts).image_id
