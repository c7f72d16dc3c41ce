"""Credentials, Basic and Bearer authentication, TLS: config.json parsing, Debian's
docker-registry with htpasswd and with a self-signed certificate, and a token service."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.errors import AuthError, InvalidInput, RegistryError
from cowfs.registry import auth
from cowfs.registry.pull import pull
from cowfs.registry.push import push
from cowfs.rootfs import import_rootfs
from cowfs.store import Store
from tests.registry_fixtures import (
    Layer,
    OciImage,
    Registry,
    auth_registry_fixture,  # noqa: F401 - the fixture auth_registry
    fake_registry,
    isolate_credentials,
    registry_fixture,  # noqa: F401 - the fixture registry
    run_proxy,
    run_registry,
    run_token_service,
    sha,
    tls_registry_fixture,  # noqa: F401 - the fixture tls_registry
)

COWFS = [sys.executable, "-c", "from cowfs.cli import main; main()"]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$DOCKER_CONFIG pointing at an empty dir, $HOME and $XDG_RUNTIME_DIR elsewhere: no real
    credentials leak in."""
    isolate_credentials(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    (tmp_path / "docker").mkdir()
    return tmp_path / "docker" / "config.json"


# -- config.json --------------------------------------------------------------------------------


def test_lookup_forms(docker_config: Path) -> None:
    docker_config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpw")},
                    "http://myreg.example:5000/v2/": {"username": "u", "password": "p"},
                    "tok.example": {"identitytoken": "refresh-me"},
                    "empty.example": {},
                }
            }
        )
    )
    assert auth.lookup("docker.io") == auth.Credentials("hubuser", "hubpw")
    assert auth.lookup("myreg.example:5000") == auth.Credentials("u", "p")
    assert auth.lookup("tok.example") == auth.Credentials(identity_token="refresh-me")
    assert auth.lookup("empty.example") is None
    assert auth.lookup("other.example") is None


def test_authfile_wins_and_must_exist(docker_config: Path, tmp_path: Path) -> None:
    docker_config.write_text(json.dumps({"auths": {"r.example": {"auth": b64("a:1")}}}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"auths": {"r.example": {"auth": b64("b:2")}}}))
    assert auth.lookup("r.example", str(other)) == auth.Credentials("b", "2")
    with pytest.raises(InvalidInput, match="does not exist"):
        auth.lookup("r.example", str(tmp_path / "missing.json"))
    other.write_text("{not json")
    with pytest.raises(InvalidInput, match="cannot read auth file"):
        auth.lookup("r.example", str(other))


def test_home_docker_config_is_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(
        json.dumps({"auths": {"h.example": {"auth": b64("me:pw")}}})
    )
    assert auth.lookup("h.example") == auth.Credentials("me", "pw")


def test_parse_challenge() -> None:
    scheme, params = auth.parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }
    assert auth.parse_challenge('Basic realm="x y"') == ("basic", {"realm": "x y"})


# -- htpasswd (Basic) against the real registry -------------------------------------------------


