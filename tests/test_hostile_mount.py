"""Hostile images after import: mount, copy-up, commit and export write nothing outside the store,
the upper/work pair and the export's output.

tests/test_hostile.py covers import (what is refused, what is read safely); here layers that
import *accepts* but that aim at the host are stacked on a busybox layer and used: symlink chains
pointing out of the root (followed by writes inside the root, as a container would: chroot),
hard links to such symlinks, symlinks of a lower layer hiding under a later layer's files,
device nodes, setuid files, sizes the content does not have, thousands of nested directories and
very long paths. A canary directory, which the hostile names aim at by absolute and by relative
path, and everything else in the test's directory are snapshotted before and after and must be
identical.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cowfs import layertar, oci
from cowfs.commit import commit_upper
from cowfs.rootfs import default_config, import_dir_layer
from cowfs.store import Store
from cowfs.toc import REG, Entry
from tests.conftest import cowfs_mounted, need_fuse, need_tool
from tests.test_hostile import d, f, hard, snapshot, sym, tar, ti

DEPTH = 1200  # nested directories (beyond Python's default recursion limit of 1000)


@dataclass
class Env:
    base: Path
    canary: Path
    store: Store
    busybox_layer: str

    def image(self, name: str, *layers: bytes) -> str:
        ids = [self.busybox_layer]
        for blob in layers:
            blob_path = self.base / "blob"
            blob_path.write_bytes(blob)
            ids.append(layertar.import_layer(self.store, blob_path))
            blob_path.unlink()
        self.store.add_image(ids, default_config([], "hostile"), tags=[f"{name}:1"])
        return f"{name}:1"

    def outside(self) -> dict[str, tuple]:
        """Everything the test may not change: the canary and every non-store dir."""
        snap = snapshot(self.canary)
        for p in self.base.iterdir():
            if p.name not in ("store", "canary", "m", "m2", "export"):
                snap.update(snapshot(p))
        snap["/tmp/pwned"] = (os.path.lexists("/tmp/pwned"),)
        return snap


@pytest.fixture
def env(tmp_path: Path, busybox_rootfs_dir: Path) -> Env:
    need_fuse()
    need_tool("chroot")
    canary = tmp_path / "canary"
    (canary / "dir").mkdir(parents=True)
    (canary / "keep").write_text("canary\n")
    os.chmod(canary / "keep", 0o666)
    store = Store(tmp_path / "store")
    return Env(tmp_path, canary, store, import_dir_layer(store, busybox_rootfs_dir))


def chroot(mnt: Path, script: str) -> subprocess.CompletedProcess:
    """Run `script` in busybox sh with the mount as its root (paths resolve inside it)."""
    return subprocess.run(["chroot", str(mnt), "/bin/sh", "-c", script], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def use_everywhere(env: Env, ref: str, script: str,
                   host_ops: Callable[[Path], None] | None = None) -> None:  # fmt: skip
    """Mount, change through the chroot and host ops, commit, mount the commit, export both;
    nothing outside may change at any step."""
    before = env.outside()
    with cowfs_mounted(env.store, ref, env.base / "m") as (mnt, _pid):
        chroot(mnt, script)
        if host_ops is not None:
            host_ops(mnt)
        chroot(mnt, "find / -xdev > /dev/null 2>&1; true")
    assert env.outside() == before, "a change outside the store at mount or copy-up"
    commit_upper(env.store, ref, env.base / "m" / "upper", "committed:1")
    with cowfs_mounted(env.store, "committed:1", env.base / "m2") as (mnt, _pid):
        chroot(mnt, script)
    assert env.outside() == before, "a change outside the store at commit"
    for name in (ref, "committed:1"):
        out = env.base / "export" / name.replace(":", "-")
        oci.export_image(env.store, name, str(out), fmt="oci", compression=None)
    assert env.outside() == before, "a change outside the store at export"


def test_symlink_chains_out_of_the_root(env: Env) -> None:
    rel = os.path.relpath(env.canary, env.base / "m" / "mnt")  # ../../canary from the mount
    ref = env.image("links", tar(
        sym("abs", str(env.canary)), sym("abs-keep", str(env.canary / "keep")),
        sym("c1", "c2"), sym("c2", "c3"), sym("c3", rel), sym("deep/c4", "../" * 40 + rel),
        d("deep"), hard("h", "abs"), sym("etc/hosts", str(env.canary / "keep")),
        sym("loop", "loop"),
    ))  # fmt: skip
    script = """
    echo pwned > /abs/new; echo pwned >> /abs-keep; echo pwned > /abs/keep
    mkdir -p /c1/dir/x; echo pwned > /c1/keep; echo pwned > /deep/c4/keep
    echo pwned > /h/keep; echo pwned >> /etc/hosts; echo pwned > /loop
    ln -s /abs/keep /l2; echo pwned > /l2; cp /bin/busybox /c1/dir/
    mv /abs /moved; echo pwned > /moved/keep; chmod 777 /abs-keep; touch /abs-keep
    """

    def host_ops(mnt: Path) -> None:
        # Operations on the links themselves (no host-side following): copy-ups of symlinks.
        os.lchown(mnt / "c1", 1, 1)
        os.utime(mnt / "c2", ns=(1, 1), follow_symlinks=False)
        os.rename(mnt / "c3", mnt / "c3-renamed")
        os.link(mnt / "deep/c4", mnt / "c4-link", follow_symlinks=False)
        os.unlink(mnt / "h")

    use_everywhere(env, ref, script, host_ops)


def test_lower_symlink_under_a_later_layers_files(env: Env) -> None:
    # Layer 1: a and b are symlinks out of the root. Layer 2: files under a/ and b/ with no
    # directory entries for a and b, so the merge sees files below a lower symlink.
    ref = env.image("shadow", tar(sym("a", str(env.canary)), sym("b", "../../../canary")),
                    tar(f("a/keep", b"layer two\n"), f("b/keep", b"layer two\n"),
                        f("a/dir/x", b"x")))  # fmt: skip
    script = "echo pwned >> /a/keep; echo pwned > /b/keep; rm -rf /a/dir; mkdir /a/new; mv /a /c"
    use_everywhere(env, ref, script)


def test_device_nodes_and_setuid_files(env: Env) -> None:
    ref = env.image("devs", tar(
        (ti("mem", tarfile.CHRTYPE, devmajor=1, devminor=1), None),
        (ti("disk", tarfile.BLKTYPE, devmajor=254, devminor=0), None),
        (ti("fifo", tarfile.FIFOTYPE), None),
        (ti("suid", mode=0o4777, uid=0), b"#!/bin/sh\nid\n"),
        (ti("sgid-dir", tarfile.DIRTYPE, mode=0o2777), None),
    ))  # fmt: skip
    # Metadata changes copy the nodes up (mknod in the work dir); nothing opens them.
    script = "chmod 600 /mem /disk; chown 1:1 /fifo; mv /disk /disk2; touch /sgid-dir/new"

    def host_ops(mnt: Path) -> None:
        st = os.stat(mnt / "disk2", follow_symlinks=False)
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(254, 0)
        assert stat.S_IMODE(os.stat(mnt / "suid").st_mode) == 0o4777
        # An unprivileged write clears the setuid bit, as the kernel does on any filesystem.
        write_as_nobody(mnt / "suid", b"x\n")
        assert stat.S_IMODE(os.stat(mnt / "suid").st_mode) & 0o6000 == 0
        assert os.stat(mnt / "sgid-dir" / "new").st_gid == 0

    use_everywhere(env, ref, script, host_ops)


def write_as_nobody(path: Path, data: bytes) -> None:
    """Append `data` to `path` from a process with uid/gid 65534 (the fd is opened first: the
    test's directories are not searchable for that user)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                code = 0 if os.write(fd, data) == len(data) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)


def test_deep_nesting_and_long_paths(env: Env) -> None:
    deep = "/".join(["d"] * DEPTH)
    long_names = "/".join([("n" * 250) + str(i) for i in range(40)])  # ~10 KB of path
    out = "../" * (DEPTH + 5) + "canary"
    ref = env.image("deep", tar(d("deep"), f(f"deep/{deep}/leaf", b"deep\n"),
                                f(f"long/{long_names}/leaf", b"long\n"),
                                sym(f"deep/{deep}/out", out)))  # fmt: skip

    def host_ops(mnt: Path) -> None:
        # Walk down with dir fds (the paths are far over PATH_MAX) and copy the leaves up.
        for top, rel in (("deep", deep), ("long", long_names)):
            fd = os.open(mnt / top, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for part in rel.split("/"):
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
                leaf = os.open("leaf", os.O_RDWR | os.O_APPEND, dir_fd=fd)
                try:
                    os.write(leaf, b"appended\n")
                    assert os.pread(leaf, 100, 0).endswith(b"appended\n")
                finally:
                    os.close(leaf)
                os.mkdir("newdir", dir_fd=fd)
                os.rename("leaf", "newdir/leaf2", src_dir_fd=fd, dst_dir_fd=fd)
            finally:
                os.close(fd)
        # Removing the whole chain: every level is a lower dir, so each becomes a whiteout.
        proc = chroot(mnt, "rm -rf /deep/d && test ! -e /deep/d && echo gone")
        assert proc.stdout == "gone\n", proc.stderr

    use_everywhere(env, ref, "true", host_ops)


def test_sizes_the_content_does_not_have(env: Env) -> None:
    """A layer whose TOC claims more (or less) than its object holds is EIO, not wrong bytes."""
    digest = env.store.objects.put_bytes(b"twelve bytes")
    with env.store.new_layer() as lb:
        lb.add(Entry(path="huge", kind=REG, mode=0o644, size=1 << 50, digest=digest))
        lb.add(Entry(path="short", kind=REG, mode=0o644, size=3, digest=digest))
        lb.add(Entry(path="negative", kind=REG, mode=0o644, size=-1, digest=digest))
        layer = lb.commit()
    env.store.add_image([env.busybox_layer, layer], default_config([], "sizes"), tags=["sizes:1"])
    before = env.outside()
    with cowfs_mounted(env.store, "sizes:1", env.base / "m") as (mnt, _pid):
        assert os.stat(mnt / "huge").st_size == 1 << 50
        for name in ("huge", "short", "negative"):
            with pytest.raises(OSError) as caught:
                (mnt / name).read_bytes()
            assert caught.value.errno == 5, name
            with pytest.raises(OSError):  # and the copy-up is refused too, leaving nothing
                os.open(mnt / name, os.O_RDWR)
            assert not (env.base / "m" / "upper" / name).exists()
        assert (mnt / "bin" / "busybox").stat().st_size > 0
    assert env.outside() == before
    assert json.loads(json.dumps(os.listdir(env.base / "m" / "work"))) == []
