"""The container isolation suite, gathered in one place, through `cowfs run` as a user runs it.

What is checked where:
- tests/test_runtime_e2e.py::test_isolation: pid namespace (no host process visible), mount
  denied, /proc/sys, /proc/sysrq-trigger and /sys read-only, masked /proc files, docker's default
  capability set and no_new_privs, uts (hostname, hosts), net (lo only), the private /dev set;
  test_pids_limit_stops_a_fork_bomb and test_memory_limit_oom_kills_and_is_reported: cgroups.
- here, the escape attempts: a static probe program in the image tries open_by_handle_at
  (shocker: needs CAP_DAC_READ_SEARCH), mknod of the host's disk and of /dev/mem and reading
  them, the classic chroot escape, and signalling a host process; the image itself carries
  device nodes of the host's disk, setuid programs, and symlinks to host paths (absolute and by
  `..`) in the places the runtime writes to or mounts on (/etc/hosts, /etc/hostname, the
  workdir, a volume target, /proc and /dev) — nothing on the host may change or be seen.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs import layertar
from cowfs.rootfs import default_config
from cowfs.store import Store
from tests.conftest import need_tool
from tests.test_hostile import d, snapshot, sym, tar, ti
from tests.test_runtime_e2e import Cowfs, cowfs  # noqa: F401  (the fixture: cleans up containers)

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static const char *res(int rc) { return rc >= 0 ? "ok" : strerror(errno); }

static void try_read(const char *name, const char *path) {
    int fd = open(path, O_RDONLY);
    char buf[512];
    if (fd < 0) { printf("%s=%s\n", name, strerror(errno)); return; }
    ssize_t n = read(fd, buf, sizeof buf);
    printf("%s=%s\n", name, n > 0 ? "READ" : (n == 0 ? "empty" : strerror(errno)));
    close(fd);
}

int main(int argc, char **argv) {
    unsigned maj = atoi(argv[1]), min = atoi(argv[2]);
    const char *marker = argv[3];
    int hostpid = atoi(argv[4]);

    /* shocker: a handle for inode 2 (the root) of the host file system behind /etc/hosts */
    struct { struct file_handle fh; unsigned char id[8]; } h;
    unsigned ino = 2, gen = 0;
    h.fh.handle_bytes = 8;
    h.fh.handle_type = 1; /* FILEID_INO32_GEN */
    memcpy(h.fh.f_handle, &ino, 4);
    memcpy(h.fh.f_handle + 4, &gen, 4);
    int mfd = open("/etc/hosts", O_RDONLY);
    printf("open_by_handle_at=%s\n", res(open_by_handle_at(mfd, &h.fh, O_RDONLY)));

    printf("mknod_blk=%s\n", res(mknod("/blk", S_IFBLK | 0600, makedev(maj, min))));
    try_read("read_mknod_blk", "/blk");
    printf("mknod_dev_blk=%s\n", res(mknod("/dev/blk", S_IFBLK | 0600, makedev(maj, min))));
    try_read("read_dev_blk", "/dev/blk");
    try_read("read_dev_zero", "/dev/zero");
    printf("mknod_mem=%s\n", res(mknod("/mem", S_IFCHR | 0600, makedev(1, 1))));
    try_read("read_mknod_mem", "/mem");
    try_read("read_image_blk", "/image-disk");
    try_read("read_image_mem", "/image-mem");
    printf("mknod_fuse=%s\n", res(mknod("/fuse", S_IFCHR | 0600, makedev(10, 229))));
    try_read("open_fuse", "/fuse");

    printf("kill_host=%s\n", res(kill(hostpid, 0)));
    printf("core_pattern=%s\n", res(open("/proc/sys/kernel/core_pattern", O_WRONLY)));

    /* the classic chroot escape: chroot into a subdir, keep a fd of the old root, climb */
    int root = open("/", O_RDONLY | O_DIRECTORY);
    mkdir("/esc", 0755);
    if (chroot("/esc") == 0 && fchdir(root) == 0) {
        for (int i = 0; i < 200; i++) chdir("..");
        chroot(".");
    }
    printf("chroot_escape=%s\n", access(marker, F_OK) == 0 ? "ESCAPED" : "contained");
    return 0;
}
"""


