"""The data every system is measured on, built once and cached under the data dir.

Layout of a dataset directory (one per profile):

    tree/          the merged root filesystem plus bench/ with the large random files; the
                   "native" system reads and writes this directory directly
    layers/N/      the same content split into lower layers, bottom first (kernel overlayfs,
                   fuse-overlayfs and cowfs with directory lowers stack these)
    oci/           the layers as an OCI image layout (gzip layer tars), tag "bench"
    untar.tar      an uncompressed tar of a real subtree, for the untar workload
    dataset.json   written last: its presence means the directory is complete

The rootfs comes from `debootstrap --variant=minbase` (with a few development packages so the tree
has ~60k entries) and is split into layers by the Debian package that owns each file, the way an
image built by several `apt-get install` steps is. Without debootstrap (or with the quick profile)
the tree is a busybox-static root plus Python sources copied from the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.profile import FULL_INCLUDES, MiB, Profile
from cowfs.errors import BenchError

BENCH_DIR = "bench"  # top-level directory of the large random files, in its own top layer
SEQ_FILE = f"{BENCH_DIR}/seq.bin"
COPYUP_SMALL = f"{BENCH_DIR}/copyup-small.bin"
COPYUP_BIG = f"{BENCH_DIR}/copyup-big.bin"
ROOTFS_LAYERS = 3
IMAGE_TAG = "bench"
FORMAT = 2  # bump when the layout or the sampling changes, so stale caches are rebuilt


@dataclass
class Dataset:
    root: Path
    profile: str
    source: str
    layers: list[Path]  # bottom first
    files: int
    dirs: int
    symlinks: int
    bytes: int
    layer_files: list[int]
    tars: list[dict[str, object]]  # per layer: path, size, uncompressed size, digests
    samples: dict[str, list[str]] = field(default_factory=dict)
    untar_files: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    @property
    def oci(self) -> Path:
        return self.root / "oci"

    @property
    def untar(self) -> Path:
        return self.root / "untar.tar"

    def lowerdir(self) -> str:
        """Overlayfs-style lowerdir option: the top layer first."""
        return ":".join(str(p) for p in reversed(self.layers))

    def summary(self) -> dict[str, object]:
        return {
            "profile": self.profile,
            "source": self.source,
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "bytes": self.bytes,
            "layers": len(self.layers),
            "layer_files": self.layer_files,
            "tars": self.tars,
            "untar_files": self.untar_files,
            "notes": self.notes,
        }


def load_or_build(data_dir: Path, profile: Profile, log: Callable[[str], None]) -> Dataset:
    root = data_dir / profile.name
    marker = root / "dataset.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("format") == FORMAT:
            if meta.get("untar_target") != profile.untar_files:
                # Cheap to redo: only the untar workload's tar depends on this size.
                _write_untar(root, root / "tree", profile.untar_files, meta)
                _write_meta(marker, meta)
            return _from_meta(root, meta)
        log(f"dataset format changed, rebuilding {root}")
    if root.exists():
        _unmount_under(root)
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ds = _build(root, profile, log)
    meta = {"format": FORMAT, **ds.summary(), "samples": ds.samples}
    _write_untar(root, ds.tree, profile.untar_files, meta)
    _write_meta(marker, meta)
    return _from_meta(root, meta)


def _write_meta(marker: Path, meta: dict) -> None:
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.rename(marker)


def _write_untar(root: Path, tree: Path, target: int, meta: dict) -> None:
    """untar.tar: the real subtree whose file count is closest to target."""
    untar_dir, untar_files = _pick_subtree(tree, target)
    tmp = root / "untar.tar.tmp"
    _run(["tar", "-C", str(tree), "--numeric-owner", "-cf", str(tmp), untar_dir])
    tmp.rename(root / "untar.tar")
    meta["samples"]["untar_dir"] = [untar_dir]
    meta["untar_files"] = untar_files
    meta["untar_target"] = target


def _from_meta(root: Path, meta: dict) -> Dataset:
    n = int(meta["layers"])
    return Dataset(
        root=root,
        profile=meta["profile"],
        source=meta["source"],
        layers=[root / "layers" / str(i) for i in range(n)],
        files=meta["files"],
        dirs=meta["dirs"],
        symlinks=meta["symlinks"],
        bytes=meta["bytes"],
        layer_files=meta["layer_files"],
        tars=meta["tars"],
        samples=meta["samples"],
        untar_files=meta["untar_files"],
        notes=meta.get("notes", []),
    )


# ---------------------------------------------------------------------------------------- build


def _build(root: Path, profile: Profile, log: Callable[[str], None]) -> Dataset:
    tree = root / "tree"
    notes: list[str] = []
    owner: Callable[[str], int] | None = None
    source = ""
    if profile.debootstrap:
        why = _debootstrap(tree, log)
        if why is None:
            source = "debootstrap --variant=minbase bookworm + " + ",".join(FULL_INCLUDES)
            owner = _dpkg_layer_of(tree)
        else:
            notes.append(f"debootstrap unavailable ({why}); used a host Python tree instead")
    if not source:
        log("copying a busybox + Python tree from the host")
        _host_tree(tree, profile.tree_files)
        source = f"busybox-static rootfs + {profile.tree_files} Python files copied from the host"
    if owner is None:
        owner = _dir_hash_layer

    log("writing the large random files")
    bench = tree / BENCH_DIR
    bench.mkdir(exist_ok=True)
    _random_file(tree / SEQ_FILE, profile.seq_bytes)
    _random_file(tree / COPYUP_SMALL, profile.copyup_small)
    _random_file(tree / COPYUP_BIG, profile.copyup_big)

    log("splitting the tree into layers")
    layers = [root / "layers" / str(i) for i in range(ROOTFS_LAYERS + 1)]

    def layer_of(rel: str) -> int:
        if rel == BENCH_DIR or rel.startswith(BENCH_DIR + "/"):
            return ROOTFS_LAYERS  # the big files are a layer of their own, on top
        return owner(rel)

    layer_files = _split(tree, layers, layer_of)

    log("writing gzip layer tars and the OCI layout")
    tars = _oci_layout(root / "oci", layers)

    counts = _count(tree)
    samples = _samples(tree, profile)
    return Dataset(
        root=root,
        profile=profile.name,
        source=source,
        layers=layers,
        files=counts["files"],
        dirs=counts["dirs"],
        symlinks=counts["symlinks"],
        bytes=counts["bytes"],
        layer_files=layer_files,
        tars=tars,
        samples=samples,
        notes=notes,
    )


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise BenchError(f"{cmd[0]} failed: {err[-1] if err else proc.returncode}")
    return proc


def _mirror() -> str:
    """The Debian mirror apt uses here, so debootstrap goes where apt-get already can."""
    candidates = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        candidates += sorted(d.iterdir())
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return m.group(1)
        for block in text.split("\n\n"):
            if re.search(r"^Suites:.*\bbookworm\b", block, re.M) and "security" not in block:
                m = re.search(r"^URIs:\s*(\S+)", block, re.M)
                if m:
                    return m.group(1)
    return "http://deb.debian.org/debian"


def _debootstrap(tree: Path, log: Callable[[str], None]) -> str | None:
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed"
    staging = tree.with_name("tree.debootstrap")
    if staging.exists():
        _unmount_under(staging)
        shutil.rmtree(staging)
    mirror = _mirror()
    log(f"debootstrap minbase bookworm from {mirror} (a few minutes, once)")
    cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(FULL_INCLUDES),
           "bookworm", str(staging), mirror]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        proc = None
    finally:
        # debootstrap mounts /proc and /sys inside the target while it configures packages.
        _unmount_under(staging)
    if proc is None or proc.returncode != 0:
        tail = "timed out" if proc is None else (proc.stderr or proc.stdout).strip()[-200:]
        if staging.exists():
            shutil.rmtree(staging)
        return f"debootstrap failed: {tail}"
    # Caches that are not part of a real image.
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (staging / sub).glob("*"):
            if p.is_file():
                p.unlink()
    staging.rename(tree)
    return None


def _unmount_under(base: Path) -> None:
    base_s = str(base.resolve())
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4].replace("\\040", " ") for line in f]
    for mnt in sorted(mounts, key=len, reverse=True):
        if mnt == base_s or mnt.startswith(base_s + "/"):
            subprocess.run(["umount", "-l", mnt], capture_output=True)


def _host_tree(tree: Path, n_files: int) -> None:
    """A small root: busybox-static with its applet links, plus Python sources from the host."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise BenchError("busybox is not installed (Debian package busybox-static)")
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "usr/lib"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    for applet in ("sh", "true", "ls", "cat", "echo"):
        os.symlink("busybox", tree / "bin" / applet)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc" / "group").write_text("root:x:0:\n")
    copied = 0
    sources = sorted(Path("/usr/lib").glob("python3*")) + [Path("/usr/share/perl")]
    for src in sources:
        if not src.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = Path(dirpath).relative_to("/")
            for name in sorted(filenames):
                if copied >= n_files:
                    return
                s = Path(dirpath) / name
                if s.is_symlink() or not s.is_file():
                    continue
                dst = tree / rel / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, dst)
                copied += 1