def test_basic_auth_with_real_registry(
    auth_registry: Registry, tmp_path: Path, docker_config: Path
) -> None:
    reg = auth_registry
    store = Store(tmp_path / "store")
    import_rootfs(store, _tree(tmp_path / "src"), "src:v1")
    with pytest.raises(AuthError, match="no credentials found"):
        pull(store, f"{reg.host}/app:v1")
    bad = reg.authfile(tmp_path / "bad.json", password="wrong")
    with pytest.raises(AuthError, match="rejected"):
        pull(store, f"{reg.host}/app:v1", authfile=str(bad))
    good = reg.authfile(tmp_path / "good.json")
    push(store, "src:v1", f"{reg.host}/app:v1", authfile=str(good))
    # $DOCKER_CONFIG/config.json is read without --authfile.
    reg.authfile(docker_config)
    res = pull(Store(tmp_path / "fresh"), f"{reg.host}/app:v1")
    assert res.downloaded == 1

    # The CLI says it in one line, with a non-zero exit.
    docker_config.unlink()
    proc = subprocess.run(
        [*COWFS, "--root", str(tmp_path / "cli"), "pull", f"{reg.host}/app:v1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == AuthError.exit_code
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "authentication required" in proc.stderr


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("auth test\n")
    return root


# -- TLS with a self-signed certificate ---------------------------------------------------------


def test_tls_registry(
    tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = tls_registry
    assert reg.cert is not None
    store = Store(tmp_path / "store")
    import_rootfs(store, _tree(tmp_path / "src"), "src:v1")
    with pytest.raises(RegistryError, match="certificate not trusted.*--insecure"):
        push(store, "src:v1", f"{reg.host}/app:v1")
    push(store, "src:v1", f"{reg.host}/app:v1", insecure=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(reg.cert))
    res = pull(Store(tmp_path / "fresh"), f"{reg.host}/app:v1")
    assert res.downloaded == 1


# -- Bearer tokens (a token service in front of a fake registry) --------------------------------


@pytest.fixture
def bearer_registry() -> Iterator:
    """A registry that wants `Bearer good-token`, issued by /token to tester:pw for repo app."""
    with fake_registry() as fake:
        realm = f"http://{fake.host}/token"

        def challenge(scope: str = "") -> dict[str, str]:
            extra = f',scope="{scope}"' if scope else ""
            return {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"{extra}'}

        def token(h) -> tuple[int, dict[str, str], bytes]:
            if h.headers.get("Authorization") != "Basic " + b64("tester:pw"):
                return 401, {}, b'{"details":"bad credentials"}'
            return 200, {"Content-Type": "application/json"}, b'{"token": "good-token"}'

        def guarded(inner):
            def handle(h):
                if h.headers.get("Authorization") != "Bearer good-token":
                    return 401, challenge("repository:app:pull"), b""
                return inner(h) if callable(inner) else inner

            return handle

        fake.routes[("GET", "/token")] = token
        fake.routes[("GET", "/v2/")] = lambda h: (401, challenge(), b"")
        img = OciImage([Layer({"hello": b"bearer\n"})]).build()
        fake.serve_image("app", "v1", img)
        for key, route in list(fake.routes.items()):
            if key[1].startswith("/v2/app/"):
                fake.routes[key] = guarded(route)
        fake.image = img  # type: ignore[attr-defined]
        yield fake


def test_bearer_token_flow(bearer_registry, tmp_path: Path) -> None:
    cfg = tmp_path / "auth.json"
    cfg.write_text(json.dumps({"auths": {bearer_registry.host: {"auth": b64("tester:pw")}}}))
    store = Store(tmp_path / "store")
    res = pull(store, f"{bearer_registry.host}/app:v1", authfile=str(cfg))
    assert res.layers == 1
    token_calls = [p for m, p, _ in bearer_registry.log if p.startswith("/token")]
    assert token_calls and "scope=repository%3Aapp%3Apull" in token_calls[0]
    blob = sha(bearer_registry.image.layers[0].blob)
    assert ("GET", f"/v2/app/blobs/{blob}", "Bearer good-token") in bearer_registry.log


def test_bearer_without_credentials(bearer_registry, tmp_path: Path, docker_config: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(AuthError, match="no credentials found"):
        pull(store, f"{bearer_registry.host}/app:v1")
    cfg = tmp_path / "auth.json"
    cfg.write_text(json.dumps({"auths": {bearer_registry.host: {"auth": b64("tester:nope")}}}))
    with pytest.raises(AuthError, match="refused the credentials"):
        pull(store, f"{bearer_registry.host}/app:v1", authfile=str(cfg))
    assert store.tags() == {} and list(store.tmp.iterdir()) == []


# -- Bearer tokens against the real registry (token auth, JWTs from a test token service) -------


def test_bearer_with_real_registry(tmp_path: Path, docker_config: Path) -> None:
    with (
        run_token_service(tmp_path / "tokens") as tokens,
        run_registry(tmp_path / "registry", token=tokens) as reg,
    ):
        store = Store(tmp_path / "store")
        import_rootfs(store, _tree(tmp_path / "src"), "src:v1")
        with pytest.raises(AuthError, match="no credentials found"):
            push(store, "src:v1", f"{reg.host}/app:v1")
        docker_config.write_text(json.dumps({"auths": {reg.host: {"auth": b64("tester:pw")}}}))
        push(store, "src:v1", f"{reg.host}/app:v1")
        assert (None, ["repository:app:pull,push"]) in tokens.log  # the anonymous try
        assert ("tester", ["repository:app:pull,push"]) in tokens.log
        # A cross-repository mount needs pull on the source too: one token for both scopes.
        res = push(store, "src:v1", f"{reg.host}/other:v1")
        assert res.mounted == 1
        assert ("tester", ["repository:app:pull", "repository:other:pull,push"]) in tokens.log
        assert pull(Store(tmp_path / "fresh"), f"{reg.host}/other:v1").downloaded == 1
        docker_config.write_text(json.dumps({"auths": {reg.host: {"auth": b64("tester:bad")}}}))
        with pytest.raises(AuthError, match="refused the credentials"):
            pull(Store(tmp_path / "fresh2"), f"{reg.host}/other:v1")


def test_blob_redirect_to_cdn_drops_credentials(bearer_registry, tmp_path: Path) -> None:
    """Docker Hub answers blob GETs with a redirect to a CDN: it must not see the token."""
    cfg = tmp_path / "auth.json"
    cfg.write_text(json.dumps({"auths": {bearer_registry.host: {"auth": b64("tester:pw")}}}))
    layer = bearer_registry.image.layers[0].blob
    with fake_registry() as cdn:
        cdn.routes[("GET", "/cdn/layer")] = (200, {}, layer)
        path = f"/v2/app/blobs/{sha(layer)}"
        redirect = (307, {"Location": f"http://{cdn.host}/cdn/layer?sig=x"}, b"")
        guarded = bearer_registry.routes[("GET", path)]
        bearer_registry.routes[("GET", path)] = lambda h: (
            redirect if guarded(h)[0] == 200 else guarded(h)
        )
        res = pull(Store(tmp_path / "store"), f"{bearer_registry.host}/app:v1", authfile=str(cfg))
        assert res.downloaded == 1
        assert cdn.log == [("GET", "/cdn/layer?sig=x", None)]


def test_plain_http_only_when_allowed(tmp_path: Path) -> None:
    """HTTPS first; plain HTTP for localhost (docker's default) or with --insecure only."""
    from cowfs.registry.client import RegistryClient

    with fake_registry() as fake:
        with pytest.raises(RegistryError, match="cannot talk TLS.*plain HTTP needs --insecure"):
            RegistryClient(fake.host).base()
        assert RegistryClient(fake.host, insecure=True).base() == f"http://{fake.host}"
        assert RegistryClient(fake.host, allow_http=True).base() == f"http://{fake.host}"


def test_expired_token_is_renewed(tmp_path: Path) -> None:
    """A token that worked and is refused later has expired: fetch a new one, carry on."""
    img = OciImage([Layer({"a": b"1"}), Layer({"b": b"2"})]).build()
    issued: list[str] = []
    with fake_registry() as fake:
        realm = f"http://{fake.host}/token"

        def token(h) -> tuple[int, dict[str, str], bytes]:
            issued.append(f"tok-{len(issued) + 1}")
            return 200, {}, json.dumps({"access_token": issued[-1]}).encode()

        fake.routes[("GET", "/token")] = token
        fake.serve_image("app", "v1", img)
        served = 0

        def guarded(inner):
            def handle(h):
                nonlocal served
                # tok-1 expires after two requests; later tokens keep working
                ok = h.headers.get("Authorization") == f"Bearer {issued[-1]}" if issued else False
                if ok and issued[-1] == "tok-1" and served >= 2:
                    ok = False
                if not ok:
                    www = f'Bearer realm="{realm}",service="s",error="invalid_token"'
                    return 401, {"WWW-Authenticate": www}, b""
                served += 1
                return inner

            return handle

        for key in [k for k in fake.routes if k[1].startswith("/v2/app/")]:
            fake.routes[key] = guarded(fake.routes[key])
        res = pull(Store(tmp_path / "store"), f"{fake.host}/app:v1", jobs=1)
        assert res.downloaded == 2
        assert issued == ["tok-1", "tok-2"]


def test_credential_helpers(
    docker_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    helper.write_text(
        "#!/bin/sh\nread host\n"
        'if [ "$host" = "helped.example" ]; then\n'
        '  echo \'{"ServerURL": "helped.example", "Username": "hu", "Secret": "hs"}\'\n'
        "else echo 'credentials not found in native keychain'; exit 1; fi\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    docker_config.write_text(json.dumps({"credHelpers": {"helped.example": "fake"}}))
    assert auth.lookup("helped.example") == auth.Credentials("hu", "hs")
    assert auth.lookup("other.example") is None
    docker_config.write_text(json.dumps({"credsStore": "fake"}))
    assert auth.lookup("helped.example") == auth.Credentials("hu", "hs")
    assert auth.lookup("other.example") is None
    docker_config.write_text(json.dumps({"credHelpers": {"x.example": "missing"}}))
    with pytest.raises(AuthError, match="docker-credential-missing is not installed"):
        auth.lookup("x.example")


def test_identity_token_uses_refresh_grant(tmp_path: Path) -> None:
    img = OciImage([Layer({"a": b"1"})]).build()
    forms: list[dict] = []
    with fake_registry() as fake:
        realm = f"http://{fake.host}/token"

        def token(h) -> tuple[int, dict[str, str], bytes]:
            forms.append(urllib.parse.parse_qs(h.body.decode()))
            return 200, {}, b'{"access_token": "from-refresh"}'

        def challenge(h):
            if h.headers.get("Authorization") == "Bearer from-refresh":
                return 200, {}, b"{}"
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="svc"'}, b""

        fake.routes[("POST", "/token")] = token
        fake.routes[("GET", "/v2/")] = challenge
        fake.serve_image("app", "v1", img)
        cfg = tmp_path / "auth.json"
        cfg.write_text(json.dumps({"auths": {fake.host: {"identitytoken": "rt-123"}}}))
        pull(Store(tmp_path / "store"), f"{fake.host}/app:v1", authfile=str(cfg))
    assert forms[0]["grant_type"] == ["refresh_token"]
    assert forms[0]["refresh_token"] == ["rt-123"]
    assert forms[0]["service"] == ["svc"]
    assert forms[0]["scope"] == ["repository:app:pull"]


def test_skopeo_login_credentials_are_used(
    auth_registry: Registry, tmp_path: Path, docker_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`skopeo login` writes the containers auth.json: cowfs reads it after docker's config."""
    reg = auth_registry
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "containers-auth.json"))
    subprocess.run(
        ["skopeo", "login", "--tls-verify=false", "-u", reg.user, "--password-stdin", reg.host],
        input=reg.password,
        text=True,
        check=True,
        capture_output=True,
    )
    docker_config.write_text(json.dumps({"auths": {"elsewhere.example": {"auth": b64("a:b")}}}))
    store = Store(tmp_path / "store")
    import_rootfs(store, _tree(tmp_path / "src"), "src:v1")
    assert push(store, "src:v1", f"{reg.host}/app:v1").uploaded == 1


# -- proxies ------------------------------------------------------------------------------------


def test_through_proxies(
    registry: Registry, tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$https_proxy tunnels with CONNECT, $http_proxy gets absolute URLs, $no_proxy exempts."""
    for var in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    store = Store(tmp_path / "store")
    import_rootfs(store, _tree(tmp_path / "src"), "src:v1")
    with run_proxy() as proxy:
        monkeypatch.setenv("https_proxy", proxy.url)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.cert))
        push(store, "src:v1", f"{tls_registry.host}/app:v1")
        assert ("CONNECT", tls_registry.host) in proxy.log
        monkeypatch.delenv("https_proxy")

        monkeypatch.setenv("http_proxy", proxy.url)
        push(store, "src:v1", f"{registry.host}/app:v1")
        assert ("GET", f"http://{registry.host}/v2/") in proxy.log
        assert pull(Store(tmp_path / "fresh"), f"{registry.host}/app:v1").downloaded == 1

        proxy.log.clear()
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        push(store, "src:v1", f"{registry.host}/app:v2")
        assert proxy.log == []
