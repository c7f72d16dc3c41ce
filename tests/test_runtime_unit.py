"""The runtime's logic without root: step order, error paths, docker's rules, cgroup paths.

Kernel calls go to RecordingSyscalls, which records them as data and injects failures.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cowfs.errors import ContainerError, InvalidInput
from runtime import capabilities, cgroups, namespaces, rootfs, users
from runtime import syscalls as sc
from runtime.bundle import oci_config
from runtime.init import exit_code
from runtime.spec import ContainerSpec, Limits, RunOptions, build, parse_memory, parse_volume
from runtime.state import State, StateDir, Status
from runtime.syscalls import RecordingSyscalls

IMAGE = {"config": {"Env": ["PATH=/bin", "A=1"], "Entrypoint": ["/ep"], "Cmd": ["x", "y"],
                    "WorkingDir": "/srv", "User": "nobody"}}  # fmt: skip


def spec(**kw) -> ContainerSpec:
    return build({"config": {"Cmd": ["sh"]}}, RunOptions(**kw), "c" * 64)


# -- rootfs: the order of mount steps is data -----------------------------------------------------


def mounts(steps: list[rootfs.Step]) -> list[tuple]:
    return [s.args for s in steps if s.op == "mount"]


def test_plan_starts_private_and_bound_then_proc_dev_and_masks(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    steps = rootfs.plan(root, spec(), "/etc-gen")
    m = mounts(steps)
    assert m[0] == (None, "/", None, sc.MS_SLAVE | sc.MS_REC, None)
    assert m[1] == (root, root, None, sc.MS_BIND | sc.MS_REC, None)
    targets = [a[1] for a in m]
    # /dev/null must exist before it is bound over /proc/kcore
    assert targets.index(f"{root}/dev") < targets.index(f"{root}/proc/kcore")
    assert targets.index(f"{root}/proc") < targets.index(f"{root}/proc/sys")
    kcore = next(a for a in m if a[1] == f"{root}/proc/kcore")
    assert kcore[0] == f"{root}/dev/null" and kcore[3] == sc.MS_BIND
    sysfs = next(a for a in m if a[2] == "sysfs")
    assert sysfs[3] & sc.MS_RDONLY
    # /proc/sys: bound, then remounted read-only
    procsys = [a for a in m if a[1] == f"{root}/proc/sys"]
    assert procsys[1][3] & sc.MS_REMOUNT and procsys[1][3] & sc.MS_RDONLY
    nodes = {Path(s.args[0]).name for s in steps if s.op == "mknod"}
    assert nodes == {"null", "zero", "full", "random", "urandom", "tty"}
    assert ("pts/ptmx", f"{root}/dev/ptmx") in [s.args for s in steps if s.op == "symlink"]
    for name in ("hostname", "hosts", "resolv.conf"):
        assert ("/etc-gen/" + name, f"{root}/etc/{name}", None, sc.MS_BIND, None) in m


def test_every_dangerous_step_says_why(tmp_path: Path) -> None:
    root = str(tmp_path)
    steps = rootfs.plan(root, spec(read_only=True), "/e") + rootfs.pivot_steps(root)
    for s in steps:
        if s.op == "pivot_root" or s.op == "umount2" or (
            s.op == "mount" and s.args[3] & (sc.MS_SLAVE | sc.MS_REC | sc.MS_REMOUNT)
        ):
            assert s.why, s


def test_read_only_root_is_the_last_step(tmp_path: Path) -> None:
    root = str(tmp_path)
    steps = rootfs.plan(root, spec(read_only=True, volumes=[f"{tmp_path}:/data:ro"]), "/e")
    remount = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_NODEV
    assert steps[-1].args == (None, root, None, remount | sc.MS_RDONLY, None)
    vol = [s for s in steps if s.op == "mount" and s.args[1] == f"{root}/data"]
    assert [v.args[3] for v in vol] == [sc.MS_BIND | sc.MS_REC, remount | sc.MS_RDONLY]


def test_no_mount_the_container_can_make_a_device_node_on_opens_one(tmp_path: Path) -> None:
    """No device cgroup: the root, /dev and every volume are nodev, and the safe devices are
    each a bind mount of their own (which keeps them openable)."""
    root = str(tmp_path / "root")
    steps = rootfs.plan(root, spec(volumes=[f"{tmp_path}:/data"]), "/e")
    m = mounts(steps)
    remount = sc.MS_BIND | sc.MS_REMOUNT
    for target in (root, f"{root}/dev", f"{root}/data"):
        last = [a for a in m if a[1] == target][-1]
        assert last[3] & remount == remount and last[3] & sc.MS_NODEV, (target, last)
    dev = [a[1] for a in m if a[1].startswith(f"{root}/dev")]
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        node = f"{root}/dev/{name}"
        assert (node, node, None, sc.MS_BIND, None) in m
        assert dev.index(node) < dev.index(f"{root}/dev", 1)  # bound before /dev turns nodev


def test_pivot_order_and_detach() -> None:
    rec = RecordingSyscalls()
    rootfs.pivot(rec, "/new")
    assert rec.calls == [("chdir", "/new"), ("pivot_root", ".", "."),
                         ("umount2", ".", sc.MNT_DETACH), ("chdir", "/")]  # fmt: skip


def test_failed_pivot_stops_before_detaching_anything() -> None:
    rec = RecordingSyscalls(fail_on={"pivot_root": lambda *a: True}, errno=errno.EINVAL)
    with pytest.raises(OSError) as info:
        rootfs.pivot(rec, "/new")
    assert info.value.errno == errno.EINVAL
    assert "umount2" not in rec.names()


def test_failed_mount_aborts_the_plan(tmp_path: Path) -> None:
    root = str(tmp_path)
    rec = RecordingSyscalls(fail_on={"mount": lambda src, tgt, fs, fl, d: fs == "devpts"})
    with pytest.raises(OSError):
        rootfs.apply(rec, rootfs.plan(root, spec(), "/e"))
    assert rec.calls[-1] == ("makedirs", f"{root}/dev/pts")
    assert not any(c[0] == "mount" and c[1] == "mqueue" for c in rec.calls)


def test_missing_masked_proc_files_are_skipped(tmp_path: Path) -> None:
    root = str(tmp_path)
    rec = RecordingSyscalls(fail_on={"mount": lambda s, t, *a: t.endswith("/proc/keys")},
                            errno=errno.ENOENT)  # fmt: skip
    rootfs.apply(rec, rootfs.plan(root, spec(), "/e"))
    assert any(c[0] == "mount" and c[2].endswith("/proc/timer_list") for c in rec.calls)


def test_secure_join_keeps_symlinks_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/", root / "proc")
    os.symlink("../../../../etc", root / "up")
    os.symlink("/etc/../../x", root / "abs")
    assert rootfs.secure_join(str(root), "/proc") == str(root)
    assert rootfs.secure_join(str(root), "/up/passwd") == f"{root}/etc/passwd"
    assert rootfs.secure_join(str(root), "/abs") == f"{root}/x"
    assert rootfs.secure_join(str(root), "/../../a/./b") == f"{root}/a/b"
    os.symlink("loop", root / "loop")
    with pytest.raises(OSError):
        rootfs.secure_join(str(root), "/loop")


def test_etc_files_drop_host_loopback_resolvers(tmp_path: Path) -> None:
    host = tmp_path / "resolv.conf"
    host.write_text("nameserver 127.0.0.53\nnameserver 10.0.0.1\nsearch x\n")
    files = rootfs.etc_files("box", "none", str(host))
    assert files["resolv.conf"] == "nameserver 10.0.0.1\nsearch x\n"
    assert "127.0.1.1\tbox" in files["hosts"] and files["hostname"] == "box\n"
    assert "127.0.0.53" in rootfs.etc_files("box", "host", str(host))["resolv.conf"]


# -- namespaces -----------------------------------------------------------------------------------


def test_unshare_is_one_call_with_every_namespace() -> None:
    rec = RecordingSyscalls()
    namespaces.unshare_all(rec, namespaces.for_network("none"))
    flags = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET | sc.CLONE_NEWPID
    assert rec.calls == [("unshare", flags)]
    assert "net" not in [n.name for n in namespaces.for_network("host")]


def test_join_enters_mount_namespace_last() -> None:
    rec = RecordingSyscalls()
    namespaces.join(rec, os.getpid(), namespaces.for_network("none"))
    assert [c[2] for c in rec.calls] == [n.flag for n in namespaces.NAMESPACES]
    assert rec.calls[-1][2] == sc.CLONE_NEWNS


def test_failed_setns_closes_every_handle() -> None:
    before = set(os.listdir("/proc/self/fd"))
    rec = RecordingSyscalls(fail_on={"setns": lambda fd, flag: flag == sc.CLONE_NEWPID})
    with pytest.raises(OSError):
        namespaces.join(rec, os.getpid(), namespaces.for_network("none"))
    assert [c[2] for c in rec.calls] == [sc.CLONE_NEWIPC, sc.CLONE_NEWUTS, sc.CLONE_NEWNET]
    assert set(os.listdir("/proc/self/fd")) == before


# -- capabilities ---------------------------------------------------------------------------------


def test_caps_cut_to_docker_default() -> None:
    held = (1 << 41) - 1 & ~(1 << capabilities.CAPS["SYS_RESOURCE"])
    rec = RecordingSyscalls(caps=(held, held, 0))
    capabilities.drop_to(rec, last=40)
    dropped = {c[2] for c in rec.calls if c[0] == "prctl" and c[1] == sc.PR_CAPBSET_DROP}
    default = capabilities.mask(capabilities.DEFAULT)
    assert dropped == {n for n in range(41) if not default & (1 << n)}
    assert capabilities.CAPS["SYS_ADMIN"] in dropped
    assert rec.calls[-1] == ("capset", default, default, 0)


def test_caps_never_ask_for_more_than_held() -> None:
    rec = RecordingSyscalls(caps=(0, 1 << capabilities.CAPS["CHOWN"], 0))
    capabilities.drop_to(rec, last=40)
    assert rec.calls[-1] == ("capset", 1, 1, 0)


# -- spec: docker's rules -------------------------------------------------------------------------


def test_entrypoint_and_cmd_as_docker_applies_them() -> None:
    assert build(IMAGE, RunOptions(), "a" * 64).args == ["/ep", "x", "y"]
    assert build(IMAGE, RunOptions(command=["z"]), "a" * 64).args == ["/ep", "z"]
    assert build(IMAGE, RunOptions(entrypoint="/sh"), "a" * 64).args == ["/sh"]
    assert build(IMAGE, RunOptions(entrypoint="", command=["ls"]), "a" * 64).args == ["ls"]
    with pytest.raises(InvalidInput):
        build({"config": {}}, RunOptions(), "a" * 64)


def test_env_workdir_user_hostname() -> None:
    s = build(IMAGE, RunOptions(env=["A=2", "B=3"], tty=True), "abcdef0123456789" * 4)
    assert s.env == ["PATH=/bin", "A=2", "HOSTNAME=abcdef012345", "TERM=xterm", "B=3"]
    assert (s.cwd, s.user, s.hostname) == ("/srv", "nobody", "abcdef012345")
    s = build(IMAGE, RunOptions(workdir="/tmp", user="1:2", hostname="h"), "a" * 64)
    assert (s.cwd, s.user, s.hostname) == ("/tmp", "1:2", "h")
    assert build({"config": {"Cmd": ["x"]}}, RunOptions(), "a" * 64).env[0].startswith("PATH=/usr")
    with pytest.raises(InvalidInput):
        build(IMAGE, RunOptions(env=["NOEQUALS"]), "a" * 64)


def test_memory_sizes_parse_as_docker_s_syntax_says() -> None:
    """parse_memory reads by hand what this pattern (docker's syntax) matches, no more."""
    import re

    pattern = re.compile(r"^(\d+(?:\.\d+)?)([bkmg]?)b?$", re.IGNORECASE)
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    for text in ("64m", "64M", "64mb", "64MB", "1g", "1.5g", "4194304", "4194304b", "4194304bb",
                 "8192k", "8192kb", " 64m ", "64mbb", "64bm", "1.g", ".5g", "1..5g", "m", "b",
                 "", "64 m", "0x40m", "64t", "-64m", "+64m", "64m\n", "1e9", "١٢٨m"):  # fmt: skip
        m = pattern.match(text.strip())
        want = int(float(m.group(1)) * units[m.group(2).lower()]) if m else None
        try:
            got: int | None = parse_memory(text)
        except InvalidInput:
            got = None
        if want is not None and want < 4 << 20:
            want = None  # too small: refused by both
        assert got == want, text


def test_limits_and_volumes_parse() -> None:
    assert parse_memory("64m") == 64 << 20 and parse_memory("1g") == 1 << 30
    for bad in ("lots", "1k", "-5m"):
        with pytest.raises(InvalidInput):
            parse_memory(bad)
    assert parse_volume("/a:/b:ro").read_only and not parse_volume("/a:/b").read_only
    for bad in ("a:/b", "/a:b", "/a", "/a:/b:xx", "/a:/"):
        with pytest.raises(InvalidInput):
            parse_volume(bad)
    s = ContainerSpec.from_json(spec(memory="8m", pids_limit=5, cpus=0.5).to_json())
    assert s.limits == Limits(8 << 20, 5, 0.5)


def test_users_resolve() -> None:
    passwd = "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\n"
    group = "root:x:0:\nbob:x:1000:\nwheel:x:10:bob,alice\n"
    assert users.resolve("", passwd, group) == users.User(0, 0, (0,), "/root")
    assert users.resolve("bob", passwd, group) == users.User(1000, 1000, (10, 1000), "/home/bob")
    assert users.resolve("1000:wheel", passwd, group).gid == 10
    assert users.resolve("4242", passwd, group) == users.User(4242, 0, (0,), "/")
    with pytest.raises(InvalidInput):
        users.resolve("nosuch", passwd, group)


# -- cgroups --------------------------------------------------------------------------------------

HYBRID_CGROUP = "9:name=systemd:/\n8:pids:/\n4:memory:/a/b\n1:cpu:/\n0::/\n"
HYBRID_MOUNTINFO = (
    "30 25 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "32 25 0:28 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    "33 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
)
V2_CGROUP = "0::/user.slice/me\n"
V2_MOUNTINFO = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


def test_locate_v1_hybrid_under_our_own_cgroup() -> None:
    dirs = cgroups.locate("cowfs-x", HYBRID_CGROUP, HYBRID_MOUNTINFO, v2_controllers="")
    assert dirs == {
        "memory": ("v1", "/sys/fs/cgroup/memory/a/b/cowfs-x"),
        "pids": ("v1", "/sys/fs/cgroup/pids/cowfs-x"),
        "cpu": ("v1", "/sys/fs/cgroup/cpu/cowfs-x"),
    }


def test_locate_v2_and_mount_roots() -> None:
    dirs = cgroups.locate("c", V2_CGROUP, V2_MOUNTINFO, v2_controllers="cpu memory pids io")
    assert set(dirs.values()) == {("v2", "/sys/fs/cgroup/user.slice/me/c")}
    nested = "40 1 0:26 /a/b /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    got = cgroups.locate("c", "4:memory:/a/b/me\n", nested, v2_controllers="")
    assert got == {"memory": ("v1", "/sys/fs/cgroup/memory/me/c")}


def test_limit_files() -> None:
    lim = Limits(memory=64 << 20, pids=10, cpus=0.5)
    assert cgroups.limit_files("v1", "memory", lim)[0] == ("memory.limit_in_bytes", str(64 << 20))
    assert cgroups.limit_files("v2", "memory", lim)[0] == ("memory.max", str(64 << 20))
    assert cgroups.limit_files("v1", "cpu", lim) == [("cpu.cfs_period_us", "100000"),
                                                     ("cpu.cfs_quota_us", "50000")]  # fmt: skip
    assert cgroups.limit_files("v2", "cpu", lim) == [("cpu.max", "50000 100000")]
    assert cgroups.limit_files("v2", "pids", lim) == [("pids.max", "10")]
    assert cgroups.limit_files("v1", "memory", Limits()) == []


def test_cgroup_on_a_fake_tree(tmp_path: Path) -> None:
    d = tmp_path / "memory" / "c"
    cg = cgroups.Cgroup({"memory": ("v1", str(d))})
    cg.create(Limits(memory=8 << 20))
    assert (d / "memory.limit_in_bytes").read_text() == str(8 << 20)
    (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert cg.oom_killed()
    for f in d.iterdir():
        f.unlink()
    cg.remove()
    assert not d.exists()
    with pytest.raises(ContainerError):
        cgroups.Cgroup({}).create(Limits(pids=3))


def test_cgroup_v2_on_a_fake_tree(tmp_path: Path) -> None:
    (tmp_path / "cgroup.subtree_control").write_text("memory\n")
    d = tmp_path / "c"
    cg = cgroups.Cgroup({"memory": ("v2", str(d)), "pids": ("v2", str(d)), "cpu": ("v2", str(d))})
    cg.create(Limits(memory=8 << 20, pids=7, cpus=1.5))
    # memory was enabled already; pids and cpu are handed down by the parent
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"
    assert (d / "memory.max").read_text() == str(8 << 20)
    assert (d / "pids.max").read_text() == "7"
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert cg.unique_dirs() == [str(d)]


# -- state machine --------------------------------------------------------------------------------


def test_state_machine_and_atomic_round_trip(tmp_path: Path) -> None:
    s = State(id="f" * 64, name="n", image="busybox", image_id="e" * 64, spec=spec())
    assert s.can_start() and not s.can_kill() and s.can_delete()
    s.mark_running(os.getpid(), os.getpid())
    assert s.status == Status.RUNNING and s.can_kill() and not s.can_start()
    assert not s.can_delete() and s.can_delete(force=True)
    with pytest.raises(ContainerError):
        s.mark_running(os.getpid(), os.getpid())
    sd = StateDir(tmp_path)
    sd.save(s)
    assert sd.load() == s
    s.mark_exited(137, oom_killed=True)
    assert s.status == Status.EXITED and s.can_start() and s.exit_code == 137
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left over


def test_running_state_with_dead_processes_reads_as_exited(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    s = State(id="f" * 64, name="n", image="b", image_id="e" * 64, spec=spec())
    s.status, s.pid, s.pid_start = Status.RUNNING, proc.pid, 12345
    s.monitor_pid, s.monitor_start = proc.pid, 12345
    StateDir(tmp_path).save(s)
    assert StateDir(tmp_path).load().status == Status.EXITED


def test_exit_code_of_a_signal_is_128_plus_n() -> None:
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(1)
    assert exit_code(os.waitpid(pid, 0)[1]) == 128 + signal.SIGTERM
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    assert exit_code(os.waitpid(pid, 0)[1]) == 7


# -- launching: the error path runs through a real fork -------------------------------------------


def test_launch_reports_a_failed_unshare_and_leaves_no_child() -> None:
    from runtime import process

    rec = RecordingSyscalls(fail_on={"unshare": lambda flags: True})
    code = (
        "import sys\n"
        "from runtime import process, namespaces\n"
        "from runtime.syscalls import RecordingSyscalls\n"
        "rec = RecordingSyscalls(fail_on={'unshare': lambda f: True})\n"
        "try:\n"
        "    process.launch(rec, lambda ch: None, namespaces_=namespaces.for_network('none'))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
        "import os\n"
        "try:\n"
        "    os.waitpid(-1, os.WNOHANG); print('child left')\n"
        "except ChildProcessError:\n"
        "    print('no child')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, timeout=60).stdout  # fmt: skip
    assert "ContainerError cannot start container process: [Errno 1] unshare" in out
    assert out.strip().endswith("no child")
    assert process is not None and rec.calls == []


def _launch_in_child(gate: str, unshare_fails: str) -> str:
    """`unshare_fails`: which unshare calls fail, as an expression of their flags `f`."""
    code = (
        "import os\n"
        "from runtime import process, namespaces\n"
        "from runtime.syscalls import CLONE_NEWNS, CLONE_NEWNET, RecordingSyscalls\n"
        f"rec = RecordingSyscalls(fail_on={{'unshare': lambda f: {unshare_fails}}})\n"
        f"def gate():\n    os.write(1, b'gate\\n')\n    {gate}\n"
        "try:\n"
        "    process.launch(rec, lambda ch: os._exit(0), gate=gate,\n"
        "                   namespaces_=namespaces.for_network('none'))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
        "try:\n"
        "    os.waitpid(-1, os.WNOHANG); print('child left')\n"
        "except ChildProcessError:\n"
        "    print('no child')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=60).stdout  # fmt: skip


def test_launch_gate_opens_before_the_mount_namespace_is_made() -> None:
    # the mount namespace's unshare fails: its error proves the intermediate went on past the
    # gate, after it ran
    out = _launch_in_child("pass", unshare_fails="f & CLONE_NEWNS")
    assert out.startswith("gate\n")
    assert "ContainerError cannot start container process: [Errno 1] unshare" in out
    assert out.strip().endswith("no child")


def test_launch_makes_the_other_namespaces_before_the_gate() -> None:
    # The intermediate says which unshare it makes; the gate takes half a second to open. The
    # network namespace's unshare comes before that, fails (so the runtime's "go" finds the
    # intermediate gone), and its error is still what the runtime reports.
    out = _launch_in_child("import time; time.sleep(0.5); os.write(1, b'opened\\n')",
                           unshare_fails="os.write(1, b'unshare %d\\n' % f) and f & CLONE_NEWNET")
    lines = out.splitlines()
    from runtime.syscalls import CLONE_NEWNET

    made = [line for line in lines if line.startswith("unshare ")]
    assert len(made) == 1 and int(made[0].split()[1]) & CLONE_NEWNET, out
    assert lines.index(made[0]) < lines.index("opened"), out
    assert "ContainerError cannot start container process: [Errno 1] unshare" in out
    assert out.strip().endswith("no child")


def test_launch_gate_failure_passes_on_and_leaves_no_child() -> None:
    out = _launch_in_child("raise RuntimeError('the mount failed')", unshare_fails="False")
    assert out.splitlines() == ["gate", "RuntimeError the mount failed", "no child"]


# -- bundle ---------------------------------------------------------------------------------------


def test_oci_config_matches_run() -> None:
    s = spec(memory="16m", pids_limit=9, read_only=True, user="1:2")
    cfg = oci_config(s, "/root", "/etc-gen")
    assert cfg["root"] == {"path": "/root", "readonly": True}
    assert cfg["process"]["user"] == {"uid": 1, "gid": 2}
    assert cfg["process"]["noNewPrivileges"] is True
    assert "CAP_SYS_ADMIN" not in cfg["process"]["capabilities"]["bounding"]
    assert {n["type"] for n in cfg["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount",
                                                                "network"}  # fmt: skip
    assert cfg["linux"]["resources"]["pids"] == {"limit": 9}
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"]


# -- CLI ------------------------------------------------------------------------------------------


def cowfs(*args: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cowfs.cli import main; main()",
                           "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize("args,message", [
    (["run", "nosuch:img", "true"], "Error: image nosuch:img not found\n"),
    (["rm", "nosuch"], "Error: no such container: nosuch\n"),
    (["kill", "-s", "BOGUS", "nosuch"], "Error: invalid signal BOGUS\n"),
    (["exec", "nosuch", "true"], "Error: no such container: nosuch\n"),
])  # fmt: skip
def test_cli_errors_are_one_line(store_root: Path, args: list[str], message: str) -> None:
    proc = cowfs(*args, root=store_root)
    assert proc.returncode != 0
    assert proc.stderr == message


def test_cli_ps_on_an_empty_store(store_root: Path) -> None:
    proc = cowfs("ps", "-a", root=store_root)
    assert proc.stdout.split() == ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS",
                                   "NAMES"]  # fmt: skip
    assert cowfs("ps", "--json", root=store_root).stdout.strip() == "[]"
