"""Crash safety: SIGKILL the FUSE daemon, the importer and the committer at random moments.

The daemon. A workload process makes random changes through the mount (new files written and
fsynced, copy-ups of large lower files by a small in-place write, fsynced or not, renames of
files and of lower directories, deletions of lower and upper files) and reports each one to the
test before it starts and after it returned. At a random moment the daemon is killed with
SIGKILL; the dead mount is detached (fusermount3 -u -z), the same upper and work directories are
mounted again, and the view is checked against the model of acknowledged changes:
- every change that returned is there, fsynced or not (the daemon answers only after its own
  system call on the upper returned, a passthrough write is the kernel's own write of the host
  file, and no writeback cache holds writes back);
- the one change in flight is all or nothing: a copied-up file has its old full content or the
  new one, never a half copy; a renamed directory is at one of its two names, whole. The one
  exception is not ours: the kernel sends a write as one FUSE WRITE per page that it writes only
  in part and has not cached, so a write in flight may have landed up to such a page's end (and
  returns that count if it was answered: a short write, then the model follows it);
- nothing of the work dir leaks into the view, the work dir is empty after the remount, the
  upper still reads as an overlayfs-format directory, and `cowfs fsck` is clean.

Import and commit. `cowfs image import` and `cowfs commit` are killed at random moments; no half
image or tag is visible afterwards, fsck is clean, and a retry succeeds with the right content.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cowfs import maintenance, mounting, oci, overlaydir
from cowfs.rootfs import import_rootfs
from cowfs.store import Store
from tests.conftest import cowfs_mounted, need_fuse, unmount_or_kill
from tests.test_load import record_figure

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lower_content(rel: str, size: int) -> bytes:
    return random.Random(rel).randbytes(size)


# The lower tree: big files make copy-ups slow enough to be caught half-way.
LOWER = {
    **{f"big/b{i}.bin": 3 * MiB + i * 1000 for i in range(4)},
    **{f"dirs/d{i}/f{j}.txt": 20_000 + j for i in range(4) for j in range(5)},
    **{f"small/s{i}.txt": 100 + i for i in range(20)},
}


def build_image(tmp_path: Path) -> Store:
    tree = tmp_path / "tree"
    for rel, size in LOWER.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(lower_content(rel, size))
    store = Store(tmp_path / "store")
    import_rootfs(store, tree, "crash:latest")
    return store


# -- the workload: random changes, each announced and acknowledged ---------------------------------


def _send(fd: int, msg: dict) -> None:
    os.write(fd, (json.dumps(msg) + "\n").encode())


def workload(mnt: str, files: dict[str, str], seed: int, fd: int) -> None:
    """Change the mount at random until the daemon dies. `files`: path -> sha of the view.

    Each change is announced as {"op", "before", "after"} (path -> sha or None, for every path
    it touches) and acknowledged with {"done": true} once its last system call returned."""
    rng = random.Random(seed)
    serial = 0
    try:
        while True:
            serial += 1
            names = sorted(files)
            op = rng.choice(["new", "new", "copyup", "copyup", "rename", "unlink", "dirrename"])
            if op == "new" or not names:
                path = f"{rng.choice(['new', 'small', 'dirs/d0', 'big'])}/n{seed}-{serial}"
                data = rng.randbytes(rng.choice([0, 10, 4096, 100_000, 128 * 1024]))
                # Created, not yet written; or written in part: a SIGKILL stops the daemon's
                # own pwrite of a WRITE it is serving between two pages (the kernel's buffered
                # write checks for a fatal signal per page), so any page-aligned prefix.
                cuts = range(0, len(data), mmap.PAGESIZE)
                msg = {"op": "new", "before": {path: None}, "after": {path: sha(data)},
                       "partial": [sha(data[:k]) for k in cuts] or [sha(b"")]}
                _send(fd, msg)
                os.makedirs(os.path.join(mnt, os.path.dirname(path)), exist_ok=True)
                wfd = os.open(os.path.join(mnt, path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    n = os.write(wfd, data)
                    if n != len(data):  # see the copy-up below: the daemon died in between
                        msg = {**msg, "after": {path: sha(data[:n])}}
                        _send(fd, msg)
                    os.fsync(wfd)
                finally:
                    os.close(wfd)
            elif op == "copyup":
                path = rng.choice(names)
                full = os.path.join(mnt, path)
                with open(full, "rb") as f:
                    old = f.read()
                off = rng.randrange(len(old) + 1)
                patch = rng.randbytes(rng.randrange(1, 2000))
                new = bytearray(old)
                new[off : off + len(patch)] = patch
                # The kernel sends the write as one FUSE WRITE per page that is only partly
                # written and not cached, so a daemon killed in between leaves its first part.
                # (A passthrough write is one write of the host file, never split.)
                cut = (off // mmap.PAGESIZE + 1) * mmap.PAGESIZE - off
                head = bytearray(old)
                head[off : off + cut] = patch[:cut]
                msg = {"op": "copyup", "before": {path: sha(old)},
                       "after": {path: sha(bytes(new))},
                       "partial": [sha(bytes(head))] if cut < len(patch) else []}  # fmt: skip
                _send(fd, msg)
                wfd = os.open(full, os.O_WRONLY)
                try:
                    n = os.pwrite(wfd, patch, off)
                    if n != len(patch):
                        # Such a split write returns the bytes of the requests answered before
                        # the daemon died: short, but returned, so the change is that much.
                        # (If the daemon died after its pwrite of the rest but before its
                        # answer, all of it is there: that stays an outcome too.)
                        short = bytearray(old)
                        short[off : off + n] = patch[:n]
                        msg = {**msg, "after": {path: sha(bytes(short))},
                               "partial": [sha(bytes(new))]}  # fmt: skip
                        _send(fd, msg)
                    # Half without fsync: with no writeback cache a returned write has reached
                    # the daemon's own pwrite, so a daemon crash cannot lose it either.
                    if rng.random() < 0.5:
                        os.fsync(wfd)
                finally:
                    os.close(wfd)
            elif op == "rename":
                path = rng.choice(names)
                dest = f"{rng.choice(['new', 'small', 'dirs/d1'])}/r{seed}-{serial}"
                msg = {"op": "rename", "before": {path: files[path], dest: None},
                       "after": {path: None, dest: files[path]}}
                _send(fd, msg)
                os.makedirs(os.path.join(mnt, os.path.dirname(dest)), exist_ok=True)
                os.rename(os.path.join(mnt, path), os.path.join(mnt, dest))
            elif op == "unlink":
                path = rng.choice(names)
                msg = {"op": "unlink", "before": {path: files[path]}, "after": {path: None}}
                _send(fd, msg)
                os.unlink(os.path.join(mnt, path))
            else:  # rename a whole directory (a lower one is copied up whole first)
                dirs = sorted({p.rsplit("/", 1)[0] for p in names if p.startswith("dirs/")})
                if not dirs:
                    continue
                src = rng.choice(dirs)
                dst = f"dirs/m{seed}-{serial}"
                moved = {p: s for p, s in files.items() if p.startswith(src + "/")}
                before = {**moved, **{dst + p[len(src) :]: None for p in moved}}
                after = {**{p: None for p in moved}, **{dst + p[len(src) :]: s
                                                        for p, s in moved.items()}}  # fmt: skip
                msg = {"op": "dirrename", "before": before, "after": after}
                _send(fd, msg)
                os.rename(os.path.join(mnt, src), os.path.join(mnt, dst))
            _send(fd, {"done": True})
            for p, s in msg["after"].items():
                if s is None:
                    files.pop(p, None)
                else:
                    files[p] = s
    except OSError:
        pass  # the daemon is gone (ENOTCONN / ECONNABORTED): the round is over
    finally:
        os.close(fd)


# -- the test side: model, view and checks ---------------------------------------------------------


@dataclass
class Model:
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of acknowledged state
    rounds: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)  # op -> rounds it was in flight

    def apply(self, change: dict[str, str | None]) -> None:
        for p, s in change.items():
            if s is None:
                self.files.pop(p, None)
            else:
                self.files[p] = s


def view(mnt: Path) -> dict[str, str]:
    """Every regular file under the mount: path -> sha256; fails on names that must not show."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            assert not name.startswith(("#cowfs-", ".fuse_hidden")), f"leak: {dirpath}/{name}"
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, mnt)] = sha(f.read())
    return out


