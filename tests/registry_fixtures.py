"""Registries for the registry tests: Debian's docker-registry (plain, TLS, htpasswd) and a tiny
misbehaving one, plus hand-built OCI images to put into them with skopeo.

docker-registry 2.8 supports TLS (http.tls) and htpasswd basic auth (bcrypt entries only; the
crypt module's $2b$ is what it reads). It runs on 127.0.0.1 on a free port with its storage in the
test's tmp dir and is always stopped by its pid.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import io
import json
import os
import socket
import socketserver
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import need_tool

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    root: Path  # its storage
    pid: int
    cert: Path | None = None  # the self-signed certificate (TLS variant)
    user: str | None = None  # htpasswd variant
    password: str | None = None

    def authfile(self, path: Path, password: str | None = None) -> Path:
        """A docker-style config.json holding this registry's credentials."""
        pw = self.password if password is None else password
        token = base64.b64encode(f"{self.user}:{pw}".encode()).decode()
        path.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        return path


def _self_signed(dir: Path) -> tuple[Path, Path]:
    need_tool("openssl")
    cert, key = dir / "cert.pem", dir / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _bcrypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # deprecated, but the only bcrypt in the standard library (via libxcrypt)

        return crypt.crypt(
            password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)
        )  # cost 4: fast tests


