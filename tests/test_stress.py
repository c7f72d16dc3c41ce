"""Multi-process stress on one cowfs mount, checked against an in-memory model.

Several worker processes hammer the same mount at once, each in a subtree of its own (that starts
out as lower content, so copy-ups race with everything else): create, write, append, pwrite,
truncate, rename of files and directories (over existing files too), hard links, unlink, mkdir,
rmdir, readdir, read and stat, plus reads of a shared lower subtree nobody changes. Every worker
keeps a model (paths -> inode -> bytes) and checks each read, listing and link count against it.
At the end the parent checks the whole tree against the models, remounts the same upper and
checks again (nothing was lost or only cached).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import traceback
from pathlib import Path

import pytest

from tests.conftest import need_fuse, unmount_or_kill

SHARED_FILES = 40


def _shared_content(n: int) -> bytes:
    return f"shared file {n}\n".encode() * (n * 37 % 500 + 1)


def _worker_lower(root: Path, w: int) -> dict[str, bytes]:
    """Lower content of worker w's subtree; returns its files (relative to the subtree)."""
    files = {f"f{k}": f"w{w} lower {k}\n".encode() * (k + 1) for k in range(6)}
    files.update({f"d{k}/g{j}": f"w{w} d{k} g{j}\n".encode() for k in range(3) for j in range(3)})
    for rel, data in files.items():
        p = root / f"w{w}" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.link(root / f"w{w}" / "f0", root / f"w{w}" / "f0-link")
    files["f0-link"] = files["f0"]
    return files