def check(model: Model, got: dict[str, str], pending: dict | None) -> None:
    """`got` must be the model, except that an op in flight is all before or all after."""
    touched = set(pending["before"]) if pending else set()
    want = {p: s for p, s in model.files.items() if p not in touched}
    rest = {p: s for p, s in got.items() if p not in touched}
    missing = sorted(set(want) - set(rest))
    extra = sorted(set(rest) - set(want))
    changed = sorted(p for p in set(want) & set(rest) if want[p] != rest[p])
    assert not (missing or extra or changed), f"missing {missing}, extra {extra}, " \
                                              f"changed {changed}"  # fmt: skip
    if pending:
        seen = {p: got.get(p) for p in touched}
        outcomes = [pending["before"], pending["after"]]
        # A new file may also be seen created but not yet written.
        outcomes += [{p: s for p in touched} for s in pending.get("partial", [])]
        assert seen in outcomes, f"{pending['op']} in flight left {seen}, " \
                                 f"neither before {pending['before']} nor after"  # fmt: skip


def crash_round(store: Store, base: Path, model: Model, rng: random.Random) -> None:
    """Mount, change at random, SIGKILL the daemon, detach, remount and check the view."""
    mnt, upper, work = base / "mnt", base / "upper", base / "work"
    ctx = multiprocessing.get_context("fork")
    # Odd rounds use the threaded FUSE loop: several requests can be in the daemon at the kill.
    pid = mounting.mount(store, "crash:latest", mnt, upper, work, threads=model.rounds % 2 == 1)
    r, w = os.pipe()
    child = ctx.Process(target=workload, args=(str(mnt), dict(model.files), rng.randrange(1 << 30),
                                               w))  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(os.fdopen(r)))  # drains the pipe
    try:
        child.start()
        os.close(w)
        w = -1
        reader.start()
        time.sleep(rng.uniform(0.05, 1.2))
        os.kill(pid, signal.SIGKILL)
        child.join(timeout=60)
        assert not child.is_alive(), "the workload hangs on a dead mount"
    finally:
        if w >= 0:
            os.close(w)
        if child.is_alive():
            child.kill()
            child.join()
        unmount_or_kill(mnt, pid)
        if reader.ident is not None:
            reader.join(timeout=60)
    messages = [json.loads(line) for line in lines if line.strip()]
    pending = None
    for msg in messages:
        if "op" in msg:
            pending = msg
        else:
            assert pending is not None
            model.apply(pending["after"])
            pending = None

    with cowfs_mounted(store, "crash:latest", base) as (mnt, _pid):
        got = view(mnt)
    assert os.listdir(work) == [], "the remount did not clear the work dir"
    check(model, got, pending)
    if pending:
        model.in_flight[pending["op"]] = model.in_flight.get(pending["op"], 0) + 1
    model.files = got  # the in-flight op's outcome, now checked, is the new state
    overlaydir.scan(upper)  # still a well-formed overlayfs upper
    report = maintenance.fsck(store)
    assert report.ok, [p.to_json() for p in report.problems]
    model.rounds += 1


