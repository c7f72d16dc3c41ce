"""OCI image layout, OCI archive and docker-save archive, in and out of the store.

Import reads one image from

* an OCI image layout directory (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`), written
  `DIR[:tag]`: the tag picks the manifest whose `org.opencontainers.image.ref.name` is `tag`
  (or ends in `:tag`); without one, a layout holding a single image is unambiguous;
* an OCI archive: a tar of such a layout (`ARCHIVE[:tag]`);
* a docker-save archive (`manifest.json`, `<config>.json`, `<layer>/layer.tar`, `repositories`).

Every blob is checked against its descriptor (sha256 and size), every layer's uncompressed tar
against the config's rootfs.diff_ids; layers may be uncompressed, gzip or zstd whatever the media
type says. Image indexes (multi-platform) resolve to linux on the host's architecture. The image
config is kept as it is. Layers are published one by one as they verify (a layer is invisible
until it is referenced, and gc removes it if the import fails later); the image and its tag are
added last, so a half-imported image is never visible.

Export writes an OCI layout directory (`DIR[:tag]`, added to an existing layout) or a
docker-save archive. Layer tars are regenerated deterministically from the store (layertar), so
the config's rootfs.diff_ids are rewritten to the exported tars; history is kept when it still
matches the layers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from cowfs import layertar
from cowfs.atomic import write_atomic
from cowfs.blobstream import Progress
from cowfs.errors import DigestMismatch, InvalidInput, NotFound
from cowfs.rootfs import host_architecture
from cowfs.store import Image, Store, normalize_ref

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT_VERSION = "1.0.0"
MAX_JSON = 16 << 20  # manifests, indexes and configs are small; refuse to buffer more



# -- sources ---------------------------------------------------------------------------------


class _Source:
    """Where an image's files come from: a layout directory or an archive."""

    name: str

    def open(self, path: str) -> tuple[BinaryIO, int]:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_json(self, path: str, *, digest: str | None = None, size: int | None = None) -> Any:
        f, actual = self.open(path)
        with f:
            if actual > MAX_JSON:
                raise InvalidInput(f"{self.name}: {path} is too large ({actual} bytes)")
            data = f.read(MAX_JSON + 1)
        if size is not None and len(data) != size:
            raise DigestMismatch(f"{self.name}: {path} is {len(data)} bytes, expected {size}")
        if digest is not None:
            _check_digest(data, digest, f"{self.name}: {path}")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{self.name}: {path} is not valid JSON ({exc})") from None

    def blob_path(self, digest: str) -> str:
        alg, _, hexpart = _split_digest(digest)
        return f"blobs/{alg}/{hexpart}"