class Model:
    """A worker's view of its subtree: directories, and paths -> inode -> bytes."""

    def __init__(self, files: dict[str, bytes], links: list[tuple[str, str]]) -> None:
        self.dirs = {""} | {os.path.dirname(p) for p in files}
        self.ino: dict[str, int] = {}
        self.data: dict[int, bytearray] = {}
        n = 0
        for path, data in sorted(files.items()):
            n += 1
            self.ino[path] = n
            self.data[n] = bytearray(data)
        for a, b in links:
            self.ino[b] = self.ino[a]
        self.next = n + 1

    def nlink(self, path: str) -> int:
        return sum(1 for i in self.ino.values() if i == self.ino[path])

    def children(self, d: str) -> set[str]:
        prefix = d + "/" if d else ""
        names = {p[len(prefix) :].split("/")[0] for p in [*self.ino, *self.dirs]
                 if p.startswith(prefix) and p != d}  # fmt: skip
        return names

    def new_name(self, rng: random.Random) -> str:
        parent = rng.choice(sorted(self.dirs))
        name = f"n{rng.randrange(40)}"
        return f"{parent}/{name}" if parent else name


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def _work(mnt: str, w: int, ops: int, seed: int, model: Model) -> None:
    rng = random.Random(seed * 1000 + w)
    base = os.path.join(mnt, f"w{w}")

    def p(rel: str) -> str:
        return os.path.join(base, rel) if rel else base

    for step in range(ops):
        files = sorted(model.ino)
        op = rng.choice(["write", "append", "pwrite", "truncate", "rename", "rename_dir", "unlink",
                         "mkdir", "rmdir", "link", "readdir", "read", "read", "stat", "shared",
                         "shared", "held"])  # fmt: skip
        if op in ("unlink", "held") and len(files) < 12:
            op = "write"  # keep the subtree populated
        where = f"w{w} step {step} {op}"
        if op == "write":
            path = model.new_name(rng) if rng.random() < 0.6 or not files else rng.choice(files)
            if path in model.dirs:
                continue
            data = rng.randbytes(rng.randrange(0, 9000))
            with open(p(path), "wb") as f:
                f.write(data)
            if path not in model.ino:
                model.ino[path] = model.next
                model.next += 1
            model.data[model.ino[path]] = bytearray(data)
        elif op in ("append", "pwrite", "truncate") and files:
            path = rng.choice(files)
            buf = model.data[model.ino[path]]
            if op == "append":
                extra = rng.randbytes(rng.randrange(1, 3000))
                with open(p(path), "ab") as f:
                    f.write(extra)
                buf.extend(extra)
            elif op == "pwrite":
                off, extra = rng.randrange(0, len(buf) + 10), rng.randbytes(rng.randrange(1, 500))
                fd = os.open(p(path), os.O_WRONLY)
                try:
                    os.pwrite(fd, extra, off)
                finally:
                    os.close(fd)
                if off > len(buf):
                    buf.extend(bytes(off - len(buf)))
                buf[off : off + len(extra)] = extra
            else:
                size = rng.randrange(0, len(buf) + 100)
                os.truncate(p(path), size)
                del buf[size:]
                buf.extend(bytes(size - len(buf)))
        elif op == "rename" and files:
            src = rng.choice(files)
            dst = rng.choice(files) if rng.random() < 0.3 else model.new_name(rng)
            if dst in model.dirs or src == dst or model.ino.get(dst) == model.ino[src]:
                continue  # (renaming onto another name of the same inode is a no-op in POSIX)
            os.rename(p(src), p(dst))
            model.ino[dst] = model.ino.pop(src)
        elif op == "rename_dir":
            dirs = sorted(d for d in model.dirs if d)
            if not dirs:
                continue
            src = rng.choice(dirs)
            dst = f"m{rng.randrange(40)}"
            if dst in model.dirs or dst in model.ino or dst.startswith(src):
                continue
            os.rename(p(src), p(dst))
            moved = {q for q in [*model.ino, *model.dirs] if q == src or q.startswith(src + "/")}
            for q in moved:
                nq = dst + q[len(src) :]
                if q in model.ino:
                    model.ino[nq] = model.ino.pop(q)
                else:
                    model.dirs.discard(q)
                    model.dirs.add(nq)
        elif op == "unlink" and files:
            path = rng.choice(files)
            os.unlink(p(path))
            del model.ino[path]
        elif op == "mkdir":
            path = model.new_name(rng)
            if path in model.dirs or path in model.ino:
                continue
            os.mkdir(p(path))
            model.dirs.add(path)
        elif op == "rmdir":
            empty = sorted(d for d in model.dirs if d and not model.children(d))
            if empty:
                path = rng.choice(empty)
                os.rmdir(p(path))
                model.dirs.discard(path)
        elif op == "link" and files:
            src, dst = rng.choice(files), model.new_name(rng)
            if dst in model.ino or dst in model.dirs:
                continue
            os.link(p(src), p(dst))
            model.ino[dst] = model.ino[src]
        elif op == "readdir":
            d = rng.choice(sorted(model.dirs))
            got = set(os.listdir(p(d)))
            _check(got == model.children(d), f"{where}: listdir {d}: {got} != {model.children(d)}")
        elif op == "read" and files:
            path = rng.choice(files)
            with open(p(path), "rb") as f:
                got = f.read()
            _check(got == model.data[model.ino[path]], f"{where}: content of {path}")
        elif op == "stat" and files:
            path = rng.choice(files)
            st = os.stat(p(path))
            want = (len(model.data[model.ino[path]]), model.nlink(path))
            _check((st.st_size, st.st_nlink) == want, f"{where}: {path} size/nlink "
                   f"{(st.st_size, st.st_nlink)} != {want}")  # fmt: skip
        elif op == "shared":
            n = rng.randrange(SHARED_FILES)
            with open(os.path.join(mnt, "shared", f"s{n}"), "rb") as f:
                _check(f.read() == _shared_content(n), f"{where}: shared s{n}")
        elif op == "held" and files:
            # an open file keeps its content after its name goes away
            path = rng.choice(files)
            with open(p(path), "rb") as f:
                want = bytes(model.data[model.ino[path]])
                os.unlink(p(path))
                del model.ino[path]
                _check(f.read() == want, f"{where}: open-unlinked {path}")