@contextlib.contextmanager
def run_registry(
    base: Path, *, tls: bool = False, htpasswd: bool = False, token: TokenService | None = None
) -> Iterator[Registry]:
    need_tool(REGISTRY_BIN, "skopeo")
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    host = f"127.0.0.1:{port}"
    lines = [
        "version: 0.1",
        "log: {level: error, accesslog: {disabled: true}}",
        f"storage: {{filesystem: {{rootdirectory: {base / 'data'}}}, delete: {{enabled: true}}}}",
        "http:",
        f"  addr: {host}",
    ]
    reg = Registry(host, base / "data", 0)
    if tls:
        reg.cert, key = _self_signed(base)
        lines.append(f"  tls: {{certificate: {reg.cert}, key: {key}}}")
    if htpasswd:
        reg.user, reg.password = "tester", "s3cret-pw"
        (base / "htpasswd").write_text(f"{reg.user}:{_bcrypt(reg.password)}\n")
        lines.append(f"auth: {{htpasswd: {{realm: cowfs-test, path: {base / 'htpasswd'}}}}}")
    if token:
        lines.append(
            f"auth: {{token: {{realm: '{token.realm}', service: {token.service}, "
            f"issuer: {token.issuer}, rootcertbundle: {token.cert}}}}}"
        )
    (base / "config.yml").write_text("\n".join(lines) + "\n")
    log = open(base / "registry.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(base / "config.yml")], stdout=log, stderr=subprocess.STDOUT
    )
    reg.pid = proc.pid
    try:
        _wait_ready(proc, reg, base / "registry.log")
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def isolate_credentials(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point every place cowfs reads credentials from at an empty `home`."""
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home / "run"))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)


@pytest.fixture(name="registry")
def registry_fixture(tmp_path: Path) -> Iterator[Registry]:
    """docker-registry over plain HTTP on 127.0.0.1. Import `registry_fixture` into a test
    module to use the fixture `registry` (likewise tls_registry, auth_registry)."""
    with run_registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture(name="tls_registry")
def tls_registry_fixture(tmp_path: Path) -> Iterator[Registry]:
    """docker-registry over HTTPS with a self-signed certificate (reg.cert)."""
    with run_registry(tmp_path / "tls-registry", tls=True) as reg:
        yield reg


@pytest.fixture(name="auth_registry")
def auth_registry_fixture(tmp_path: Path) -> Iterator[Registry]:
    """docker-registry wanting htpasswd basic auth (reg.user, reg.password, reg.authfile())."""
    with run_registry(tmp_path / "auth-registry", htpasswd=True) as reg:
        yield reg


def _wait_ready(proc: subprocess.Popen, reg: Registry, log: Path) -> None:
    scheme = "https" if reg.cert else "http"
    ctx = ssl.create_default_context(cafile=str(reg.cert)) if reg.cert else None
    for _ in range(200):  # readiness, not a timing assertion
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{scheme}://{reg.host}/v2/", timeout=2, context=ctx)
            return
        except urllib.error.HTTPError:
            return  # 401: up, and asking for credentials
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not come up: {log.read_text()[-2000:]}")


# -- an HTTP proxy (CONNECT tunnels and absolute-form requests) --------------------------------


@dataclass
class Proxy:
    url: str  # "http://127.0.0.1:PORT"
    log: list[tuple[str, str]]  # (method, target) of the first request on each connection


@contextlib.contextmanager
def run_proxy() -> Iterator[Proxy]:
    """A forwarding proxy: CONNECT host:port opens a tunnel; an absolute-form request
    (GET http://host/...) is passed on as it is (registries accept absolute-form too)."""
    log: list[tuple[str, str]] = []

    class H(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            client = self.request
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            method, target = head.split(b"\r\n", 1)[0].decode().split(" ")[:2]
            log.append((method, target))
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = head.split(b"\r\n\r\n", 1)[1]
            else:
                netloc = urllib.parse.urlsplit(target).netloc
                host, _, port = netloc.partition(":")
                port = port or "80"
                first = head
            with socket.create_connection((host, int(port))) as upstream:
                if first:
                    upstream.sendall(first)
                _pipe(client, upstream)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Proxy(f"http://127.0.0.1:{server.server_address[1]}", log)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until one side closes."""
    import select

    while True:
        ready, _, _ = select.select([a, b], [], [], 30)
        if not ready:
            return
        for s in ready:
            data = s.recv(65536)
            if not data:
                return
            (b if s is a else a).sendall(data)


# -- a token service (Bearer auth) for docker-registry --------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    """Issues JWTs signed (RS256, by openssl) with a self-signed key the registry trusts. The user
    `tester` with password `pw` gets what it asks for; anyone else gets no access at all."""

    realm: str
    cert: Path
    key: Path
    service: str = "cowfs-registry"
    issuer: str = "cowfs-token-issuer"
    log: list[tuple[str | None, list[str]]] = field(default_factory=list)  # (user, scopes)

    def issue(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if user == "tester" and kind == "repository":
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "iat": now,
            "nbf": now - 60,
            "exp": now + 600,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return signing_input + "." + _b64url(sig)


@contextlib.contextmanager
def run_token_service(base: Path) -> Iterator[TokenService]:
    base.mkdir(parents=True, exist_ok=True)
    cert, key = _self_signed(base)
    svc: TokenService

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            user = None
            authz = self.headers.get("Authorization", "")
            if authz.startswith("Basic "):
                name, _, pw = base64.b64decode(authz[6:]).decode().partition(":")
                if (name, pw) != ("tester", "pw"):
                    self._answer(401, b'{"details": "bad credentials"}')
                    return
                user = name
            scopes = [s for v in query.get("scope", []) for s in v.split(" ")]
            svc.log.append((user, scopes))
            self._answer(200, json.dumps({"token": svc.issue(user, scopes)}).encode())

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    svc = TokenService(f"http://127.0.0.1:{server.server_address[1]}/token", cert, key)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield svc
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- images built by hand -----------------------------------------------------------------------


@dataclass
class Layer:
    """Files of one tar layer: path -> bytes (a file), None (a directory), or ("sym", target)."""

    files: dict[str, bytes | None | tuple[str, str]]
    compression: str = "gzip"
    tar: bytes = b""
    blob: bytes = b""

    def build(self) -> Layer:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path, content in self.files.items():
                info = tarfile.TarInfo(path)
                info.mtime = 1_700_000_000
                if content is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif isinstance(content, tuple):
                    info.type, info.linkname = tarfile.SYMTYPE, content[1]
                    tar.addfile(info)
                else:
                    info.size, info.mode = len(content), 0o644
                    tar.addfile(info, io.BytesIO(content))
        self.tar = raw.getvalue()
        if self.compression == "gzip":
            self.blob = gzip.compress(self.tar, mtime=0)
        else:
            self.blob = self.tar
        return self

    @property
    def media_type(self) -> str:
        base = "application/vnd.oci.image.layer.v1.tar"
        return base + "+gzip" if self.compression == "gzip" else base


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class OciImage:
    layers: list[Layer]
    arch: str = "amd64"
    config: bytes = b""
    manifest: bytes = b""
    extra: dict = field(default_factory=dict)

    def build(self) -> OciImage:
        for layer in self.layers:
            if not layer.blob:
                layer.build()
        cfg = {
            "architecture": self.arch,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(la.tar) for la in self.layers]},
            **self.extra,
        }
        self.config = json.dumps(cfg).encode()
        man = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(self.config),
                "size": len(self.config),
            },
            "layers": [
                {"mediaType": la.media_type, "digest": sha(la.blob), "size": len(la.blob)}
                for la in self.layers
            ],
        }
        self.manifest = json.dumps(man).encode()
        return self

    def write_layout(self, dir: Path, tag: str = "latest") -> Path:
        """An OCI image layout with this image as `tag` (what skopeo copies from)."""
        blobs = dir / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        for data in [self.config, self.manifest, *(la.blob for la in self.layers)]:
            (blobs / sha(data)[7:]).write_bytes(data)
        (dir / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": sha(self.manifest),
                    "size": len(self.manifest),
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }
            ],
        }
        (dir / "index.json").write_text(json.dumps(index))
        return dir


def skopeo_copy(src: str, dest: str, *extra: str) -> None:
    subprocess.run(
        ["skopeo", "copy", "--quiet", *extra, src, dest],
        check=True,
        capture_output=True,
        timeout=120,
    )


def skopeo_to_registry(layout: Path, reg: Registry, name: str, tag: str = "latest") -> None:
    skopeo_copy(f"oci:{layout}:{tag}", f"docker://{reg.host}/{name}", "--dest-tls-verify=false")


# -- a misbehaving registry -------------------------------------------------------------------

_NOT_FOUND = b'{"errors":[{"code":"NOT_FOUND","message":"nope"}]}'
Handler = Callable[[http.server.BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]


@dataclass
class FakeRegistry:
    """A registry that answers from a table: (method, path) -> handler or (status, headers,
    body). Every request is logged as (method, path, Authorization header)."""

    host: str
    routes: dict[tuple[str, str], Handler | tuple[int, dict[str, str], bytes]]
    log: list[tuple[str, str, str | None]]

    def serve_image(self, repo: str, tag: str, img: OciImage) -> None:
        ctype = "application/vnd.oci.image.manifest.v1+json"
        self.routes[("GET", f"/v2/{repo}/manifests/{tag}")] = (
            200,
            {"Content-Type": ctype},
            img.manifest,
        )
        self.routes[("GET", f"/v2/{repo}/blobs/{sha(img.config)}")] = (200, {}, img.config)
        for la in img.layers:
            self.routes[("GET", f"/v2/{repo}/blobs/{sha(la.blob)}")] = (200, {}, la.blob)


@dataclass
class Stall:
    """A route that hangs without reading the request body, until `release` is set."""

    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def fake_registry() -> Iterator[FakeRegistry]:
    routes: dict = {("GET", "/v2/"): (200, {}, b"{}")}
    log: list = []

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            path = self.path.split("?")[0]
            log.append((self.command, self.path, self.headers.get("Authorization")))
            route = routes.get((self.command, path))
            if isinstance(route, Stall):
                route.started.set()  # the body is left unread: the client's send blocks
                route.release.wait(60)
                self.close_connection = True
                return
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""
            if route is None and self.command == "HEAD":
                route = routes.get(("GET", path))
            if route is None:
                status, headers, body = 404, {}, _NOT_FOUND
            elif callable(route):
                answer = route(self)
                if answer is None:  # the route wrote its own answer
                    return
                status, headers, body = answer
            else:
                status, headers, body = route
            self.send_response(status)
            for k, v in headers.items():
                if v:  # an empty value leaves the header out
                    self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
                if headers.get("Connection") == "close":
                    self.wfile.flush()
                    self.close_connection = True

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield FakeRegistry(f"127.0.0.1:{server.server_address[1]}", routes, log)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