def _dpkg_layer_of(tree: Path) -> Callable[[str], int]:
    """Layer by owning package: 0 the minbase set, 1 Python/Perl, 2 the development packages."""
    status = (tree / "var/lib/dpkg/status").read_text()
    base: set[str] = set()
    for block in status.split("\n\n"):
        name = re.search(r"^Package:\s*(\S+)", block, re.M)
        prio = re.search(r"^Priority:\s*(\S+)", block, re.M)
        if name and prio and prio.group(1) in ("required", "important"):
            base.add(name.group(1))
    base.add("apt")
    owner: dict[str, int] = {}
    for lst in sorted((tree / "var/lib/dpkg/info").glob("*.list")):
        pkg = lst.name[: -len(".list")].split(":")[0]
        if pkg in base:
            layer = 0
        elif "python" in pkg or "perl" in pkg:
            layer = 1
        else:
            layer = 2
        for line in lst.read_text(errors="surrogateescape").splitlines():
            rel = line.strip().lstrip("/")
            if rel and rel not in owner:
                owner[rel] = layer
    return lambda rel: owner.get(rel, 0)  # unowned files (dpkg db, generated /etc) → base


def _dir_hash_layer(rel: str) -> int:
    """Whole directories to one layer, chosen by a hash of the parent: merged parents result."""
    parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
    return zlib.crc32(parent.encode("utf-8", "surrogateescape")) % ROOTFS_LAYERS