class _DirSource(_Source):
    def __init__(self, root: str) -> None:
        self.root = root
        self.name = root

    def _full(self, path: str) -> str:
        if path.startswith("/") or ".." in path.split("/"):
            raise InvalidInput(f"{self.name}: unsafe path {path!r} in the layout")
        return os.path.join(self.root, path)

    def open(self, path: str) -> tuple[BinaryIO, int]:
        try:
            f = open(self._full(path), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise InvalidInput(f"{self.name}: {path} is missing") from None
        except OSError as exc:
            raise InvalidInput(f"{self.name}: cannot read {path}: {exc.strerror}") from None
        return f, os.fstat(f.fileno()).st_size

    def exists(self, path: str) -> bool:
        return os.path.exists(self._full(path))


class _TarSource(_Source):
    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            self.members = {_norm(m.name): m for m in self.tar.getmembers()}
        except OSError as exc:
            raise InvalidInput(f"{path}: cannot read it ({exc.strerror})") from None
        except (tarfile.TarError, EOFError):
            raise InvalidInput(f"{path}: not an image archive (not a tar file, or a damaged "
                               "one)") from None  # fmt: skip

    def open(self, path: str) -> tuple[BinaryIO, int]:
        m = self.members.get(_norm(path))
        if m is None:
            raise InvalidInput(f"{self.name}: {path} is missing from the archive")
        try:
            f = self.tar.extractfile(m)  # follows sym- and hard links inside the archive
        except (KeyError, tarfile.TarError) as exc:
            raise InvalidInput(f"{self.name}: {path}: broken link in the archive ({exc})") from None
        if f is None:
            raise InvalidInput(f"{self.name}: {path} is not a file")
        return f, _member_size(self.tar, m)  # type: ignore[return-value]

    def exists(self, path: str) -> bool:
        return _norm(path) in self.members

    def close(self) -> None:
        self.tar.close()


def _member_size(tar: tarfile.TarFile, m: tarfile.TarInfo) -> int:
    seen = 0
    while (m.issym() or m.islnk()) and seen < 40:
        m = tar._find_link_target(m)  # the same lookup extractfile makes
        seen += 1
    return m.size


def _norm(name: str) -> str:
    return os.path.normpath("/" + name).lstrip("/")


def _split_digest(digest: str) -> tuple[str, str, str]:
    alg, sep, hexpart = digest.partition(":") if isinstance(digest, str) else ("", "", "")
    if not sep or alg != "sha256" or len(hexpart) != 64 or not _is_hex(hexpart):
        raise InvalidInput(f"unsupported or malformed digest {digest!r}")
    return alg, sep, hexpart


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


def _check_digest(data: bytes, digest: str, what: str) -> None:
    _split_digest(digest)
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DigestMismatch(f"{what}: content is {actual}, expected {digest}")


def _split_spec(path: str) -> tuple[str, str | None]:
    """`DIR[:tag]` or `ARCHIVE[:tag]` → (path, tag)."""
    if os.path.exists(path):
        return path, None
    base, sep, tag = path.rpartition(":")
    if sep and base and os.path.exists(base) and "/" not in tag:
        return base, tag
    raise NotFound(f"{path}: no such image layout or archive")


# -- import ----------------------------------------------------------------------------------


def import_image(store: Store, path: str | os.PathLike, tag: str | None = None,
                 progress: Progress | None = None) -> str:  # fmt: skip
    """Import one image from an OCI layout (`DIR[:tag]`), OCI archive or docker-save archive.

    `tag` is the name:tag it gets in the store (default: what the source calls it). Returns the
    image id. Raises InvalidInput/DigestMismatch/UnsafePath naming what is wrong.
    """
    src_path, selector = _split_spec(os.fspath(path))
    if tag is not None:
        tag = normalize_ref(tag)
    if os.path.isdir(src_path):
        if not os.path.exists(os.path.join(src_path, "oci-layout")):
            raise InvalidInput(f"{src_path}: not an OCI image layout (no oci-layout file)")
        source: _Source = _DirSource(src_path)
    else:
        source = _TarSource(src_path)
    try:
        default_name = _default_name(src_path)
        if source.exists("manifest.json") and not source.exists("index.json"):
            return _import_docker(store, source, selector, tag, progress)
        if source.exists("index.json"):
            return _import_oci(store, source, selector, tag, default_name, progress)
        raise InvalidInput(
            f"{src_path}: neither an OCI layout/archive nor a docker-save archive "
            "(for a root filesystem tar, use import-rootfs)"
        )
    finally:
        source.close()


def _default_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for suffix in (".tar.gz", ".tgz", ".tar.zst", ".tar", ".oci"):
        base = base.removesuffix(suffix)
    return base.lower() or "image"


def _import_oci(store: Store, source: _Source, selector: str | None, tag: str | None,
                default_name: str, progress: Progress | None) -> str:  # fmt: skip
    if source.exists("oci-layout"):
        layout = source.read_json("oci-layout")
        if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
            raise InvalidInput(f"{source.name}: oci-layout has no imageLayoutVersion")
    index = source.read_json("index.json")
    desc = _pick_manifest(source, index, selector)
    ref_name = (desc.get("annotations") or {}).get(REF_NAME)
    manifest, config, layers = _resolve_manifest(source, desc)
    diff_ids = _diff_ids(config, len(layers), source.name)
    layer_ids = []
    for i, (ldesc, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
        digest = ldesc.get("digest")
        path = source.blob_path(digest)
        f, size = source.open(path)
        with f:
            if ldesc.get("size") is not None and size != ldesc["size"]:
                raise DigestMismatch(
                    f"{source.name}: layer {i} ({digest}) is {size} bytes, "
                    f"the manifest says {ldesc['size']}"
                )
            layer_ids.append(layertar.import_layer(
                store, f, media_type=ldesc.get("mediaType"), expect_digest=digest,
                expect_diff_id=diff_id, progress=progress, blob_size=size, lowers=tuple(layer_ids),
            ))  # fmt: skip
    full_name = (desc.get("annotations") or {}).get(CONTAINERD_NAME)
    if tag is None and full_name:  # docker save (25+) writes an OCI layout naming the image so
        tag = familiar(full_name)
    if tag is None and ref_name:
        tag = _tag_from_ref_name(ref_name, default_name)
    return store.add_image(layer_ids, config, tags=[tag] if tag else [])


def _tag_from_ref_name(ref_name: str, default_name: str) -> str | None:
    # A ref name is either a full reference ("docker.io/library/busybox:1.36") or just a tag.
    if "/" in ref_name or ":" in ref_name:
        return familiar(ref_name)
    return familiar(f"{default_name}:{ref_name}")


def familiar(ref: str) -> str | None:
    """The store's name for a reference found in an archive, as `cowfs pull` names images:
    "docker.io/library/busybox:1" -> "busybox:1". None when it is no usable name."""
    from cowfs.registry.reference import parse

    try:
        return parse(ref).local_tag
    except InvalidInput:
        return None


def _pick_manifest(source: _Source, index: Any, selector: str | None) -> dict[str, Any]:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise InvalidInput(f"{source.name}: index.json lists no manifests")
    if selector is not None:
        hits = [m for m in manifests if _ref_matches(m, selector)]
        if not hits:
            raise NotFound(f"{source.name}: no image tagged {selector!r} "
                           f"(it has: {_names(manifests)})")  # fmt: skip
        return hits[0]
    if len(manifests) == 1:
        return manifests[0]
    raise InvalidInput(f"{source.name} holds {len(manifests)} images; pick one with "
                       f"{source.name}:TAG (it has: {_names(manifests)})")  # fmt: skip


def _ref_matches(desc: dict[str, Any], selector: str) -> bool:
    name = (desc.get("annotations") or {}).get(REF_NAME)
    return name is not None and (name == selector or name.endswith(":" + selector))


def _names(manifests: list[dict[str, Any]]) -> str:
    names = [(m.get("annotations") or {}).get(REF_NAME) for m in manifests]
    return ", ".join(n for n in names if n) or "no tags"


def _resolve_manifest(source: _Source, desc: dict[str, Any],
                      depth: int = 0) -> tuple[dict, dict, list[dict]]:  # fmt: skip
    """Follow a descriptor (through image indexes) to (manifest, config, layer descriptors)."""
    if depth > 4:
        raise InvalidInput(f"{source.name}: image indexes nested too deep")
    digest = desc.get("digest", "")
    doc = source.read_json(source.blob_path(digest), digest=digest, size=desc.get("size"))
    media = doc.get("mediaType") or desc.get("mediaType")
    if media in (MT_INDEX, MT_DOCKER_LIST) or ("manifests" in doc and "layers" not in doc):
        return _resolve_manifest(source, _pick_platform(source, doc), depth + 1)
    if media not in (MT_MANIFEST, MT_DOCKER_MANIFEST, None):
        raise InvalidInput(f"{source.name}: unsupported manifest media type {media!r}")
    cdesc = doc.get("config") or {}
    config = source.read_json(source.blob_path(cdesc.get("digest", "")),
                              digest=cdesc.get("digest"), size=cdesc.get("size"))  # fmt: skip
    layers = doc.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise InvalidInput(f"{source.name}: manifest {digest} has no config or layers")
    return doc, config, layers


def _pick_platform(source: _Source, index: dict[str, Any]) -> dict[str, Any]:
    manifests = index.get("manifests") or []
    arch = host_architecture()
    for m in manifests:
        p = m.get("platform") or {}
        if p.get("os", "linux") == "linux" and p.get("architecture") == arch:
            return m
    if len(manifests) == 1:
        return manifests[0]
    raise InvalidInput(f"{source.name}: no image for linux/{arch} in the index")


def _diff_ids(config: dict[str, Any], n_layers: int, what: str) -> list[str]:
    rootfs = config.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != n_layers:
        raise InvalidInput(
            f"{what}: config lists {len(diff_ids or [])} diff_ids for {n_layers} layers"
        )
    for d in diff_ids:
        _split_digest(d)
    return diff_ids


def _import_docker(store: Store, source: _Source, selector: str | None, tag: str | None,
                   progress: Progress | None) -> str:  # fmt: skip
    manifest = source.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise InvalidInput(f"{source.name}: manifest.json lists no images")
    entry = manifest[0]
    if selector is not None or len(manifest) > 1:
        hits = [m for m in manifest if selector and any(
            t == selector or t.endswith(":" + selector) for t in m.get("RepoTags") or [])]
        if not hits:
            tags = ", ".join(t for m in manifest for t in m.get("RepoTags") or []) or "no tags"
            raise InvalidInput(f"{source.name}: pick one image with {source.name}:TAG "
                               f"(it has: {tags})")  # fmt: skip
        entry = hits[0]
    config_path = entry.get("Config")
    layer_paths = entry.get("Layers")
    if not isinstance(config_path, str) or not isinstance(layer_paths, list):
        raise InvalidInput(f"{source.name}: manifest.json entry without Config or Layers")
    f, _ = source.open(config_path)
    with f:
        raw = f.read(MAX_JSON + 1)
    # docker names the config after its sha256 (the image id): check it when it is so named.
    stem = os.path.basename(config_path).removesuffix(".json")
    if len(stem) == 64 and _is_hex(stem):
        _check_digest(raw, "sha256:" + stem, f"{source.name}: {config_path}")
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"{source.name}: {config_path} is not valid JSON ({exc})") from None
    diff_ids = _diff_ids(config, len(layer_paths), source.name)
    layer_ids = []
    for path, diff_id in zip(layer_paths, diff_ids, strict=True):
        f, size = source.open(path)
        with f:
            layer_ids.append(layertar.import_layer(
                store, f, media_type=MT_DOCKER_LAYER, expect_diff_id=diff_id,
                progress=progress, blob_size=size, lowers=tuple(layer_ids),
            ))  # fmt: skip
    repo_tags = entry.get("RepoTags") or []
    if tag is None and repo_tags:
        tag = familiar(repo_tags[0])
    return store.add_image(layer_ids, config, tags=[tag] if tag else [])


# -- export ----------------------------------------------------------------------------------


def _exported_config(image: Image, diff_ids: list[str]) -> dict[str, Any]:
    config = json.loads(json.dumps(image.config))  # a deep copy
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    history = config.get("history")
    if isinstance(history, list):
        non_empty = [h for h in history if not h.get("empty_layer")]
        if len(non_empty) != len(diff_ids):
            del config["history"]  # it described layers this export does not have
    config.setdefault("os", "linux")
    config.setdefault("architecture", host_architecture())
    return config


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _tag_of(store: Store, image: Image, ref: str) -> str | None:
    """The name:tag an export carries: the ref if it is a tag, else the image's first tag."""
    try:
        norm = normalize_ref(ref)
    except InvalidInput:
        norm = ""
    if store.tags().get(norm) == image.id:
        return norm
    tags = store.tags_of(image.id)
    return tags[0] if tags else None


def export_image(
    store: Store, ref: str, out: str | os.PathLike, fmt: str = "oci",
    compression: str | None = "gzip", progress: Progress | None = None,
) -> str:  # fmt: skip
    """Export the image `ref` to an OCI layout (`DIR[:tag]`) or a docker-save archive.

    Returns the manifest digest (oci) or the config digest (docker-archive). docker-save layers
    are always uncompressed, as docker writes them.
    """
    image = store.resolve(ref)
    if fmt == "oci":
        return _export_oci(store, image, ref, os.fspath(out), compression, progress)
    if fmt == "docker-archive":
        return _export_docker(store, image, ref, os.fspath(out), progress)
    raise InvalidInput(f"unknown export format {fmt!r} (oci or docker-archive)")


def _export_oci(store: Store, image: Image, ref: str, out: str, compression: str | None,
                progress: Progress | None) -> str:  # fmt: skip
    layout, sep, ref_tag = out.rpartition(":")
    if not sep or not layout or "/" in ref_tag:
        layout, ref_tag = out, ""
    if not ref_tag:
        full = _tag_of(store, image, ref)
        ref_tag = full.rpartition(":")[2] if full else ""
    root = Path(layout)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if not (root / "oci-layout").exists():
        write_atomic(root / "oci-layout", _dumps({"imageLayoutVersion": LAYOUT_VERSION}))
    descs, diff_ids = [], []
    for layer_id in image.layers:
        tmp = blobs / f".tmp.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            with open(tmp, "wb") as f:
                info = layertar.export_layer(store, layer_id, f, compression=compression,
                                             progress=progress)  # fmt: skip
            os.replace(tmp, blobs / info.digest.partition(":")[2])
        finally:
            tmp.unlink(missing_ok=True)
        store.update_layer_meta(layer_id, blobs={info.digest: info.media_type})
        descs.append({"mediaType": info.media_type, "digest": info.digest, "size": info.size})
        diff_ids.append(info.diff_id)
    config = _dumps(_exported_config(image, diff_ids))
    config_desc = _put_blob(blobs, config, MT_CONFIG)
    manifest = _dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc,
                       "layers": descs})  # fmt: skip
    mdesc = _put_blob(blobs, manifest, MT_MANIFEST)
    if ref_tag:
        mdesc["annotations"] = {REF_NAME: ref_tag}
    index_path = root / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_bytes())
        except ValueError:
            raise InvalidInput(f"{index_path} exists and is not valid JSON") from None
    # A tag names one manifest: the new export replaces whatever carried that tag before (an
    # untagged export replaces an untagged entry of the same manifest).
    def replaced(m: dict[str, Any]) -> bool:
        name = (m.get("annotations") or {}).get(REF_NAME)
        return name == ref_tag if ref_tag else (name is None and m.get("digest") == mdesc["digest"])

    index["manifests"] = [m for m in index.get("manifests", []) if not replaced(m)] + [mdesc]
    write_atomic(index_path, _dumps(index))
    return mdesc["digest"]


