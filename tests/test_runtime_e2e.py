"""The runtime end to end, as root: `cowfs run` on a FUSE mount of a busybox image.

Every test drives the real CLI; the fixture removes every container it made (rm -f: processes,
cgroups, mounts) even when the test fails, and checks nothing was left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import need_fuse, need_tool

Cowfs = Callable[..., subprocess.CompletedProcess]


def _cowfs_cmd(root: Path, args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-c", "from cowfs.cli import main; main()", "--root", str(root),
            *args]  # fmt: skip


@pytest.fixture
def cowfs(busybox_image: tuple[Path, str]) -> Iterator[Cowfs]:
    need_fuse()
    root, _ref = busybox_image

    def run(*args: str, input: str | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess:  # fmt: skip
        return subprocess.run(_cowfs_cmd(root, args), capture_output=True, text=True,
                              input=input, timeout=timeout, stdin=None if input else
                              subprocess.DEVNULL)  # fmt: skip

    run.root = root  # type: ignore[attr-defined]
    try:
        yield run
    finally:
        from cowfs.store import Store
        from runtime.container import Runtime

        rt = Runtime(Store(root))
        cgroup_dirs = [d for s in rt.states() for _v, d in s.cgroups.values()]
        errors = []
        for state in rt.states():
            try:
                rt.remove(state.id, force=True)
            except Exception as exc:  # noqa: BLE001 - clean up the others, then report
                errors.append(f"{state.name}: {exc}")
        assert not errors, errors
        assert not [d for d in cgroup_dirs if os.path.isdir(d)], "cgroups left behind"
        with open("/proc/self/mountinfo") as f:
            assert str(root) not in f.read(), "mounts left behind"


def inspect(cowfs: Cowfs, name: str) -> dict:
    proc = cowfs("inspect", name)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


def test_run_passes_output_and_exit_code_and_rm_cleans_up(cowfs: Cowfs) -> None:
    proc = cowfs("run", "--rm", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    assert list((cowfs.root / "containers").iterdir()) == []  # type: ignore[attr-defined]
    proc = cowfs("run", "--rm", "busybox", "sh", "-c", "kill -KILL $$")
    assert proc.returncode == 137
    proc = cowfs("run", "--rm", "busybox", "/no/such/thing")
    assert proc.returncode == 127 and proc.stderr.startswith("Error: /no/such/thing:")
    assert proc.stderr.count("\n") == 1


ISOLATION_SCRIPT = r"""
echo "procs=$(ls /proc | grep -cE '^[0-9]+$')"
test -e /proc/{hostpid} && echo "hostpid=visible" || echo "hostpid=hidden"
mkdir -p /mnt; mount -t tmpfs t /mnt 2>/dev/null && echo mount=ok || echo mount=denied
(echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null && echo procsys=rw || echo procsys=ro
(echo x > /proc/sysrq-trigger) 2>/dev/null && echo sysrq=rw || echo sysrq=ro
touch /sys/x 2>/dev/null && echo sys=rw || echo sys=ro
test -e {marker} && echo hostfile=visible || echo hostfile=hidden
for f in kcore keys timer_list sched_debug; do
  test -e /proc/$f && echo "$f=$(wc -c < /proc/$f)" || echo "$f=absent"
done
grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status | tr -d '\t'
echo "host=$(hostname) hosts=$(grep -c isolated /etc/hosts)"
echo "nets=$(ls /sys/class/net | tr '\n' ,)"
ip link show lo | grep -q ',UP' && echo lo=up || echo lo=down
ls /dev | tr '\n' ,; echo
echo "pid1=$(tr "\\0" " " < /proc/1/cmdline)"
"""


def test_a_mount_that_fails_is_one_line_with_its_reason_and_leaves_nothing(cowfs: Cowfs) -> None:
    root = cowfs.root  # type: ignore[attr-defined]
    for cache in (root / "cache").glob("index-*"):
        cache.unlink()
    for toc in (root / "layers").glob("*/toc"):
        toc.write_bytes(b"damaged")
    proc = cowfs("run", "--rm", "busybox", "true")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith("Error: cannot mount ") and proc.stderr.count("\n") == 1
    assert "cannot mount" not in proc.stderr.split(": ", 2)[-1]  # said once, then the reason
    assert not list((root / "containers").iterdir())


def test_isolation(cowfs: Cowfs, tmp_path: Path) -> None:
    marker = tmp_path / "host-secret"
    marker.write_text("secret")
    script = ISOLATION_SCRIPT.format(hostpid=os.getpid(), marker=marker)
    proc = cowfs("run", "--rm", "--hostname", "isolated", "busybox", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line
               and "," not in line)  # fmt: skip
    assert int(out["procs"]) <= 5, proc.stdout  # init, sh, $(...), ls, grep: no host process
    assert out["hostpid"] == "hidden" and out["hostfile"] == "hidden"
    assert out["mount"] == "denied"
    assert (out["procsys"], out["sysrq"], out["sys"]) == ("ro", "ro", "ro")
    for f in ("kcore", "keys", "timer_list", "sched_debug"):  # masked where the kernel has it
        assert out[f] == ("0" if os.path.exists(f"/proc/{f}") else "absent"), f
    assert "CapBnd:00000000a80425fb" in proc.stdout  # docker's default set
    assert "CapEff:00000000a80425fb" in proc.stdout and "NoNewPrivs:1" in proc.stdout
    assert out["host"] == "isolated" and out["hosts"] == "1"
    assert "nets=lo," in proc.stdout and out["lo"] == "up"
    devs = set(proc.stdout.splitlines()[-2].strip(",").split(","))
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "mqueue",
            "fd", "stdin", "stdout", "stderr"} <= devs  # fmt: skip
    assert not devs & {"sda", "mem", "kmsg", "fuse"}
    assert out["pid1"] == "cowfs-init"  # not the host's command line, with its paths


def test_pid1_reaps_zombies_and_forwards_signals(cowfs: Cowfs) -> None:
    # An orphan is re-parented to PID 1, which must reap it: no zombie stays.
    proc = cowfs("run", "--rm", "busybox", "sh", "-c",
                 "(sleep 0.2 &); sleep 1; cat /proc/[0-9]*/stat | grep -c ') Z' || true")
    assert proc.stdout.strip() == "0", proc.stderr
    name = "trapper"
    proc = cowfs("run", "-d", "--name", name, "busybox", "sh", "-c",
                 "trap 'echo got TERM; exit 7' TERM; echo ready; "
                 "while true; do sleep 0.1; done")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert cowfs("ps", "-q").stdout.strip() == proc.stdout.strip()[:12]
    assert cowfs("stop", "-t", "20", name).returncode == 0
    state = inspect(cowfs, name)["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 7)
    assert cowfs("logs", name).stdout == "ready\ngot TERM\n"


def test_lifecycle_exec_start_keeps_upper_and_rm_leaves_nothing(cowfs: Cowfs) -> None:
    name = "life"
    cmd = "echo run >> /runs; cat /runs | wc -l; exec sleep 1000"
    proc = cowfs("run", "-d", "--name", name, "-e", "GREETING=hi", "busybox", "sh", "-c", cmd)
    assert proc.returncode == 0, proc.stderr
    cid = proc.stdout.strip()
    info = inspect(cowfs, name)
    assert info["Id"] == cid and info["State"]["Running"]
    host_pid = info["State"]["Pid"]
    # the FUSE daemon serves from outside the container's namespaces and cgroups
    daemon = info["GraphDriver"]["Data"]["DaemonPid"]
    assert daemon > 0 and daemon != host_pid
    for ns in ("pid", "mnt", "net"):
        assert os.readlink(f"/proc/{daemon}/ns/{ns}") != os.readlink(f"/proc/{host_pid}/ns/{ns}")
        assert os.readlink(f"/proc/{daemon}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")
    assert f"cowfs-{cid[:12]}" not in Path(f"/proc/{daemon}/cgroup").read_text()
    assert f"cowfs-{cid[:12]}" in Path(f"/proc/{host_pid}/cgroup").read_text()
    # exec: same namespaces (sees sleep, the hostname, the env) and same cgroup
    proc = cowfs("exec", name, "sh", "-c",
                 'ps -o comm | grep -c sleep; hostname; echo $GREETING; cat /proc/self/cgroup')
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["1", cid[:12], "hi"]
    assert any(line.endswith(f"cowfs-{cid[:12]}") for line in lines if ":memory:" in line)
    assert cowfs("exec", name, "sh", "-c", "exit 4").returncode == 4
    listed = json.loads(cowfs("ps", "--json").stdout)
    assert [c["Name"] for c in listed] == [name]
    assert cowfs("rm", name).returncode != 0  # running: refused without -f
    assert cowfs("kill", "-s", "TERM", name).returncode == 0
    cowfs("stop", name)  # waits for the monitor to record the exit (or stops it, if still up)
    assert inspect(cowfs, name)["State"]["ExitCode"] == 143
    assert not os.path.exists(f"/proc/{host_pid}")
    assert cowfs("ps").stdout.count("\n") == 1 and name in cowfs("ps", "-a").stdout
    # start again on the kept upper: /runs now has two lines
    assert cowfs("start", name).returncode == 0
    assert cowfs("exec", name, "cat", "/runs").stdout == "run\nrun\n"
    cgroups = inspect(cowfs, name)["Cgroups"]
    host_pid = inspect(cowfs, name)["State"]["Pid"]
    assert cowfs("rm", "-f", name).returncode == 0
    assert not os.path.exists(f"/proc/{host_pid}")
    assert not any(os.path.isdir(d) for _v, d in cgroups.values())
    assert cowfs("inspect", name).returncode != 0
    assert not (cowfs.root / "containers" / cid).exists()  # type: ignore[attr-defined]


def test_pids_limit_stops_a_fork_bomb(cowfs: Cowfs) -> None:
    bomb = "i=0; while [ $i -lt 40 ]; do sleep 30 & echo forked; i=$((i+1)); done"
    proc = cowfs("run", "--rm", "--pids-limit", "12", "busybox", "sh", "-c", bomb)
    # the shell dies on the first failed fork; init and the shell hold two of the 12 pids
    assert "can't fork" in proc.stderr and proc.returncode != 0
    assert 5 <= proc.stdout.count("forked") <= 10


def test_memory_limit_oom_kills_and_is_reported(cowfs: Cowfs) -> None:
    name = "hog"
    proc = cowfs("run", "--name", name, "--memory", "32m", "busybox",
                 "dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1")  # fmt: skip
    assert proc.returncode == 137, proc.stderr
    info = inspect(cowfs, name)
    assert info["State"]["OOMKilled"] is True and info["State"]["ExitCode"] == 137
    assert info["HostConfig"]["Memory"] == 32 << 20


def test_tty_user_workdir_readonly_and_volumes(cowfs: Cowfs, tmp_path: Path) -> None:
    proc = cowfs("run", "--rm", "-t", "busybox", "sh", "-c", "tty; test -t 0 && echo term")
    assert proc.stdout.replace("\r", "").split() == ["/dev/pts/0", "term"]
    proc = cowfs("run", "--rm", "-u", "65534", "-w", "/tmp/new", "busybox", "sh", "-c",
                 "id -u; pwd; grep CapEff /proc/self/status | tr -d '\\t'")  # fmt: skip
    assert proc.stdout.split() == ["65534", "/tmp/new", "CapEff:0000000000000000"]
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir(), rw.mkdir()
    (ro / "in").write_text("from host\n")
    proc = cowfs("run", "--rm", "--read-only", "-v", f"{ro}:/ro:ro", "-v", f"{rw}:/rw",
                 "busybox", "sh", "-c",
                 "cat /ro/in; touch /ro/x || echo ro-denied; touch /x || echo root-denied; "
                 "echo from container > /rw/out")  # fmt: skip
    assert proc.stdout.split("\n")[:3] == ["from host", "ro-denied", "root-denied"]
    assert (rw / "out").read_text() == "from container\n"
    assert not (ro / "x").exists()


def test_host_network_and_detached_auto_remove(cowfs: Cowfs) -> None:
    proc = cowfs("run", "--rm", "--network", "host", "busybox", "ls", "/sys/class/net")
    assert sorted(proc.stdout.split()) == sorted(os.listdir("/sys/class/net"))
    proc = cowfs("run", "-d", "--rm", "--name", "gone", "busybox", "sleep", "1000")
    assert proc.returncode == 0, proc.stderr
    cid = proc.stdout.strip()
    assert cowfs("stop", "-t", "30", "gone").returncode == 0  # its monitor removes it
    assert cowfs("ps", "-a", "-q").stdout == ""
    assert not (cowfs.root / "containers" / cid).exists()  # type: ignore[attr-defined]


def test_stdin_with_interactive(cowfs: Cowfs) -> None:
    proc = cowfs("run", "--rm", "-i", "busybox", "tr", "a-z", "A-Z", input="hello\n")
    assert proc.stdout == "HELLO\n"


def test_export_is_the_merged_tree(cowfs: Cowfs, tmp_path: Path) -> None:
    assert cowfs("run", "--name", "ex", "busybox", "sh", "-c",
                 "echo hi > /hello; rm /bin/ls").returncode == 0  # fmt: skip
    out = tmp_path / "ex.tar"
    assert cowfs("export", "ex", str(out)).returncode == 0
    with tarfile.open(out) as tf:
        names = set(tf.getnames())
        assert tf.extractfile("hello").read() == b"hi\n"  # type: ignore[union-attr]
    assert "bin/busybox" in names and "bin/ls" not in names and "bin/cat" in names


def test_commit_makes_an_image_that_runs(cowfs: Cowfs) -> None:
    assert cowfs("run", "--name", "cm", "busybox", "sh", "-c",
                 "echo baked > /baked; rm /bin/vi").returncode == 0  # fmt: skip
    proc = cowfs("commit", "cm", "baked:1")
    assert proc.returncode == 0, proc.stderr
    proc = cowfs("run", "--rm", "baked:1", "sh", "-c", "cat /baked; test -e /bin/vi || echo gone")
    assert proc.stdout == "baked\ngone\n", proc.stderr


def test_image_config_applies_as_docker_does(cowfs: Cowfs) -> None:
    assert cowfs("run", "--name", "cfg", "busybox", "mkdir", "-p", "/srv").returncode == 0
    proc = cowfs("commit", "-c", "ENV GREETING=hello", "-c", "WORKDIR /srv", "-c", "USER nobody",
                 "-c", 'ENTRYPOINT ["/bin/echo", "say:"]', "-c", 'CMD ["default"]', "cfg",
                 "configured:1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert cowfs("run", "--rm", "configured:1").stdout == "say: default\n"
    assert cowfs("run", "--rm", "configured:1", "given").stdout == "say: given\n"
    proc = cowfs("run", "--rm", "--entrypoint", "sh", "configured:1", "-c",
                 "echo $GREETING $(pwd) $(id -u)")  # fmt: skip
    assert proc.stdout == "hello /srv 65534\n", proc.stderr
    proc = cowfs("run", "--rm", "-u", "0", "-w", "/tmp", "-e", "GREETING=hi", "--entrypoint", "",
                 "configured:1", "sh", "-c", "echo $GREETING $(pwd) $(id -u)")  # fmt: skip
    assert proc.stdout == "hi /tmp 0\n", proc.stderr


def test_logs_follow_and_kill_with_a_signal(cowfs: Cowfs) -> None:
    proc = cowfs("run", "-d", "--name", "lf", "--cpus", "0.5", "busybox", "sh", "-c",
                 "trap 'echo usr1; exit 9' USR1; echo up; while true; do sleep 0.1; done")
    assert proc.returncode == 0, proc.stderr
    quota = inspect(cowfs, "lf")["Cgroups"]["cpu"][1] + "/cpu.cfs_quota_us"
    if os.path.exists(quota):  # v1; on v2 it is cpu.max
        assert Path(quota).read_text().strip() == "50000"
    follower = subprocess.Popen(_cowfs_cmd(cowfs.root, ("logs", "-f", "lf")),  # type: ignore
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "up\n"  # it follows while the container runs
        assert cowfs("kill", "-s", "USR1", "lf").returncode == 0
        rest = follower.communicate(timeout=60)[0]  # and ends when the container exits
    finally:
        follower.kill()
        follower.wait()
    assert rest == "usr1\n"
    assert inspect(cowfs, "lf")["State"]["ExitCode"] == 9


def test_runc_runs_the_bundle_on_the_cowfs_mount(cowfs: Cowfs, tmp_path: Path) -> None:
    need_tool("runc")
    cmd = "cat /marker 2>/dev/null; echo line >> /marker; hostname"
    assert cowfs("run", "--name", "b", "--hostname", "bundled", "busybox", "sh", "-c",
                 cmd).stdout == "bundled\n"  # fmt: skip
    bundle = tmp_path / "bundle"
    proc = cowfs("bundle", "b", str(bundle))
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["root"]["path"].endswith("/rootfs")
    cid = f"cowfs-test-{os.getpid()}"
    state_root = tmp_path / "runc-state"
    try:
        proc = subprocess.run(["runc", "--root", str(state_root), "run", "--bundle", str(bundle),
                               cid], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        subprocess.run(["runc", "--root", str(state_root), "delete", "-f", cid],
                       capture_output=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # runc saw the container's own upper layer (the marker written by `cowfs run`)
    assert proc.stdout == "line\nbundled\n"


def _read_until(fd: int, needle: bytes, limit: float = 30) -> bytes:
    import select
    import time

    seen = b""
    end = time.monotonic() + limit
    while needle not in seen and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_interactive_terminal_with_ctrl_c(cowfs: Cowfs) -> None:
    master, slave = os.openpty()
    cmd = _cowfs_cmd(cowfs.root, ("run", "--rm", "-it", "busybox", "sh"))  # type: ignore
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        assert b"# " in _read_until(master, b"# ")  # the shell's prompt, on its own terminal
        # The child shell prints 42 and becomes sleep: a ^C that lands on either ends it with
        # SIGINT (status 130), so when it arrives does not matter.
        os.write(master, b"sh -c 'echo $((6*7)); exec sleep 1000'\n")
        assert b"42" in _read_until(master, b"42")
        os.write(master, b"\x03")  # through the raw host terminal to the container's own pty
        # Type on only at the next prompt: text typed ahead of the ^C is flushed by the pty.
        assert b"# " in _read_until(master, b"# ")
        os.write(master, b"echo after-$?; tty; exit 5\n")
        out = _read_until(master, b"/dev/pts/0")
        assert b"after-130" in out and b"/dev/pts/0" in out
        assert proc.wait(timeout=60) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_run_pulls_a_missing_image_from_a_registry(cowfs: Cowfs, tmp_path: Path) -> None:
    from tests.registry_fixtures import run_registry

    with run_registry(tmp_path / "registry") as reg:
        ref = f"{reg.host}/tools/busybox:1"
        proc = cowfs("push", "busybox:latest", ref)
        assert proc.returncode == 0, proc.stderr
        fresh = tmp_path / "fresh-store"
        proc = subprocess.run(_cowfs_cmd(fresh, ("run", "--rm", ref, "echo", "pulled and run")),
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "pulled and run\n"), proc.stderr
    assert list((fresh / "containers").iterdir()) == []


def test_exec_with_a_terminal(cowfs: Cowfs) -> None:
    assert cowfs("run", "-d", "--name", "tt", "busybox", "sleep", "1000").returncode == 0
    master, slave = os.openpty()
    cmd = _cowfs_cmd(cowfs.root, ("exec", "-it", "tt", "sh"))  # type: ignore[attr-defined]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        assert b"# " in _read_until(master, b"# ")
        os.write(master, b"tty; ps -o comm | grep -c sleep; exit 4\n")
        out = _read_until(master, b"/dev/pts/0\r\n1\r\n")
        assert b"/dev/pts/0\r\n1\r\n" in out  # its own terminal, in the container's pid ns
        assert proc.wait(timeout=60) == 4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_a_prepared_daemon_is_used_by_its_store_and_exits_when_not(
    busybox_image: tuple[Path, str], tmp_path: Path
) -> None:
    """`cowfs run` forks its FUSE daemon early (runtime/mounter.py). One nobody uses exits and
    is reaped; one prepared for another store is let go, and a fresh one mounts this one."""
    from cowfs.store import Store
    from runtime.mounter import CowfsMounter, is_mounted

    need_fuse()
    root, ref = busybox_image
    second = tmp_path / "second"
    m = CowfsMounter()
    m.prepare(root, ref)
    assert m._early is not None
    unused = m._early[1]
    m.cancel()
    assert not os.path.exists(f"/proc/{unused}")  # exited and reaped: not even a zombie
    m.prepare(tmp_path / "another-store", ref)
    assert m._early is not None
    elsewhere = m._early[1]
    store = Store(root)
    dirs = {k: tmp_path / k for k in ("mnt", "upper", "work")}
    for d in dirs.values():
        d.mkdir()
    pid = m.start(store, store.resolve(ref).id, str(dirs["mnt"]), upper=str(dirs["upper"]),
                  work=str(dirs["work"])).wait()  # fmt: skip
    try:
        assert pid != elsewhere and not os.path.exists(f"/proc/{elsewhere}")
        assert "busybox" in os.listdir(dirs["mnt"] / "bin")
        m.prepare(root, ref)  # and the prepared one of the right store mounts
        assert m._early is not None
        early = m._early[1]
        for k in ("mnt", "upper", "work"):
            (second / k).mkdir(parents=True)
        got = m.start(store, store.resolve(ref).id, str(second / "mnt"),
                      upper=str(second / "upper"), work=str(second / "work")).wait()  # fmt: skip
        assert got == early and "busybox" in os.listdir(second / "mnt" / "bin")
    finally:
        for mnt in (dirs["mnt"], second / "mnt"):
            if is_mounted(mnt):
                m.umount(str(mnt))
    assert not os.path.exists(f"/proc/{pid}") and not os.path.exists(f"/proc/{early}")


def test_a_container_start_imports_nothing_heavy_even_lazily(
    busybox_image: tuple[Path, str], tmp_path: Path
) -> None:
    """The modules the start path never imports (tests/test_cli_basics.py) stay unimported in
    every process of a real `cowfs run`: the CLI, its FUSE daemon (forked early), the container's
    init. An audit hook (inherited by forks) logs each import with its process."""
    from tests.test_cli_basics import START_PATH_NEVER

    need_fuse()
    root, _ref = busybox_image
    log = tmp_path / "imports"
    hook = (
        "import os, sys\n"
        "def hook(event, args):\n"
        "    if event == 'import':\n"
        "        try:\n"
        f"            with open({str(log)!r}, 'a') as f:\n"
        "                f.write(f'{os.getpid()} {args[0]}\\n')\n"
        "        except OSError:\n"
        "            pass  # the init after its pivot: the log is not in its tree\n"
        "sys.addaudithook(hook)\n"
        "from cowfs.cli import main; main()\n"
    )
    args = ["--root", str(root), "run", "--rm", "busybox", "true"]
    # A first start of an image merges its index once (and checks each layer's TOC against
    # its sha256 with hashlib): the starts after it are the ones that count.
    assert subprocess.run(_cowfs_cmd(root, tuple(args[2:])), capture_output=True).returncode == 0
    proc = subprocess.run([sys.executable, "-c", hook, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in log.read_text().splitlines()]
    pids = {pid for pid, _ in lines}
    assert len(pids) >= 2, pids  # the CLI and its daemon logged their imports
    assert "cowfs.fuseengine" in {name for _, name in lines}  # the daemon's are in the log
    assert [(pid, name) for pid, name in lines if name in START_PATH_NEVER] == [], lines


def test_readying_the_cgroup_join_moves_nothing() -> None:
    """cgroups.warm_attach (started by `cowfs run`) writes the caller's pid to the caller's own
    cgroup.procs: as root it is allowed, and the process is where it was in every hierarchy."""
    code = ("from runtime.cgroups import warm_attach\n"
            "before = open('/proc/self/cgroup').read()\n"
            "warm_attach()\n"
            "print(before == open('/proc/self/cgroup').read(), before.count(':'))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    same, fields = out.stdout.split()
    assert same == "True" and int(fields) >= 2