def _walk(tree: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below tree (not tree itself) as (relative path, lstat), parents first."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(tree / rel_dir if rel_dir else tree) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            st = e.stat(follow_symlinks=False)
            yield rel, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)


def _split(tree: Path, layers: list[Path], layer_of: Callable[[str], int]) -> list[int]:
    """Copy every entry of tree into the layer that owns it; parent dirs go where needed."""
    lists: list[list[str]] = [[] for _ in layers]
    dirs_in: list[set[str]] = [set() for _ in layers]
    links: dict[tuple[int, int], int] = {}
    empty_dirs: list[str] = []
    has_child: set[str] = set()
    dir_list: list[str] = []
    for rel, st in _walk(tree):
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        has_child.add(parent)
        if stat.S_ISDIR(st.st_mode):
            dir_list.append(rel)
            continue
        layer = layer_of(rel)
        if st.st_nlink > 1:  # a hard-link group stays in one layer, the first member's
            layer = links.setdefault((st.st_dev, st.st_ino), layer)
        lists[layer].append(rel)
        p = parent
        while p and p not in dirs_in[layer]:
            dirs_in[layer].add(p)
            p = p.rsplit("/", 1)[0] if "/" in p else ""
    empty_dirs = [d for d in dir_list if d not in has_child]
    for d in empty_dirs:
        layer = layer_of(d)
        p = d
        while p and p not in dirs_in[layer]:
            dirs_in[layer].add(p)
            p = p.rsplit("/", 1)[0] if "/" in p else ""
    counts = []
    for i, layer in enumerate(layers):
        layer.mkdir(parents=True)
        st = os.stat(tree)
        os.chmod(layer, st.st_mode & 0o7777)
        names = sorted(dirs_in[i]) + lists[i]
        counts.append(len(lists[i]))
        listfile = layer.with_name(f"{i}.list")
        listfile.write_bytes(b"\0".join(n.encode("utf-8", "surrogateescape") for n in names))
        xattr = ["--xattrs", "--xattrs-include=*"]
        pack = subprocess.Popen(
            ["tar", "-C", str(tree), "--numeric-owner", *xattr, "--no-recursion", "--null",
             "-T", str(listfile), "-cf", "-"], stdout=subprocess.PIPE,
        )  # fmt: skip
        unpack = subprocess.run(
            ["tar", "-C", str(layer), "--numeric-owner", *xattr, "-xpf", "-"],
            stdin=pack.stdout,
            capture_output=True,
            text=True,
        )
        assert pack.stdout is not None
        pack.stdout.close()
        if pack.wait() != 0 or unpack.returncode != 0:
            raise BenchError(f"splitting layer {i} failed: {unpack.stderr.strip()[-200:]}")
        listfile.unlink()
    return counts


