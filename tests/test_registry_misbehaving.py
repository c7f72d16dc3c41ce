"""A registry that lies or fails: every case is one clear error, and the store keeps nothing
half-written (layers, images, tags and tmp/ as they were)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.errors import AuthError, CowfsError, DigestMismatch, InvalidInput, RegistryError
from cowfs.registry import client
from cowfs.registry import manifest as mf
from cowfs.registry.pull import pull
from cowfs.store import Store
from tests.registry_fixtures import (
    FakeRegistry,
    Layer,
    OciImage,
    Stall,
    fake_registry,
    isolate_credentials,
    sha,
)

COWFS = [sys.executable, "-c", "from cowfs.cli import main; main()"]


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries happen at once here: these tests count attempts, not seconds."""
    monkeypatch.setattr(client, "BACKOFF", 0.0)


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    with fake_registry() as reg:
        yield reg


def image() -> OciImage:
    return OciImage(
        [Layer({"a": b"first layer\n" * 100}), Layer({"b": b"second layer\n" * 100})]
    ).build()


def state(store: Store) -> tuple:
    return store.image_ids(), store.tags(), sorted(p.name for p in store.tmp.iterdir())


def only_complete_layers(store: Store, img: OciImage) -> None:
    """Layers imported before the failure are whole and good ones: kept for the retry."""
    good = {sha(layer.tar) for layer in img.layers}
    for layer_id in store.layers():
        store.load_toc(layer_id)
        assert store.layer_meta(layer_id).diff_id in good


def flip(data: bytes) -> bytes:
    """The same length, one bit different."""
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1 :]


def manifest_with(img: OciImage, **changes) -> bytes:
    doc = json.loads(img.manifest)
    for i, size in changes.get("layer_sizes", {}).items():
        doc["layers"][i]["size"] = size
    if "config_size" in changes:
        doc["config"]["size"] = changes["config_size"]
    return json.dumps(doc).encode()


def pull_fails(
    fake: FakeRegistry,
    store: Store,
    exc: type[CowfsError],
    match: str,
    ref: str = "app:v1",
    img: OciImage | None = None,
) -> CowfsError:
    before, layers_before = state(store), store.layers()
    with pytest.raises(exc, match=match) as info:
        pull(store, f"{fake.host}/{ref}")
    assert "\n" not in info.value.message
    assert state(store) == before
    if img is not None:
        only_complete_layers(store, img)
    else:
        assert store.layers() == layers_before
    return info.value


def test_wrong_digest(fake: FakeRegistry, tmp_path: Path) -> None:
    img = image()
    fake.serve_image("app", "v1", img)
    blob = img.layers[1].blob
    fake.routes[("GET", f"/v2/app/blobs/{sha(blob)}")] = (200, {}, flip(blob))
    pull_fails(fake, Store(tmp_path / "s"), DigestMismatch, r"blob sha256:\w+ has digest", img=img)