def _put_blob(blobs: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blobs / digest.partition(":")[2]
    if not path.exists():
        write_atomic(path, data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _export_docker(store: Store, image: Image, ref: str, out: str,
                   progress: Progress | None) -> str:  # fmt: skip
    full_tag = _tag_of(store, image, ref)
    tmp_out = f"{out}.tmp.{os.getpid()}"
    work = Path(store.mkdtemp("export"))
    try:
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as tar:
            layer_paths, diff_ids, parent = [], [], ""
            written: dict[str, str] = {}  # diff_id -> where its tar is in the archive
            for layer_id in image.layers:
                blob = work / "layer.tar"
                with open(blob, "wb") as f:
                    info = layertar.export_layer(store, layer_id, f, compression=None,
                                                 progress=progress)  # fmt: skip
                # Directories are named by chain (as docker's v1 ids are), so a layer that
                # appears twice gets two entries; its tar is stored once, then linked to.
                hexid = info.diff_id.partition(":")[2]
                if parent:
                    hexid = hashlib.sha256(f"sha256:{parent} {info.diff_id}".encode()).hexdigest()
                _add(tar, f"{hexid}/", None)
                _add(tar, f"{hexid}/VERSION", b"1.0")
                layer_json = {"id": hexid, **({"parent": parent} if parent else {})}
                _add(tar, f"{hexid}/json", _dumps(layer_json))
                if info.diff_id in written:
                    _add_link(tar, f"{hexid}/layer.tar", f"../{written[info.diff_id]}")
                else:
                    _add_file(tar, f"{hexid}/layer.tar", blob)
                    written[info.diff_id] = f"{hexid}/layer.tar"
                layer_paths.append(f"{hexid}/layer.tar")
                diff_ids.append(info.diff_id)
                parent = hexid
            config = _dumps(_exported_config(image, diff_ids))
            config_hex = hashlib.sha256(config).hexdigest()
            _add(tar, f"{config_hex}.json", config)
            manifest = [{"Config": f"{config_hex}.json",
                         "RepoTags": [full_tag] if full_tag else None,
                         "Layers": layer_paths}]  # fmt: skip
            _add(tar, "manifest.json", _dumps(manifest))
            if full_tag and parent:
                name, _, tag = full_tag.rpartition(":")
                _add(tar, "repositories", _dumps({name: {tag: parent}}))
        os.replace(tmp_out, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(tmp_out):
            os.unlink(tmp_out)
    return "sha256:" + config_hex


def _add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return
    info.mode = 0o644
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.mode = 0o644
    info.size = path.stat().st_size
    with open(path, "rb") as f:
        tar.addfile(info, f)

