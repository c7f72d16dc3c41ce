"""diff and commit: what an upper changes, and the image made of it.

The strongest checks use independent oracles: kernel overlayfs mounting the base and the upper
shows the tree a commit must reproduce, and umoci unpacking the exported committed image (it
applies the `.wh.` whiteouts itself) must give that same tree; a real cowfs mount, changed,
committed and remounted from the new image, must show exactly what it showed before.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from cowfs import commit, diff, index, layertar, mounting, oci, overlaydir
from cowfs.cli import cli
from cowfs.errors import InvalidInput, NotFound
from cowfs.rootfs import import_rootfs
from cowfs.store import Store
from cowfs.toc import DIR, REG, Entry, Toc
from tests.conftest import cowfs_mounted, need_fuse, need_root, need_tool, unmount_or_kill
from tests.test_differential import Side, run_op, snapshot

# -- diff: pure rules ------------------------------------------------------------------------------


def _toc(entries: dict[str, str], whiteouts=(), opaque=()) -> Toc:
    toc = Toc()
    for path, kind in entries.items():
        toc.add(Entry(path, kind, mode=0o755 if kind == DIR else 0o644, mtime=1))
    toc.whiteouts.update(whiteouts)
    toc.opaque.update(opaque)
    return toc


_LOWER_KINDS = {"": DIR, "etc": DIR, "etc/passwd": REG, "etc/group": REG, "usr": DIR,
                "usr/lib": DIR, "usr/lib/a": REG, "usr/lib/b": REG, "var": DIR, "var/log": DIR,
                "var/log/x": REG, "tmp": DIR}  # fmt: skip
LOWER = index.merge([_toc(_LOWER_KINDS)]).entries


def _lines(upper: Toc, lower=LOWER) -> list[str]:
    return [str(c) for c in diff.changes(lower, upper)]


def test_diff_added_changed_deleted() -> None:
    upper = _toc({"": DIR, "etc": DIR, "etc/passwd": REG, "etc/new": REG, "tmp": DIR,
                  "tmp/d": DIR, "tmp/d/f": REG, "usr": DIR, "usr/lib": DIR},
                 whiteouts={"usr/lib/a", "var"})  # fmt: skip
    assert _lines(upper) == [
        "C /etc", "A /etc/new", "C /etc/passwd", "C /tmp", "A /tmp/d", "A /tmp/d/f",
        "C /usr", "C /usr/lib", "D /usr/lib/a", "D /var",
    ]  # fmt: skip


def test_diff_dirs_copied_up_only_for_a_change_below() -> None:
    # usr/lib copied up with unchanged metadata, holding nothing: not a change
    assert _lines(_toc({"": DIR, "usr": DIR, "usr/lib": DIR})) == []
    chmod = _toc({"": DIR, "usr": DIR})
    chmod.entries["usr"].mode = 0o700
    assert _lines(chmod) == ["C /usr"]


def test_diff_opaque_dir_and_replacements() -> None:
    # var recreated (rmdir + mkdir: opaque) with one name back; a file became a dir and back
    upper = _toc({"": DIR, "var": DIR, "var/log": DIR, "etc": DIR, "etc/group": DIR,
                  "usr": REG}, opaque={"var"})  # fmt: skip
    assert _lines(upper) == [
        "C /etc", "C /etc/group", "C /usr", "C /var", "C /var/log", "D /var/log/x",
    ]  # fmt: skip


def test_diff_stale_whiteouts_and_unknown_base() -> None:
    upper = _toc({"": DIR, "n": REG}, whiteouts={"never-existed"})
    assert _lines(upper) == ["A /n"]
    upper = _toc({"": DIR, "etc": DIR, "etc/passwd": REG, "etc/new": REG},
                 whiteouts={"etc/group"})  # fmt: skip
    upper.entries["etc"].xattrs = {"trusted.cowfs.origin": b"2"}
    upper.entries["etc/passwd"].xattrs = {"trusted.overlay.origin": b"x"}
    assert _lines(upper, None) == ["C /etc", "D /etc/group", "A /etc/new", "C /etc/passwd"]


def test_diff_json_and_str() -> None:
    c = diff.Change(diff.ADDED, "a/b")
    assert str(c) == "A /a/b" and c.to_json() == {"kind": "A", "path": "/a/b"}


# -- commit and diff on host directories --------------------------------------------------------


def _base_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "var" / "log").mkdir(parents=True)
    (root / "var" / "log" / "old").write_text("old log\n")
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "libx.so").write_bytes(b"\x7fELF" + bytes(3000))
    os.link(root / "usr" / "lib" / "libx.so", root / "usr" / "lib" / "libx.so.1")
    os.symlink("libx.so", root / "usr" / "lib" / "liby.so")
    (root / "home").mkdir()


def _upper_tree(upper: Path, base: Path) -> None:
    """An upper as overlayfs writes it: whiteouts, an opaque dir, copied-up parents."""
    for d in ("etc", "var", "usr", "usr/lib"):
        (upper / d).mkdir(parents=True, exist_ok=True)
        st = os.stat(base / d)
        os.utime(upper / d, ns=(st.st_atime_ns, st.st_mtime_ns))
    (upper / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nme:x:1000:1000::/:/bin/sh\n")
    os.chmod(upper / "etc" / "passwd", 0o600)
    os.setxattr(upper / "etc" / "passwd", "user.note", b"edited")
    fd = os.open(upper / "etc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        overlaydir.make_whiteout(fd, "group")
    finally:
        os.close(fd)
    (upper / "var" / "log").mkdir()
    os.setxattr(upper / "var" / "log", "trusted.overlay.opaque", b"y")
    (upper / "var" / "log" / "new").write_text("new log\n")
    (upper / "usr" / "lib" / "libx.so").write_bytes(b"\x7fELF patched")
    os.link(upper / "usr" / "lib" / "libx.so", upper / "usr" / "lib" / "libx.so.1")
    (upper / "srv").mkdir()
    (upper / "srv" / "data").write_bytes(b"d" * 70000)
    os.mkfifo(upper / "srv" / "fifo")
    os.chown(upper / "srv" / "data", 1000, 1000)


@pytest.fixture
def base_and_upper(tmp_path: Path, store_root: Path):
    need_root()
    base, upper = tmp_path / "base", tmp_path / "upper"
    _base_tree(base)
    upper.mkdir()
    _upper_tree(upper, base)
    store = Store(store_root)
    import_rootfs(store, base, "base:1")
    return store, base, upper


def test_diff_of_an_upper_against_its_image(base_and_upper) -> None:
    store, base, upper = base_and_upper
    lower = mounting.image_index(store, store.resolve("base:1")).entries
    assert [str(c) for c in diff.upper_changes(upper, lower)] == [
        "C /etc", "D /etc/group", "C /etc/passwd", "A /srv", "A /srv/data", "A /srv/fifo",
        "C /usr", "C /usr/lib", "C /usr/lib/libx.so", "C /usr/lib/libx.so.1", "C /var",
        "C /var/log", "A /var/log/new", "D /var/log/old",
    ]  # fmt: skip


def test_commit_layer_format_and_config(base_and_upper) -> None:
    store, base, upper = base_and_upper
    image_id = commit.commit_upper(store, "base:1", upper, "new:1", {"Cmd": ["/bin/true"],
                                   "Env": ["X=1"]}, message="edit", author="me")  # fmt: skip
    img = store.resolve("new:1")
    assert img.id == image_id
    base_img = store.resolve("base:1")
    assert img.layers[:-1] == base_img.layers
    toc = store.load_toc(img.layers[-1])
    assert toc.whiteouts == {"etc/group"} and toc.opaque == {"var/log"}
    assert toc.entries["etc/passwd"].mode == 0o600
    assert toc.entries["etc/passwd"].xattrs == {"user.note": b"edited"}
    assert toc.entries["var/log"].xattrs is None  # the opaque marker is not a user xattr
    lib, lib1 = toc.entries["usr/lib/libx.so"], toc.entries["usr/lib/libx.so.1"]
    assert lib.link and lib.link == lib1.link and lib.digest == lib1.digest
    assert toc.entries["srv/data"].uid == 1000 and toc.entries["srv/fifo"].kind == "p"
    # the config: base config + changes, history, diff_ids of every layer
    cfg = img.config
    assert cfg["config"]["Cmd"] == ["/bin/true"]
    assert cfg["config"]["Env"][-1] == "X=1" and cfg["config"]["Env"][0].startswith("PATH=")
    assert cfg["author"] == "me"
    assert cfg["history"][-1]["comment"] == "edit" and len(cfg["history"]) == 2
    diff_ids = cfg["rootfs"]["diff_ids"]
    assert len(diff_ids) == 2 and diff_ids[0] == base_img.config["rootfs"]["diff_ids"][0]
    # the new layer's diff_id is the sha256 of its exported tar, which carries OCI whiteouts
    buf = io.BytesIO()
    layertar.export_layer(store, img.layers[-1], buf, compression=None)
    assert "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest() == diff_ids[1]
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        names = tar.getnames()
    assert "etc/.wh.group" in names and "var/log/.wh..wh..opq" in names
    assert names.index("var/log/.wh..wh..opq") < names.index("var/log/new")


def test_committed_image_equals_kernel_overlay_view(base_and_upper, tmp_path: Path) -> None:
    """Oracles: kernel overlayfs over (base, upper) vs umoci's unpack of the exported commit."""
    need_tool("umoci")
    store, base, upper = base_and_upper
    commit.commit_upper(store, "base:1", upper, "new:1")
    layout = tmp_path / "layout"
    oci.export_image(store, "new:1", f"{layout}:new")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:new", str(bundle)], check=True,
                   capture_output=True)  # fmt: skip
    mnt, work = tmp_path / "kmnt", tmp_path / "kwork"
    mnt.mkdir()
    work.mkdir()
    # (committed first: overlayfs may write its own xattrs into the upper)
    opts = f"lowerdir={base},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        want = _comparable(snapshot(str(mnt), 0, raw_mtime=True))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    got = _comparable(snapshot(str(bundle / "rootfs"), 0, raw_mtime=True))
    # umoci makes the rootfs dir itself; every entry below it must match
    want.pop(""), got.pop("")
    assert got == want