def crash_rounds(tmp_path: Path, rounds: int, seed: int) -> Model:
    need_fuse()
    store = build_image(tmp_path)
    base = tmp_path / "c"
    for d in ("mnt", "upper", "work"):
        (base / d).mkdir(parents=True)
    model = Model(files={rel: sha(lower_content(rel, size)) for rel, size in LOWER.items()})
    rng = random.Random(seed)
    for _ in range(rounds):
        crash_round(store, base, model, rng)
    record_figure("crash_rounds", rounds=model.rounds, in_flight=model.in_flight,
                  files=len(model.files))  # fmt: skip
    return model


def test_sigkill_daemon_during_changes(tmp_path: Path) -> None:
    model = crash_rounds(tmp_path, rounds=10, seed=1)
    assert model.rounds == 10


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_daemon_during_changes_many_rounds(tmp_path: Path) -> None:
    model = crash_rounds(tmp_path, rounds=60, seed=2)
    assert model.rounds == 60 and model.in_flight, model.in_flight


# -- import and commit -----------------------------------------------------------------------------


def cowfs_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", "from cowfs.cli import main; main()", "--root", str(root), *args]


def run_time(cmd: list[str]) -> float:
    """Seconds `cmd` takes to finish (to place kills within its run; not a speed check)."""
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - start


