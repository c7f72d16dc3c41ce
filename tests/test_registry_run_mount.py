"""`cowfs mount` and `cowfs run` pull an image that is not in the store, as docker run does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cowfs.errors import NotFound, TransferError
from cowfs.registry.push import push
from cowfs.store import Store
from tests.conftest import need_fuse
from tests.registry_fixtures import (
    Registry,
    isolate_credentials,
    registry_fixture,  # noqa: F401 - the fixture registry
)

COWFS = [sys.executable, "-c", "from cowfs.cli import main; main()"]


def _publish_busybox(busybox_image: tuple[Path, str], reg: Registry) -> str:
    root, ref = busybox_image
    push(Store(root), ref, f"{reg.host}/busybox:v1")
    return f"{reg.host}/busybox:v1"


def test_mount_pulls_missing_image(
    busybox_image: tuple[Path, str], registry: Registry, tmp_path: Path
) -> None:
    need_fuse()
    ref = _publish_busybox(busybox_image, registry)
    root = tmp_path / "fresh"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        [*COWFS, "--root", str(root), "mount", ref, str(mnt), "--read-only"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        assert f"Unable to find image '{ref}' locally" in proc.stderr
        assert (mnt / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    finally:
        subprocess.run([*COWFS, "--root", str(root), "umount", str(mnt)], capture_output=True)
    assert Store(root).resolve(ref).layers == Store(busybox_image[0]).resolve("busybox").layers
    # Mounting again finds it locally: no registry needed.
    subprocess.run(["kill", str(registry.pid)], check=True)
    proc = subprocess.run(
        [*COWFS, "--root", str(root), "mount", ref, str(mnt), "--read-only"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        assert "Unable to find" not in proc.stderr
    finally:
        subprocess.run([*COWFS, "--root", str(root), "umount", str(mnt)], capture_output=True)


def test_run_pulls_missing_image(
    busybox_image: tuple[Path, str], registry: Registry, tmp_path: Path
) -> None:
    need_fuse()
    ref = _publish_busybox(busybox_image, registry)
    root = tmp_path / "fresh"
    try:
        proc = subprocess.run(
            [*COWFS, "--root", str(root), "run", "--rm", ref, "echo", "pulled-and-ran"],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "pulled-and-ran\n"
    finally:
        from runtime.container import Runtime

        rt = Runtime(Store(root))
        for state in rt.states():
            rt.remove(state.id, force=True)


def test_image_for_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare name Docker Hub cannot give (offline, or unknown there) is 'not found'; a registry
    named explicitly reports its own error."""
    from cowfs.cli.registry import image_for
    from cowfs.registry import client

    monkeypatch.setattr(client, "BACKOFF", 0.0)
    isolate_credentials(monkeypatch, tmp_path / "home")
    store = Store(tmp_path / "store")
    with pytest.raises(NotFound, match=r"^image cowfs-no-such-image-zz:none not found$"):
        image_for(store, "cowfs-no-such-image-zz:none")
    with pytest.raises(TransferError, match="cannot reach 127.0.0.1:9"):
        image_for(store, "127.0.0.1:9/app:v1")
    assert store.image_ids() == [] and list(store.tmp.iterdir()) == []