def _comparable(snap: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for rel, info in snap.items():
        info = {k: v for k, v in info.items() if k not in ("ino", "d_ino")}
        if info["type"] == "d":
            info.pop("nlink")  # overlayfs reports 1 for merged dirs
        out[rel] = info
    return out


def test_commit_errors(base_and_upper, tmp_path: Path) -> None:
    store, base, upper = base_and_upper
    with pytest.raises(NotFound):
        commit.commit_upper(store, "nope:1", upper, "x:1")
    with pytest.raises(InvalidInput):
        commit.commit_upper(store, "base:1", tmp_path / "missing", "x:1")
    with pytest.raises(InvalidInput):
        commit.commit_upper(store, "base:1", upper, "x@sha256:00")


def test_parse_change() -> None:
    assert commit.parse_change('CMD ["sh", "-c", "x"]') == {"Cmd": ["sh", "-c", "x"]}
    assert commit.parse_change("ENTRYPOINT top -b") == {"Entrypoint": ["/bin/sh", "-c", "top -b"]}
    assert commit.parse_change('ENV A=1 B="two words"') == {"Env": ["A=1", "B=two words"]}
    assert commit.parse_change("ENV A 1 2") == {"Env": ["A=1 2"]}
    assert commit.parse_change("EXPOSE 80 53/udp") == {"ExposedPorts": {"80/tcp": {},
                                                                         "53/udp": {}}}  # fmt: skip
    assert commit.parse_change("workdir /srv") == {"WorkingDir": "/srv"}
    for bad in ("FROM busybox", "CMD", 'CMD ["unterminated', "LABEL novalue"):
        with pytest.raises(InvalidInput):
            commit.parse_change(bad)
    cfg = {"Env": ["PATH=/bin", "A=0"], "Labels": {"x": "1"}}
    commit.apply_changes(cfg, {"Env": ["A=1"], "Labels": {"y": "2"}, "User": "me"})
    assert cfg == {"Env": ["PATH=/bin", "A=1"], "Labels": {"x": "1", "y": "2"}, "User": "me"}


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_diff_and_commit(base_and_upper, store_root: Path) -> None:
    store, base, upper = base_and_upper
    run = CliRunner().invoke
    r = run(cli, ["--root", str(store_root), "diff", str(upper), "--image", "base:1"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:3] == ["C /etc", "D /etc/group", "C /etc/passwd"]
    r = run(cli, ["--root", str(store_root), "diff", str(upper), "--lower", str(base), "--json"])
    assert json.loads(r.output)[1] == {"kind": "D", "path": "/etc/group"}
    r = run(cli, ["--root", str(store_root), "commit", "--upper", str(upper), "--image", "base:1",
                  "-c", "USER nobody", "-m", "from cli", "new:cli"])  # fmt: skip
    assert r.exit_code == 0, r.output
    image_id = r.output.strip().removeprefix("sha256:")
    img = store.resolve("new:cli")
    assert img.id == image_id and img.config["config"]["User"] == "nobody"


@pytest.mark.parametrize(
    "args, message",
    [
        (["diff", "no-such-container"], "Error: no such container or directory: no-such-container"),
        (["commit", "--upper", "/", "x:1"], "Error: --upper needs --image BASE"),
        (["commit", "only-one"], "Error: give CONTAINER NAME[:TAG], or --upper DIR --image BASE "
                                 "NAME[:TAG]"),  # fmt: skip
        (["commit", "--upper", "/nonexistent", "--image", "b", "x"],
         "Error: upper directory /nonexistent does not exist"),  # fmt: skip
        (["commit", "--upper", "/", "--image", "b", "-c", "FROM x", "x"],
         "Error: unsupported --change 'FROM x' (one of CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, "
         "STOPSIGNAL, USER, WORKDIR, with a value)"),  # fmt: skip
    ],
)
def test_cli_errors_are_one_line(store_root: Path, args: list[str], message: str) -> None:
    cowfs = str(Path(__file__).parent.parent / ".venv" / "bin" / "cowfs")
    proc = subprocess.run([cowfs, "--root", str(store_root), *args], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr == message + "\n" and proc.stdout == ""


# -- through a real cowfs mount --------------------------------------------------------------------

OPS = [
    ("append", "etc/passwd", b"me:x:1000:1000::/:/bin/sh\n"), ("chmod", "etc/passwd", 0o600),
    ("setxattr", "etc/passwd", "user.note", b"edited"), ("unlink", "etc/group"),
    ("unlink", "var/log/old"), ("rmdir", "var/log"), ("mkdir", "var/log", 0o750),
    ("write_file", "var/log/new", b"new log\n"), ("append", "usr/lib/libx.so", b"patch"),
    ("rename", "usr/lib", "usr/lib64"), ("link", "usr/lib64/libx.so", "home/libx-alias"),
    ("mkdir", "srv", 0o755), ("write_file", "srv/data", b"d" * 70000),
    ("chown", "srv/data", 1000, 1000), ("mkfifo", "srv/fifo"), ("symlink", "../srv", "home/s"),
    ("utime", "home", 1_500_000_000 * 10**9), ("setxattr", "", "user.root", b"r"),
]  # fmt: skip


def test_committed_image_mounts_with_the_same_tree(base_and_upper, tmp_path: Path) -> None:
    need_fuse()
    store, base, _ = base_and_upper
    with cowfs_mounted(store, "base:1", tmp_path / "c") as (mnt, _pid):
        side = Side("cowfs", str(mnt), "", "", lambda: None)
        for op in OPS:
            assert run_op(side, op[0], op[1:])[0] == "ok", op
        before = _stable(snapshot(str(mnt), 0, raw_mtime=True))
    upper = tmp_path / "c" / "upper"
    lines = [str(c) for c in diff.upper_changes(upper, None)]
    assert "D /etc/group" in lines and "A /srv/data" in lines
    commit.commit_upper(store, "base:1", upper, "committed:1")
    # read-only and without an upper: the root itself must come from the committed layer
    mnt = tmp_path / "after"
    mnt.mkdir()
    pid = mounting.mount(store, "committed:1", mnt, read_only=True)
    try:
        after = _stable(snapshot(str(mnt), 0, raw_mtime=True))
    finally:
        unmount_or_kill(mnt, pid)
    for rel in sorted(set(before) | set(after)):
        assert after.get(rel) == before.get(rel), rel


def _stable(snap: dict[str, dict]) -> dict[str, dict]:
    """Everything but inode numbers (a new image numbers its inodes afresh)."""
    return {rel: {k: v for k, v in info.items() if k not in ("ino", "d_ino")}
            for rel, info in snap.items()}  # fmt: skip


def test_container_diff_and_commit_by_name(base_and_upper, store_root: Path,
                                           tmp_path: Path) -> None:  # fmt: skip
    """`cowfs diff NAME` / `cowfs commit NAME TAG` find the container's image and upper; the
    runtime's empty bind-mount placeholders (/etc/hostname ...) are not the container's changes."""
    need_fuse()
    from runtime.container import Runtime
    from runtime.spec import RunOptions

    store, base, _ = base_and_upper
    state = Runtime(store).create("base:1", RunOptions(command=["/bin/sh"]), name="web")
    cdir = store.containers_dir / state.id
    mnt = tmp_path / "cmnt"
    mnt.mkdir()
    pid = mounting.mount(store, state.image_id, mnt, cdir / "upper", cdir / "work")
    try:
        (mnt / "etc" / "hostname").touch()  # what the runtime does before its bind mount
        (mnt / "etc" / "motd").write_text("hello\n")
        os.unlink(mnt / "etc" / "group")
    finally:
        unmount_or_kill(mnt, pid)
    run = CliRunner().invoke
    r = run(cli, ["--root", str(store_root), "diff", "web"])
    assert r.output.splitlines() == ["C /etc", "D /etc/group", "A /etc/motd"], r.output
    r = run(cli, ["--root", str(store_root), "diff", state.id[:8], "--json"])
    assert [c["path"] for c in json.loads(r.output)] == ["/etc", "/etc/group", "/etc/motd"]
    r = run(cli, ["--root", str(store_root), "commit", "web", "web:snap"])
    assert r.exit_code == 0, r.output
    toc = store.load_toc(store.resolve("web:snap").layers[-1])
    assert sorted(toc.entries) == ["", "etc", "etc/motd"] and toc.whiteouts == {"etc/group"}


def test_commit_refuses_a_container_a_host_crash_cut_short(base_and_upper,
                                                            store_root: Path) -> None:  # fmt: skip
    """A container whose mount left copies marked before this boot (cowfs/settling.py) may hold
    copy-ups with holes: commit says so instead of committing them, and works once the mark
    is gone (its next mount repairs and removes it)."""
    from cowfs.settling import MARK_PREFIX, boot_id
    from runtime.container import Runtime
    from runtime.spec import RunOptions

    store, _base, _ = base_and_upper
    state = Runtime(store).create("base:1", RunOptions(command=["/bin/sh"]), name="cut")
    work = store.containers_dir / state.id / "work"
    work.mkdir(parents=True, exist_ok=True)
    run = CliRunner().invoke
    (work / (MARK_PREFIX + boot_id())).mkdir()  # this boot's: the mount is live, not cut short
    r = run(cli, ["--root", str(store_root), "commit", "cut", "cut:1"])
    assert r.exit_code == 0, r.output
    (work / (MARK_PREFIX + boot_id())).rmdir()
    (work / (MARK_PREFIX + "00000000-0000-0000-0000-000000000000")).mkdir()
    r = run(cli, ["--root", str(store_root), "commit", "cut", "cut:2"])
    assert isinstance(r.exception, InvalidInput)  # main() prints it as one line, exit 2
    assert "cut short by a host crash" in str(r.exception)
    assert not any(t.startswith("cut:2") for t in store.tags())
