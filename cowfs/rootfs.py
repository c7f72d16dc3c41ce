"""A root filesystem (a host directory or a tar of one) → a one-layer image.

A directory is walked with overlaydir.scan (dir fds, hard links as groups, xattrs), its files are
streamed into the store, and the diff_id is the sha256 of the tar that export_layer would write
for it, so the image config's rootfs.diff_ids is right without writing that tar anywhere. Times
are normalised as a tar would carry them (atime and ctime equal mtime): importing the same tree
twice gives the same layer, however often it was read in between. A tar goes through
layertar.import_layer unchanged.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from cowfs import layertar, overlaydir
from cowfs.errors import InvalidInput, NotFound
from cowfs.store import Store, normalize_ref
from cowfs.toc import REG, SOCK

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Go's names for architectures, as OCI configs spell them.
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}  # fmt: skip


def host_architecture() -> str:
    machine = platform.machine()
    return _GOARCH.get(machine, machine)


def default_config(diff_ids: list[str], created_by: str) -> dict[str, Any]:
    """A minimal OCI image config for an image built from a root filesystem."""
    return {
        "architecture": host_architecture(),
        "os": "linux",
        "config": {"Env": [DEFAULT_PATH], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created_by": created_by}],
    }


def busybox_rootfs(dest: str | os.PathLike, busybox: str = "/bin/busybox") -> None:
    """A minimal root filesystem at `dest`: Debian's static busybox and its applet symlinks.

    For demos and tests (the runtime's, mostly); needs the busybox-static package.
    """
    import shutil
    import subprocess

    dest = os.fspath(dest)
    if not os.path.isfile(busybox):
        raise NotFound(f"{busybox} not found (install busybox-static)")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev", "root"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    os.chmod(os.path.join(dest, "tmp"), 0o1777)
    shutil.copy2(busybox, os.path.join(dest, "bin", "busybox"))
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    for applet in applets:
        link = os.path.join(dest, applet)
        if applet == "bin/busybox" or os.path.lexists(link):
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink("/bin/busybox", link)
    with open(os.path.join(dest, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    with open(os.path.join(dest, "etc", "group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")


def import_dir_layer(store: Store, root: str | os.PathLike) -> str:
    """Store the tree under the host directory `root` as one layer; returns the layer id."""
    root = os.fspath(root)
    toc = overlaydir.scan(root)
    if toc.whiteouts:
        first = sorted(toc.whiteouts)[0]
        raise InvalidInput(f"{root}/{first}: a 0/0 character device (overlay whiteout) in a rootfs")
    toc.opaque.clear()  # a bottom layer has nothing below it to hide
    for path in [p for p, e in toc.entries.items() if e.kind == SOCK]:
        del toc.entries[path]  # sockets belong to running programs, not to images (as docker)
    opener = layertar.host_opener(root)
    for e in toc:
        e.atime = e.ctime = e.mtime
    carried: set[int] = set()  # hard-link groups whose content is stored
    with store.new_layer() as lb:
        for e in sorted(toc, key=lambda e: e.path):
            if e.kind == REG and e.size and e.link not in carried:
                lb.add(e, os.path.join(root, e.path))
                if e.link:
                    carried.add(e.link)
            else:
                lb.add(e)  # the builder gives later names of a group the first one's digest
        diff_id = layertar.write_blob(lb.toc, None, opener, compression=None).diff_id
        return lb.commit(diff_id=diff_id, blobs={diff_id: layertar.MEDIA_TAR})


def import_rootfs(store: Store, dir_or_tar: str | os.PathLike, ref: str,
                  progress: layertar.Progress | None = None) -> str:  # fmt: skip
    """Make a one-layer image tagged `ref` from a directory or a (compressed) tar; its id."""
    ref = normalize_ref(ref)
    src = os.fspath(dir_or_tar)
    if os.path.isdir(src):
        layer_id = import_dir_layer(store, src)
    elif os.path.isfile(src):
        layer_id = layertar.import_layer(store, src, progress=progress)
    else:
        raise NotFound(f"{src}: no such directory or tar file")
    diff_id = store.layer_meta(layer_id).diff_id
    assert diff_id is not None  # both paths record it
    config = default_config([diff_id], f"cowfs image import-rootfs {os.path.basename(src)}")
    return store.add_image([layer_id], config, tags=[ref])
