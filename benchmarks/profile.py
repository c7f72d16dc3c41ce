"""Sizes of the data and workloads: the full suite and the quick one used by tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MiB = 1024 * 1024

# Debian packages added to the minbase rootfs so the tree reaches ~60k entries, the size of a
# development image (toolchain, Go sources, Boost headers, Python and Perl).
FULL_INCLUDES = (
    "python3",
    "perl",
    "golang-1.19-go",
    "libboost1.74-dev",
    "python3.11-doc",
    "linux-headers-amd64",
)


@dataclass(frozen=True)
class Profile:
    name: str
    debootstrap: bool  # build a Debian rootfs; otherwise a busybox + Python tree from the host
    tree_files: int  # files to copy from the host when there is no debootstrap rootfs
    seq_bytes: int  # sequential read/write file
    copyup_small: int
    copyup_big: int
    rand_io_bytes: int  # total bytes of 4 KiB random reads
    storm_files: int  # lower files appended to by the copy-up storm
    small_files: int  # files created then unlinked
    rename_new: int  # files created in the mount then renamed around
    rename_lower_files: int
    rename_lower_dirs: int
    untar_files: int  # size of the tree extracted by the untar workload
    container_runs: int  # `run … true` repetitions per sample
    runs: int  # default number of runs

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


FULL = Profile(
    name="full",
    debootstrap=True,
    tree_files=60_000,
    seq_bytes=512 * MiB,
    copyup_small=1 * MiB,
    copyup_big=256 * MiB,
    rand_io_bytes=64 * MiB,
    storm_files=5_000,
    small_files=10_000,
    rename_new=1_000,
    rename_lower_files=300,
    rename_lower_dirs=20,
    untar_files=2_000,
    container_runs=1,
    runs=3,
)

QUICK = Profile(
    name="quick",
    debootstrap=False,
    tree_files=400,
    seq_bytes=8 * MiB,
    copyup_small=1 * MiB,
    copyup_big=4 * MiB,
    rand_io_bytes=1 * MiB,
    storm_files=50,
    small_files=100,
    rename_new=50,
    rename_lower_files=20,
    rename_lower_dirs=3,
    untar_files=100,
    container_runs=1,
    runs=1,
)