def _child(mnt: str, w: int, ops: int, seed: int, model: Model, out) -> None:
    try:
        _work(mnt, w, ops, seed, model)
        out.put((w, None, model.ino, {i: bytes(d) for i, d in model.data.items()}, model.dirs))
    except BaseException:
        out.put((w, traceback.format_exc(), None, None, None))


def _verify_tree(mnt: Path, w: int, ino: dict[str, int], data: dict[int, bytes],
                 dirs: set[str]) -> list[str]:  # fmt: skip
    problems = []
    base = mnt / f"w{w}"
    seen_files, seen_dirs = {}, set()
    for dirpath, _dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        rel_dir = "" if rel_dir == "." else rel_dir
        seen_dirs.add(rel_dir)
        for n in filenames:
            rel = os.path.join(rel_dir, n) if rel_dir else n
            seen_files[rel] = (base / rel).read_bytes(), os.lstat(base / rel).st_nlink
    if seen_dirs != dirs:
        problems.append(f"w{w}: dirs {sorted(seen_dirs ^ dirs)} differ")
    if set(seen_files) != set(ino):
        problems.append(f"w{w}: files {sorted(set(seen_files) ^ set(ino))} differ")
    for rel in sorted(set(seen_files) & set(ino)):
        content, nlink = seen_files[rel]
        if content != data[ino[rel]]:
            problems.append(f"w{w}: {rel}: content differs")
        want_nlink = sum(1 for i in ino.values() if i == ino[rel])
        if nlink != want_nlink:
            problems.append(f"w{w}: {rel}: nlink {nlink} != {want_nlink}")
    return problems


def run_stress(tmp_path: Path, workers: int, ops: int, seed: int, threads: bool = False) -> None:
    need_fuse()
    from cowfs import mounting

    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    for n in range(SHARED_FILES):
        (lower / "shared").mkdir(exist_ok=True)
        (lower / "shared" / f"s{n}").write_bytes(_shared_content(n))
    models = {}
    for w in range(workers):
        models[w] = Model(_worker_lower(lower, w), [("f0", "f0-link")])
    pid = mounting.mount_dirs([str(lower)], mnt, upper, work, threads=threads)
    try:
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        procs = [ctx.Process(target=_child, args=(str(mnt), w, ops, seed, models[w], out))
                 for w in range(workers)]  # fmt: skip
        for proc in procs:
            proc.start()
        results = {}
        try:
            for _ in procs:
                # a generous bound against a hung mount, not a speed check
                w, error, ino, data, dirs = out.get(timeout=600)
                results[w] = (error, ino, data, dirs)
        finally:
            for proc in procs:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()  # by pid (multiprocessing keeps it)
                    proc.join()
        errors = [e for e, *_ in results.values() if e]
        assert not errors, f"seed {seed}:\n" + "\n".join(errors)
        problems = [q for w, (_, ino, data, dirs) in results.items()
                    for q in _verify_tree(mnt, w, ino, data, dirs)]  # fmt: skip
        assert not problems, (seed, problems)
    finally:
        unmount_or_kill(mnt, pid)
    # the same upper mounted again shows the same trees: everything reached the upper
    pid = mounting.mount_dirs([str(lower)], mnt, upper, work)
    try:
        problems = [q for w, (_, ino, data, dirs) in results.items()
                    for q in _verify_tree(mnt, w, ino, data, dirs)]  # fmt: skip
        assert not problems, (seed, "after remount", problems)
    finally:
        unmount_or_kill(mnt, pid)


def test_stress_short(tmp_path: Path) -> None:
    run_stress(tmp_path, workers=4, ops=250, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_stress_long(tmp_path: Path) -> None:
    run_stress(tmp_path, workers=8, ops=4000, seed=random.randrange(1 << 30))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_stress_long_threaded_daemon(tmp_path: Path) -> None:
    run_stress(tmp_path, workers=8, ops=3000, seed=random.randrange(1 << 30), threads=True)