HOST_DISK_BYTES = b"HOST DISK " * 52  # what the test's own host disk holds (520 bytes)


@pytest.fixture
def host_disk(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(major, minor) of a block device of the host that anyone on the host may read: a loop
    device of the test's own, so that a container reading it is a read that could succeed."""
    need_tool("losetup")
    image = tmp_path / "host-disk.img"
    image.write_bytes(HOST_DISK_BYTES.ljust(1 << 20, b"\0"))
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        os.chmod(dev, 0o666)
        with open(dev, "rb") as f:
            assert f.read(len(HOST_DISK_BYTES)) == HOST_DISK_BYTES  # the host can read it
        st = os.stat(dev)
        yield os.major(st.st_rdev), os.minor(st.st_rdev)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


@pytest.fixture
def hostile(cowfs: Cowfs, tmp_path: Path,  # noqa: F811
            host_disk: tuple[int, int]) -> tuple[str, Path, Path]:  # fmt: skip
    """("hostile:1", canary dir, probe source dir): busybox plus a layer aimed at the host."""
    need_tool("gcc")
    canary = tmp_path / "canary"
    (canary / "dir").mkdir(parents=True)
    (canary / "keep").write_text("canary\n")
    src = tmp_path / "probe.c"
    src.write_text(PROBE_C)
    binary = tmp_path / "probe"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(binary), str(src)], check=True,
                   capture_output=True)  # fmt: skip
    maj, mnr = host_disk
    busybox = Path("/bin/busybox").read_bytes()
    up = "../" * 30 + str(canary).lstrip("/")
    layer = tar(
        (ti("probe", mode=0o755), binary.read_bytes()),
        d("suidbin"), (ti("suidbin/busybox", mode=0o4755, uid=0, gid=0), busybox),
        (ti("image-disk", tarfile.BLKTYPE, devmajor=maj, devminor=mnr, mode=0o666), None),
        (ti("image-mem", tarfile.CHRTYPE, devmajor=1, devminor=1, mode=0o666), None),
        sym("host-abs", str(canary / "keep")), sym("host-rel", up + "/keep"),
        d("etc"), sym("etc/hosts", str(canary / "keep")), sym("etc/hostname", up + "/keep"),
        sym("etc/resolv.conf", str(canary / "dir")),
        sym("wd", str(canary / "wd")), sym("vol", str(canary / "vol")),  # absent on the host
    )  # fmt: skip
    store = Store(cowfs.root)  # type: ignore[attr-defined]
    blob = tmp_path / "layer.tar"
    blob.write_bytes(layer)
    base = store.resolve("busybox:latest")
    layer_id = layertar.import_layer(store, blob)
    store.add_image([*base.layers, layer_id], base.config or default_config([], "x"),
                    tags=["hostile:1"])  # fmt: skip
    return "hostile:1", canary, tmp_path


def test_escape_attempts_fail(cowfs: Cowfs, hostile: tuple[str, Path, Path],  # noqa: F811
                              host_disk: tuple[int, int]) -> None:  # fmt: skip
    ref, canary, tmp_path = hostile
    marker = tmp_path / "host-marker"
    marker.write_text("host\n")
    before = snapshot(canary, marker)
    maj, mnr = host_disk
    proc = cowfs("run", "--rm", ref, "/probe", str(maj), str(mnr), str(marker), str(os.getpid()))
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert out["open_by_handle_at"] == "Operation not permitted", out  # no CAP_DAC_READ_SEARCH
    assert out["mknod_blk"] == "ok" and out["mknod_dev_blk"] == "ok", out  # CAP_MKNOD, as docker
    for what in ("read_mknod_blk", "read_dev_blk", "read_mknod_mem", "read_image_blk",
                 "read_image_mem", "open_fuse"):  # fmt: skip
        assert out[what] != "READ", (what, out)
    assert out["read_dev_zero"] == "READ", out  # the safe devices still open
    assert out["kill_host"] == "No such process", out  # another pid namespace
    assert out["core_pattern"] != "ok", out
    assert out["chroot_escape"] == "contained", out
    assert snapshot(canary, marker) == before