def _random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def _oci_layout(oci: Path, layers: list[Path]) -> list[dict[str, object]]:
    """An OCI image layout of the layers (gzip tars), so the store imports what overlay stacks."""
    blobs = oci / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tars: list[dict[str, object]] = []
    descs = []
    diff_ids = []
    for i, layer in enumerate(layers):
        tmp = blobs / f"layer-{i}.tmp"
        # The big random files do not compress: level 1 saves a minute and changes nothing.
        level = "-1" if i == len(layers) - 1 else "-6"
        tar = subprocess.Popen(
            ["tar", "-C", str(layer), "--sort=name", "--numeric-owner", "--xattrs",
             "--xattrs-include=*", "-cf", "-", "."], stdout=subprocess.PIPE,
        )  # fmt: skip
        diff = hashlib.sha256()
        raw = 0
        with open(tmp, "wb") as out:
            gz = subprocess.Popen(["gzip", "-n", level], stdin=subprocess.PIPE, stdout=out)
            assert tar.stdout is not None and gz.stdin is not None
            while chunk := tar.stdout.read(MiB):
                diff.update(chunk)
                raw += len(chunk)
                gz.stdin.write(chunk)
            gz.stdin.close()
            if tar.wait() != 0 or gz.wait() != 0:
                raise BenchError(f"packing layer {i} failed")
        digest = _sha256_file(tmp)
        tmp.rename(blobs / digest)
        size = (blobs / digest).stat().st_size
        diff_ids.append("sha256:" + diff.hexdigest())
        desc = {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": "sha256:" + digest,
            "size": size,
        }
        descs.append(desc)
        tars.append(
            {
                "path": str((blobs / digest).relative_to(oci.parent)),
                "size": size,
                "uncompressed": raw,
                "digest": desc["digest"],
                "diff_id": diff_ids[-1],
                "bench_data": i == len(layers) - 1,
            }
        )
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"cowfs bench layer {i}"} for i in range(len(layers))],
    }
    cfg_desc = _blob(blobs, config, "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg_desc,
        "layers": descs,
    }
    man_desc = _blob(blobs, manifest, "application/vnd.oci.image.manifest.v1+json")
    man_desc["annotations"] = {"org.opencontainers.image.ref.name": IMAGE_TAG}
    index = {"schemaVersion": 2, "manifests": [man_desc]}
    (oci / "index.json").write_text(json.dumps(index))
    (oci / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return tars


def _blob(blobs: Path, obj: object, media_type: str) -> dict[str, object]:
    data = json.dumps(obj, sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def _count(tree: Path) -> dict[str, int]:
    c = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
    for _rel, st in _walk(tree):
        if stat.S_ISLNK(st.st_mode):
            c["symlinks"] += 1
        elif stat.S_ISDIR(st.st_mode):
            c["dirs"] += 1
        else:
            c["files"] += 1
            c["bytes"] += st.st_size
    return c


def spaced(items: list[str], n: int) -> list[str]:
    """n items spread evenly over a sorted list: deterministic and not clustered in one dir."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _samples(tree: Path, profile: Profile) -> dict[str, list[str]]:
    """Which lower files and directories the mutating workloads touch (disjoint sets)."""
    small: list[str] = []
    leaf_dirs: list[str] = []
    for rel, st in _walk(tree):
        if rel.startswith(BENCH_DIR):
            continue
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(tree / rel) as it:
                kids = list(it)
            if 3 <= len(kids) <= 20 and all(k.is_file(follow_symlinks=False) for k in kids):
                leaf_dirs.append(rel)
        elif stat.S_ISREG(st.st_mode) and st.st_size <= 64 * 1024 and st.st_nlink == 1:
            small.append(rel)
    small.sort()
    storm = spaced(small, profile.storm_files)
    chosen = set(storm)
    rest = [s for s in small if s not in chosen]
    rename_files = spaced(rest, profile.rename_lower_files)
    # A renamed directory must not hold a file another workload touches; none do (they are
    # disjoint runs) but keep the directory set away from the file sets all the same.
    used_dirs = {f.rsplit("/", 1)[0] for f in storm + rename_files}
    dirs = sorted(d for d in leaf_dirs if d not in used_dirs)
    return {
        "storm": storm,
        "rename_files": rename_files,
        "rename_dirs": spaced(dirs, profile.rename_lower_dirs),
    }


def _pick_subtree(tree: Path, target: int) -> tuple[str, int]:
    """The directory (outside bench/) whose file count is closest to target, for the untar test."""
    counts: dict[str, int] = {}
    for rel, st in _walk(tree):
        if rel.startswith(BENCH_DIR) or stat.S_ISDIR(st.st_mode):
            continue
        parts = rel.split("/")[:-1]
        for depth in range(1, min(len(parts), 5) + 1):
            key = "/".join(parts[:depth])
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise BenchError("the tree has no files")
    best = min(sorted(counts), key=lambda d: abs(counts[d] - target))
    return best, counts[best]