def test_truncated_blob(fake: FakeRegistry, tmp_path: Path) -> None:
    img = image()
    fake.serve_image("app", "v1", img)
    blob = img.layers[0].blob
    headers = {"Content-Length": str(len(blob)), "Connection": "close"}
    fake.routes[("GET", f"/v2/app/blobs/{sha(blob)}")] = (200, headers, blob[: len(blob) // 2])
    pull_fails(fake, Store(tmp_path / "s"), RegistryError, "truncated: got .* of", img=img)


def test_missing_blob_and_manifest(fake: FakeRegistry, tmp_path: Path) -> None:
    img = image()
    fake.serve_image("app", "v1", img)
    del fake.routes[("GET", f"/v2/app/blobs/{sha(img.layers[1].blob)}")]
    store = Store(tmp_path / "s")
    err = pull_fails(fake, store, RegistryError, "HTTP 404", img=img)
    assert "blob sha256:" in err.message
    pull_fails(fake, store, RegistryError, "manifest app:v2: HTTP 404", ref="app:v2")


def test_unauthorized_without_credentials(
    fake: FakeRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_credentials(monkeypatch, tmp_path / "none")
    fake.routes[("GET", "/v2/")] = (401, {"WWW-Authenticate": 'Basic realm="x"'}, b"")
    pull_fails(fake, Store(tmp_path / "s"), AuthError, "no credentials found")
    fake.routes[("GET", "/v2/")] = (401, {}, b"")
    pull_fails(fake, Store(tmp_path / "s2"), AuthError, "no authentication challenge")


def test_manifest_lying_about_sizes(fake: FakeRegistry, tmp_path: Path) -> None:
    img = image()
    fake.serve_image("app", "v1", img)
    store = Store(tmp_path / "s")
    real = len(img.layers[0].blob)
    for size in (real - 10, real + 10):
        lie = manifest_with(img, layer_sizes={0: size})
        fake.routes[("GET", "/v2/app/manifests/v1")] = (200, {"Content-Type": mf.OCI_MANIFEST}, lie)
        pull_fails(
            fake, store, DigestMismatch, f"is {real} bytes, the manifest says {size}", img=img
        )

    # Without a Content-Length (the body ends at close) the stream itself is measured.
    lie = manifest_with(img, layer_sizes={0: real - 10})
    fake.routes[("GET", "/v2/app/manifests/v1")] = (200, {"Content-Type": mf.OCI_MANIFEST}, lie)
    no_length = {"Content-Length": "", "Connection": "close"}
    blob = img.layers[0].blob
    fake.routes[("GET", f"/v2/app/blobs/{sha(blob)}")] = (200, no_length, blob)
    pull_fails(fake, store, DigestMismatch, f"larger than the {real - 10} bytes", img=img)
    fake.routes[("GET", "/v2/app/manifests/v1")] = (
        200,
        {"Content-Type": mf.OCI_MANIFEST},
        manifest_with(img, config_size=3),
    )
    pull_fails(fake, store, DigestMismatch, "the manifest says 3")


def test_manifest_digest_checked(fake: FakeRegistry, tmp_path: Path) -> None:
    img = image()
    fake.serve_image("app", "v1", img)
    other = "sha256:" + "1" * 64
    fake.routes[("GET", f"/v2/app/manifests/{other}")] = (
        200,
        {"Content-Type": mf.OCI_MANIFEST},
        img.manifest,
    )
    store = Store(tmp_path / "s")
    pull_fails(
        fake, store, DigestMismatch, "manifest sha256:111111111111 has digest", ref=f"app@{other}"
    )
    headers = {"Content-Type": mf.OCI_MANIFEST, "Docker-Content-Digest": other}
    fake.routes[("GET", "/v2/app/manifests/v1")] = (200, headers, img.manifest)
    pull_fails(fake, store, DigestMismatch, "differs from the registry's")


def test_config_diff_id_lie(fake: FakeRegistry, tmp_path: Path) -> None:
    img = OciImage([Layer({"x": b"x"})], extra={}).build()
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"] = ["sha256:" + "2" * 64]
    img.config = json.dumps(cfg).encode()
    doc = json.loads(img.manifest)
    doc["config"].update(digest=sha(img.config), size=len(img.config))
    img.manifest = json.dumps(doc).encode()
    fake.serve_image("app", "v1", img)
    pull_fails(fake, Store(tmp_path / "s"), DigestMismatch, "diff_id")


def test_garbage_layer_with_right_digest(fake: FakeRegistry, tmp_path: Path) -> None:
    img = image()
    img.layers[1].blob = b"\x1f\x8b not really gzip" * 10
    img.build()  # the manifest now names the garbage by its true digest
    fake.serve_image("app", "v1", img)
    pull_fails(fake, Store(tmp_path / "s"), InvalidInput, "damaged or truncated", img=img)


def test_schema1_and_unknown_media_types(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.routes[("GET", "/v2/app/manifests/v1")] = (
        200,
        {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
        b'{"schemaVersion": 1}',
    )
    store = Store(tmp_path / "s")
    pull_fails(fake, store, RegistryError, "schema 1 manifests are not supported")
    img = image()
    doc = json.loads(img.manifest)
    doc["layers"][0]["mediaType"] = "application/x-mystery"
    fake.routes[("GET", "/v2/app/manifests/v1")] = (
        200,
        {"Content-Type": mf.OCI_MANIFEST},
        json.dumps(doc).encode(),
    )
    pull_fails(fake, store, RegistryError, "unsupported type application/x-mystery")


def test_interrupted_pull_keeps_complete_layers_and_retry_completes(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    img = image()
    fake.serve_image("app", "v1", img)
    good = fake.routes[("GET", f"/v2/app/blobs/{sha(img.layers[1].blob)}")]
    fake.routes[("GET", f"/v2/app/blobs/{sha(img.layers[1].blob)}")] = (500, {}, b"boom")
    store = Store(tmp_path / "s")
    with pytest.raises(RegistryError, match="HTTP 500"):
        pull(store, f"{fake.host}/app:v1", jobs=1)  # one at a time: the first layer completes
    assert len(store.layers()) == 1  # the first layer is complete and kept
    assert (store.image_ids(), store.tags(), list(store.tmp.iterdir())) == ([], {}, [])
    fake.routes[("GET", f"/v2/app/blobs/{sha(img.layers[1].blob)}")] = good
    fake.log.clear()
    res = pull(store, f"{fake.host}/app:v1")
    assert (res.layers, res.downloaded) == (2, 1)
    blob_gets = [p for m, p, _ in fake.log if m == "GET" and "/blobs/" in p]
    assert sha(img.layers[0].blob) not in " ".join(blob_gets)
    assert store.tags() == {f"{fake.host}/app:v1": res.image_id}


def test_cli_error_is_one_line(fake: FakeRegistry, tmp_path: Path) -> None:
    img = image()
    fake.serve_image("app", "v1", img)
    blob = img.layers[0].blob
    fake.routes[("GET", f"/v2/app/blobs/{sha(blob)}")] = (200, {}, blob[::-1])
    proc = subprocess.run(
        [*COWFS, "--root", str(tmp_path / "s"), "pull", f"{fake.host}/app:v1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == DigestMismatch.exit_code
    assert proc.stderr.startswith("Error: blob sha256:") and proc.stderr.count("\n") == 1


def test_broken_download_resumes_with_range(fake: FakeRegistry, tmp_path: Path) -> None:
    img = image()
    fake.serve_image("app", "v1", img)
    blob = img.layers[0].blob
    half = len(blob) // 2
    calls: list[str | None] = []

    def flaky(h) -> tuple[int, dict[str, str], bytes]:
        calls.append(h.headers.get("Range"))
        if len(calls) == 1:  # cut off half-way
            return 200, {"Content-Length": str(len(blob)), "Connection": "close"}, blob[:half]
        if len(calls) == 2:  # a passing hiccup
            return 503, {}, b"try later"
        start = int(h.headers["Range"].removeprefix("bytes=").rstrip("-"))
        headers = {"Content-Range": f"bytes {start}-{len(blob) - 1}/{len(blob)}"}
        return 206, headers, blob[start:]

    fake.routes[("GET", f"/v2/app/blobs/{sha(blob)}")] = flaky
    store = Store(tmp_path / "s")
    res = pull(store, f"{fake.host}/app:v1")
    assert calls == [None, f"bytes={half}-", f"bytes={half}-"]
    assert res.downloaded == 2 and list(store.tmp.iterdir()) == []


def _ctrl_c_pull(fake: FakeRegistry, root: Path, ready: threading.Event) -> tuple[int, str]:
    """Run `cowfs pull` of app:v1, send it SIGINT once `ready` is set; (exit code, stderr)."""
    proc = subprocess.Popen(
        [*COWFS, "--root", str(root), "pull", f"{fake.host}/app:v1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert ready.wait(60)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # a safety net, not a speed check
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_during_a_stalled_download(fake: FakeRegistry, tmp_path: Path) -> None:
    """SIGINT while a blob hangs mid-transfer: the CLI stops now, exit 130, nothing left."""
    img = image()
    fake.serve_image("app", "v1", img)
    blob = img.layers[0].blob
    started, release = threading.Event(), threading.Event()

    def stall(h) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(blob)))
        h.end_headers()
        h.wfile.write(blob[:10])
        h.wfile.flush()
        started.set()
        release.wait(60)  # until the test is over
        h.close_connection = True

    fake.routes[("GET", f"/v2/app/blobs/{sha(blob)}")] = stall
    root = tmp_path / "s"
    try:
        code, err = _ctrl_c_pull(fake, root, started)
    finally:
        release.set()
    assert code == 130, err
    store = Store(root)
    assert state(store) == ([], {}, [])
    only_complete_layers(store, img)


def test_ctrl_c_while_a_download_is_still_connecting(fake: FakeRegistry, tmp_path: Path) -> None:
    """SIGINT while a worker is still setting up its connection (the blob's CDN takes the TCP
    connection but never answers the TLS handshake): the abort reaches that socket too, so the
    CLI stops now, exit 130, one line on stderr, nothing left."""
    img = image()
    fake.serve_image("app", "v1", img)
    cdn = socket.create_server(("127.0.0.1", 0))
    cdn.settimeout(60)  # so that the thread below ends even if nobody comes
    in_handshake, release = threading.Event(), threading.Event()

    def silent_tls_server() -> None:
        try:
            conn, _ = cdn.accept()
        except OSError:
            return
        with conn:
            if conn.recv(1):  # the ClientHello: the client waits for our answer now
                in_handshake.set()
            release.wait(60)  # until the test is over

    server = threading.Thread(target=silent_tls_server, daemon=True)
    server.start()
    blob = img.layers[0].blob
    cdn_url = f"https://127.0.0.1:{cdn.getsockname()[1]}/blob"
    fake.routes[("GET", f"/v2/app/blobs/{sha(blob)}")] = (307, {"Location": cdn_url}, b"")
    root = tmp_path / "s"
    try:
        code, err = _ctrl_c_pull(fake, root, in_handshake)
    finally:
        release.set()
        server.join()
        cdn.close()
    assert code == 130, err
    assert err.strip() == "Aborted.", err
    store = Store(root)
    assert state(store) == ([], {}, [])
    only_complete_layers(store, img)


def test_ctrl_c_during_a_stalled_upload(fake: FakeRegistry, tmp_path: Path) -> None:
    """SIGINT while the registry stops reading an upload: exit 130 at once, no staging left."""
    from cowfs.rootfs import import_rootfs

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(16 << 20))  # more than the socket buffers hold
    root = tmp_path / "s"
    import_rootfs(Store(root), src, "big:v1")
    stall = Stall()
    fake.routes[("POST", "/v2/app/blobs/uploads/")] = (
        202,
        {"Location": "/v2/app/blobs/uploads/u1"},
        b"",
    )
    fake.routes[("PUT", "/v2/app/blobs/uploads/u1")] = stall
    proc = subprocess.Popen(
        [*COWFS, "--root", str(root), "push", "big:v1", f"{fake.host}/app:v1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert stall.started.wait(60)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # a safety net, not a speed check
    finally:
        stall.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert list(Store(root).tmp.iterdir()) == []
    assert not [p for m, p, _ in fake.log if "/manifests/" in p]