def test_symlinks_to_host_paths_stay_inside(cowfs: Cowfs, hostile: tuple[str, Path, Path]  # noqa: F811
                                            ) -> None:  # fmt: skip
    ref, canary, _tmp = hostile
    before = snapshot(canary)
    script = """
    cd / && cd .. && cd .. && ls / | tr '\\n' , && echo
    ls /.. | tr '\\n' , && echo
    cat /host-abs 2>/dev/null || echo abs=unreadable
    cat /host-rel 2>/dev/null || echo rel=unreadable
    echo pwned > /host-abs; echo pwned > /host-rel; echo pwned > /wd/x; echo pwned > /vol/x
    echo pwned >> /etc/hosts; echo pwned >> /etc/hostname; echo pwned > /etc/resolv.conf/x
    true
    """
    # /etc/hosts, /etc/hostname and /etc/resolv.conf are where the runtime bind-mounts its
    # generated files: here they are symlinks to host paths, which resolve inside the root (the
    # runtime then mounts its files there: /host-abs may show them, never the host's file).
    proc = cowfs("run", "--rm", ref, "sh", "-c", script)
    assert snapshot(canary) == before, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == lines[1], "'..' of / is not /"
    assert "canary" not in lines, "a host file was read through a symlink"


@pytest.mark.parametrize("args", [("-w", "/wd"), ("-v", "{vol}:/vol")], ids=["workdir", "volume"])
def test_workdir_and_volume_through_symlinks_to_host_paths(
        cowfs: Cowfs, hostile: tuple[str, Path, Path], args: tuple[str, str]  # noqa: F811
) -> None:  # fmt: skip
    """A workdir or volume target that is a symlink to a host path resolves inside the root,
    as docker does; the host path it names never changes."""
    ref, canary, tmp_path = hostile
    vol = tmp_path / "vol"
    vol.mkdir()
    before = snapshot(canary)
    argv = [a.replace("{vol}", str(vol)) for a in args]
    proc = cowfs("run", "--rm", *argv, ref, "sh", "-c", "echo pwned > x; echo pwned > /vol/y; pwd")
    assert snapshot(canary) == before, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr
    if args[0] == "-w":
        assert proc.stdout == f"{canary / 'wd'}\n"  # the same path, inside the root
    else:
        assert [p.name for p in vol.iterdir()] == ["y"]  # the volume is where /vol points


def test_setuid_in_the_image_does_not_raise_privileges(cowfs: Cowfs,  # noqa: F811
                                                       hostile: tuple[str, Path, Path]) -> None:
    ref, _canary, _tmp = hostile
    proc = cowfs("run", "--rm", "-u", "1000:1000", ref, "/suidbin/busybox", "sh", "-c",
                 "id -u; cat /proc/self/status | grep -E '^(CapEff|NoNewPrivs)' | tr -d '\\t'")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["1000", "CapEff:0000000000000000", "NoNewPrivs:1"]


def test_container_writes_reach_only_its_upper(cowfs: Cowfs, tmp_path: Path) -> None:  # noqa: F811
    root = cowfs.root  # type: ignore[attr-defined]
    before = snapshot(tmp_path / "outside") | {"/pwned": (os.path.lexists("/pwned"),)}
    proc = cowfs("run", "--name", "w", "busybox", "sh", "-c",
                 "echo pwned > /pwned; mkdir -p /tmp/x; echo y > /tmp/x/y; rm /bin/ls")
    assert proc.returncode == 0, proc.stderr
    assert not os.path.lexists("/pwned")
    assert snapshot(tmp_path / "outside") | {"/pwned": (False,)} == before
    (cid,) = [p.name for p in (root / "containers").iterdir()]
    upper = root / "containers" / cid / "upper"
    assert (upper / "pwned").read_text() == "pwned\n"
    assert os.stat(upper / "bin" / "ls", follow_symlinks=False).st_rdev == 0  # a whiteout
    assert os.path.isfile("/bin/ls") or os.path.isfile("/usr/bin/ls")