def kill_after(cmd: list[str], delay: float) -> int | None:
    """Run `cmd` and SIGKILL it after `delay` seconds; its exit code if it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def assert_store_clean(store: Store) -> None:
    """fsck is clean and every image loads whole. A killed process may leave staging in tmp/
    and unreferenced objects (gc's business), never a visible half image."""
    report = maintenance.fsck(store)
    assert report.ok, [p.to_json() for p in report.problems]
    for image_id in store.image_ids():
        for layer in store.image(image_id).layers:
            store.load_toc(layer)


def _source_layout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An OCI layout of a many-file image (export of an imported tree) and its file hashes."""
    tree = tmp_path / "src-tree"
    rng = random.Random(5)
    want = {}
    for i in range(300):
        rel = f"d{i % 10}/f{i}.bin"
        data = rng.randbytes(rng.choice([100, 30_000, 200_000]))
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
        want[rel] = sha(data)
    src = Store(tmp_path / "src-store")
    import_rootfs(src, tree, "src:1")
    layout = tmp_path / "layout"
    oci.export_image(src, "src:1", str(layout), fmt="oci", compression="gzip")
    return layout, want


def _mounted_view(store: Store, ref: str, base: Path) -> dict[str, str]:
    with cowfs_mounted(store, ref, base, read_only=True) as (mnt, _pid):
        return view(mnt)


@pytest.mark.parametrize("rounds", [pytest.param(4, id="4-rounds"),
                                    pytest.param(20, id="20-rounds", marks=pytest.mark.slow)])
def test_sigkill_during_import(tmp_path: Path, rounds: int) -> None:
    need_fuse()
    layout, want = _source_layout(tmp_path)
    # Import is idempotent (a stored layer is not read again): every round gets a fresh store,
    # and the kill falls within the time one whole import takes.
    full = run_time(cowfs_cmd(tmp_path / "store-whole", "image", "import", str(layout), "imp:1"))
    rng = random.Random(rounds)
    killed = 0
    for i in range(rounds):
        root = tmp_path / f"store-{i}"
        cmd = cowfs_cmd(root, "image", "import", str(layout), "imp:1")
        code = kill_after(cmd, rng.uniform(0.1, 1.0) * full)
        killed += code is None
        if code is None:  # killed: the tag is absent, or present and complete
            if "imp:1" in Store(root).tags():
                assert _mounted_view(Store(root), "imp:1", tmp_path / f"v{i}") == want
        else:
            assert code == 0 and "imp:1" in Store(root).tags()
        assert_store_clean(Store(root))
        retry = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert retry.returncode == 0, retry.stderr
        assert _mounted_view(Store(root), "imp:1", tmp_path / f"v{i}") == want
        assert Store(root).image_ids() == [Store(root).resolve("imp:1").id]  # one image
        shutil.rmtree(root)
    record_figure("import_kills", rounds=rounds, killed=killed, whole_import_s=round(full, 2))


@pytest.mark.parametrize("rounds", [pytest.param(4, id="4-rounds"),
                                    pytest.param(20, id="20-rounds", marks=pytest.mark.slow)])
def test_sigkill_during_commit(tmp_path: Path, rounds: int) -> None:
    need_fuse()
    store = build_image(tmp_path)
    base = tmp_path / "c"
    # Changes to commit: new files, a copy-up, a deletion (whiteout), a renamed lower dir.
    rng = random.Random(7)
    with cowfs_mounted(store, "crash:latest", base) as (mnt, _pid):
        for i in range(150):
            (mnt / "new").mkdir(exist_ok=True)
            (mnt / "new" / f"n{i}").write_bytes(rng.randbytes(rng.choice([10, 50_000, 300_000])))
        with open(mnt / "big/b0.bin", "r+b") as f:
            f.write(b"changed")
        os.unlink(mnt / "small/s0.txt")
        os.rename(mnt / "dirs/d1", mnt / "dirs/moved")
        want = view(mnt)
    upper = base / "upper"
    # A commit of the same upper again stores nothing new: every round gets a fresh copy of
    # the store (base image only), and the kill falls within the time one whole commit takes.
    pristine = tmp_path / "store-pristine"
    shutil.copytree(store.root, pristine, symlinks=True)

    def commit_cmd(root: Path) -> list[str]:
        return cowfs_cmd(root, "commit", "--upper", str(upper), "--image", "crash:latest",
                         "snap:1")  # fmt: skip

    full = run_time(commit_cmd(store.root))
    killed = 0
    for i in range(rounds):
        root = tmp_path / f"store-{i}"
        shutil.copytree(pristine, root, symlinks=True)
        code = kill_after(commit_cmd(root), rng.uniform(0.1, 1.0) * full)
        killed += code is None
        if code is None:
            if "snap:1" in Store(root).tags():
                assert _mounted_view(Store(root), "snap:1", tmp_path / f"v{i}") == want
        else:
            assert code == 0 and "snap:1" in Store(root).tags()
        assert_store_clean(Store(root))
        retry = subprocess.run(commit_cmd(root), capture_output=True, text=True, timeout=300)
        assert retry.returncode == 0, retry.stderr
        assert _mounted_view(Store(root), "snap:1", tmp_path / f"v{i}") == want
        shutil.rmtree(root)
    record_figure("commit_kills", rounds=rounds, killed=killed, whole_commit_s=round(full, 2))
