"""Commit: an upper directory becomes a new layer on top of its base image, and a new image.

The upper is in kernel-overlayfs format; its whiteouts and opaque dirs become the layer TOC's
whiteouts and opaques (which export writes as `.wh.<name>` and `.wh..wh..opq`), its entries the
layer's entries, the upper's root included: the merged root shows the upper root's metadata, so
the committed image must too. Times are normalised as a tar carries them (atime and ctime equal
mtime), like every other layer import, so committing and exporting agree.

The upper must not change while it is committed: commit a stopped container, or one whose
processes do not write (the mount's daemon itself never writes on its own).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shlex
from collections.abc import Container, Iterable
from typing import Any

from cowfs import layertar, overlaydir
from cowfs.errors import InvalidInput
from cowfs.store import Store, normalize_ref
from cowfs.toc import REG, SOCK, Toc

# Files a container runtime bind-mounts over (generated per container). When the image lacks
# them, the runtime leaves empty placeholders in the upper: they are not the container's changes
# (docker keeps them in an "init" layer below the container's), so diff and commit skip them.
CONTAINER_PLACEHOLDERS = ("etc/hostname", "etc/hosts", "etc/resolv.conf")


def placeholders(upper: Toc, below: Container[str], candidates: Iterable[str]) -> set[str]:
    """The candidates that are empty regular files in `upper` and absent from `below`."""
    out = set()
    for path in candidates:
        e = upper.entries.get(path)
        if e is not None and e.kind == REG and e.size == 0 and path not in below:
            out.add(path)
    return out


def upper_layer(store: Store, upper_dir: str | os.PathLike, skip: Iterable[str] = ()) -> str:
    """Store the upper dir `upper_dir` as one layer, leaving out the paths `skip`; returns the
    layer id (diff_id recorded)."""
    upper_dir = os.fspath(upper_dir)
    toc = overlaydir.scan(upper_dir)
    for path in skip:
        toc.entries.pop(path, None)
    for e in toc:
        e.atime = e.ctime = e.mtime
    carried: set[int] = set()  # hard-link groups whose content is stored already
    with store.new_layer() as lb:
        for path in sorted(toc.entries, key=_tree_key):
            e = toc.entries[path]
            if e.kind == SOCK:
                continue  # a socket is a live endpoint, not content: docker drops them too
            if e.kind == REG and e.size and e.link not in carried:
                with overlaydir.open_under(upper_dir, path) as f:
                    lb.add(e, f)
                if e.link:
                    carried.add(e.link)
            else:
                lb.add(e)  # later names of a link group get the first one's digest
        for path in toc.whiteouts:
            lb.whiteout(path)
        for path in toc.opaque:
            lb.opaque(path)
        layer_id = lb.commit()
    # The diff_id is the sha256 of the tar export writes; it reads the contents back from the
    # store, so it describes what was stored, even if the upper changed meanwhile.
    with open(os.devnull, "wb") as sink:
        info = layertar.export_layer(store, layer_id, sink, compression=None)
    blobs = {info.diff_id: layertar.MEDIA_TAR}
    store.update_layer_meta(layer_id, diff_id=info.diff_id, blobs=blobs)
    return layer_id


def commit_upper(
    store: Store,
    base_ref: str,
    upper_dir: str | os.PathLike,
    tag: str | None,
    config_changes: dict[str, Any] | None = None,
    *,
    message: str = "",
    author: str = "",
    container_placeholders: bool = False,
) -> str:
    """Commit `upper_dir` as a new image: the base image's layers plus the upper as a layer.

    `config_changes` are merged into the image config's `config` object (Cmd, Env, ...). The new
    config carries a history entry and rootfs.diff_ids when every layer's diff_id is known.
    Returns the image id; `tag` (if any) points at it. With `container_placeholders`, the
    runtime's empty placeholders (CONTAINER_PLACEHOLDERS) are left out.
    """
    if tag is not None:
        tag = normalize_ref(tag)
        if "@" in tag:
            raise InvalidInput(f"cannot tag with a digest reference: {tag}")
    base = store.resolve(base_ref)
    if not os.path.isdir(upper_dir):
        raise InvalidInput(f"upper directory {os.fspath(upper_dir)} does not exist")
    skip: set[str] = set()
    if container_placeholders:
        from cowfs.mounting import image_index

        below = image_index(store, base).entries
        skip = placeholders(overlaydir.scan(upper_dir), below, CONTAINER_PLACEHOLDERS)
    layer_id = upper_layer(store, upper_dir, skip)
    layers = [*base.layers, layer_id]
    config = _new_config(store, base.config, layers, config_changes, message, author)
    return store.add_image(layers, config, tags=[tag] if tag else [])


def _new_config(
    store: Store, base: dict[str, Any], layers: list[str], changes: dict[str, Any] | None,
    message: str, author: str,
) -> dict[str, Any]:  # fmt: skip
    config = copy.deepcopy(base)
    if changes:
        inner = config.setdefault("config", {})
        if not isinstance(inner, dict):
            raise InvalidInput("base image config has a malformed 'config' object")
        apply_changes(inner, changes)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    config["created"] = now
    if author:
        config["author"] = author
    diff_ids = [store.layer_meta(layer_id).diff_id for layer_id in layers]
    if all(diff_ids):
        config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    else:
        config.pop("rootfs", None)  # a partial list would be wrong; export fills it in
    entry: dict[str, Any] = {"created": now, "created_by": "cowfs commit"}
    if author:
        entry["author"] = author
    if message:
        entry["comment"] = message
    history = config.get("history")
    config["history"] = [*(history if isinstance(history, list) else []), entry]
    return config


def _tree_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) if path else ()


def apply_changes(inner: dict[str, Any], changes: dict[str, Any]) -> None:
    """Apply `changes` to an image config's `config` object: keys replace what was there,
    except `Env` (merged by variable name), `Labels` and `ExposedPorts` (merged by key)."""
    for key, value in copy.deepcopy(changes).items():
        if key == "Env":
            env = {e.partition("=")[0]: e for e in inner.get("Env") or []}
            env.update({e.partition("=")[0]: e for e in value})
            inner["Env"] = list(env.values())
        elif key in ("Labels", "ExposedPorts"):
            inner[key] = {**(inner.get(key) or {}), **value}
        else:
            inner[key] = value


_INSTRUCTIONS = {"CMD": "Cmd", "ENTRYPOINT": "Entrypoint", "ENV": "Env", "WORKDIR": "WorkingDir",
                 "USER": "User", "LABEL": "Labels", "EXPOSE": "ExposedPorts",
                 "STOPSIGNAL": "StopSignal"}  # fmt: skip


def parse_change(text: str) -> dict[str, Any]:
    """One `docker commit --change` instruction -> config changes.

    CMD/ENTRYPOINT take JSON (exec form) or a shell string; ENV and LABEL take KEY=VALUE pairs
    (ENV also `KEY VALUE`); WORKDIR, USER, STOPSIGNAL a word; EXPOSE ports (`80`, `53/udp`).
    """
    word, _, rest = text.strip().partition(" ")
    key = _INSTRUCTIONS.get(word.upper())
    rest = rest.strip()
    if key is None or not rest:
        known = ", ".join(sorted(_INSTRUCTIONS))
        raise InvalidInput(f"unsupported --change {text!r} (one of {known}, with a value)")
    if key in ("Cmd", "Entrypoint"):
        if rest.startswith("["):
            try:
                value = json.loads(rest)
            except ValueError:
                raise InvalidInput(f"--change {text!r}: not a JSON list") from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidInput(f"--change {text!r}: expected a JSON list of strings")
            return {key: value}
        return {key: ["/bin/sh", "-c", rest]}
    if key == "Env":
        pairs = _pairs(rest, text) if "=" in rest.split(" ", 1)[0] else [rest.split(" ", 1)]
        return {"Env": [f"{k}={v.strip()}" for k, v in pairs]}
    if key == "Labels":
        return {"Labels": dict(_pairs(rest, text))}
    if key == "ExposedPorts":
        ports = [p if "/" in p else p + "/tcp" for p in rest.split()]
        return {"ExposedPorts": {p: {} for p in ports}}
    return {key: rest}


def _pairs(rest: str, text: str) -> list[tuple[str, str]]:
    out = []
    for item in shlex.split(rest):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise InvalidInput(f"--change {text!r}: expected KEY=VALUE")
        out.append((k, v))
    return out
