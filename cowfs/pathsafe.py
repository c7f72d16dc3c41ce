"""Lexical safety of paths found in archives (tar entry names, hard-link targets).

The first of umoci's two stages: a name from an archive is cleaned without touching any
filesystem. Leading "./" and "/" are dropped (an absolute name means "relative to the image root",
as every OCI tool reads it), "//" and "." components collapse, and ".." is resolved lexically.
What cannot be made safe is refused with UnsafePath: a ".." that climbs above the root, a NUL byte,
a component longer than NAME_MAX. The result is a TOC path: '/'-separated, no leading or trailing
slash, '' for the root itself.

The second stage (a parent that is a symlink must not be followed out of the root) needs the tree
being built, so it lives where the tree is: layertar checks parents against the layer's entries.
This module is pure.
"""

from __future__ import annotations

from cowfs.errors import UnsafePath

NAME_MAX = 255  # bytes per component, as Linux filesystems allow


def clean(name: str) -> str:
    """The cleaned, root-relative form of an archive entry name; raises UnsafePath."""
    if "\0" in name:
        raise UnsafePath(f"{name!r}: NUL byte in name")
    parts = name.split("/")
    # The common case, a name already clean, is checked with C loops (an import does this once
    # per entry): no empty, "." or ".." component, none that could exceed NAME_MAX bytes (a
    # character is at most 4 bytes in UTF-8; surrogate escapes are 3).
    if "" not in parts and "." not in parts and ".." not in parts and \
            max(map(len, parts)) <= NAME_MAX // 4:  # fmt: skip
        return name
    out: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                raise UnsafePath(f"{name!r}: '..' escapes the root")
            out.pop()
            continue
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise UnsafePath(f"{name!r}: a component is longer than {NAME_MAX} bytes")
        out.append(part)
    return "/".join(out)


def clean_link(target: str, *, entry: str) -> str:
    """A hard-link target scoped like an entry name (tar hard links are root-relative).

    `entry` is the name of the link itself, for the error message. The root cannot be a target.
    """
    try:
        cleaned = clean(target)
    except UnsafePath as exc:
        raise UnsafePath(f"{entry!r}: hard-link target {exc.message}") from None
    if not cleaned:
        raise UnsafePath(f"{entry!r}: hard link to the root directory")
    return cleaned


def join(parent: str, name: str) -> str:
    """TOC path of `name` inside `parent` ('' is the root)."""
    return f"{parent}/{name}" if parent else name
