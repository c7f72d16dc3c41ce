"""Registry credentials and authentication: docker-style config.json, Basic and Bearer tokens.

Credentials come from `--authfile`, else the first of these files with an entry for the
registry: `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`), then the containers
auth.json of `skopeo login` and podman. An entry under `auths` gives `auth` (base64 of
user:password), `username`/`password` or an `identitytoken`; `credHelpers`/`credsStore` name a
`docker-credential-<helper>` program that is asked instead, as docker does.

Authentication follows the registry's WWW-Authenticate challenge: `Basic` sends the credentials
with every request; `Bearer realm=...,service=...,scope=...` fetches a token from the realm (with
the credentials as Basic auth, anonymously without them) and sends that. Tokens cover the scopes
asked so far (`repository:NAME:pull,push`); a new scope fetches a new token.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cowfs.errors import AuthError, InvalidInput

# Docker Hub's credentials are filed under its old v1 index address.
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token (docker login with a token service)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def config_paths(authfile: str | None = None) -> list[Path]:
    """The credential files to read, in order: `--authfile` alone when given; else docker's
    config.json ($DOCKER_CONFIG, else ~/.docker), then the containers auth.json that `skopeo
    login` and podman write ($REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers, ~/.config)."""
    if authfile:
        path = Path(authfile)
        if not path.is_file():
            raise InvalidInput(f"auth file {authfile} does not exist")
        return [path]
    env = os.environ.get
    candidates = [
        Path(env("DOCKER_CONFIG")) / "config.json"
        if env("DOCKER_CONFIG")
        else Path.home() / ".docker" / "config.json"
    ]
    if env("REGISTRY_AUTH_FILE"):
        candidates.append(Path(env("REGISTRY_AUTH_FILE")))
    if env("XDG_RUNTIME_DIR"):
        candidates.append(Path(env("XDG_RUNTIME_DIR")) / "containers" / "auth.json")
    candidates.append(Path.home() / ".config" / "containers" / "auth.json")
    return [p for p in candidates if p.is_file()]


def _host_of(key: str) -> str:
    """'https://host:5000/v1/' -> 'host:5000': config keys are written many ways."""
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc
    return key.split("/", 1)[0]


def lookup(registry: str, authfile: str | None = None) -> Credentials | None:
    """Credentials for `registry` (as in a reference: 'docker.io', 'localhost:5000'), or None.
    The first file with an entry for the registry wins."""
    for path in config_paths(authfile):
        creds = _lookup_in(path, registry)
        if creds is not None:
            return creds
    return None


def _lookup_in(path: Path, registry: str) -> Credentials | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read auth file {path}: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"auth file {path} is not a JSON object")
    names = _HUB_KEYS if registry in _HUB_KEYS else (registry,)
    helpers = config.get("credHelpers") or {}
    for name in names:
        if name in helpers:
            return _from_helper(helpers[name], name)
    for key, entry in (config.get("auths") or {}).items():
        if _host_of(key) in names or key in names:
            creds = _from_entry(entry, path)
            if creds is not None:
                return creds
    if config.get("credsStore"):
        return _from_helper(config["credsStore"], names[0], missing_ok=True)
    return None


def _from_entry(entry: object, path: Path) -> Credentials | None:
    if not isinstance(entry, dict):
        raise InvalidInput(f"auth file {path}: entries under 'auths' must be objects")
    if entry.get("identitytoken"):
        return Credentials(
            username=entry.get("username", ""), identity_token=entry["identitytoken"]
        )
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput(f"auth file {path}: 'auth' is not base64 of user:password") from None
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(entry["username"], entry.get("password", ""))
    return None


def _from_helper(helper: str, server: str, missing_ok: bool = False) -> Credentials | None:
    prog = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [prog, "get"], input=server, capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        if missing_ok:
            return None
        raise AuthError(f"credential helper {prog} is not installed") from None
    if proc.returncode != 0:
        # Helpers say "credentials not found in native keychain" for unknown servers.
        if missing_ok or "not found" in (proc.stdout + proc.stderr).lower():
            return None
        raise AuthError(f"credential helper {prog} failed: {proc.stderr.strip()[:200]}")
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise AuthError(f"credential helper {prog} printed no JSON") from None
    if data.get("Username") == "<token>":
        return Credentials(identity_token=data.get("Secret", ""))
    return Credentials(data.get("Username", ""), data.get("Secret", ""))


_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="x",service="y"' -> ('bearer', {'realm': 'x', 'service': 'y'})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


# (method, url, headers, form body or None) -> (status, body bytes)
Fetch = Callable[[str, str, dict[str, str], bytes | None], tuple[int, bytes]]


class Authenticator:
    """Holds one registry's credentials and current token; thread-safe."""

    def __init__(self, registry: str, credentials: Credentials | None) -> None:
        self.registry = registry
        self.credentials = credentials
        self._lock = threading.Lock()
        self._scopes: set[str] = set()
        self._header: str | None = None  # the Authorization header to send, once known
        self._token_scopes: frozenset[str] = frozenset()
        self._challenge: tuple[str, dict[str, str]] | None = None
        # A token fetched since the last 401 that no request has yet been served with: if it is
        # refused too, it is not stale, access is denied.
        self._unproven: str | None = None

    def add_scope(self, scope: str) -> None:
        with self._lock:
            self._scopes.add(scope)

    def header(self) -> str | None:
        with self._lock:
            return self._header

    def accepted(self, sent: str | None) -> None:
        """A request with this header was not refused: the token works."""
        if sent is not None and sent == self._unproven:
            with self._lock:
                if self._unproven == sent:
                    self._unproven = None

    def handle_challenge(
        self, www_authenticate: str | None, sent: str | None, fetch: Fetch
    ) -> None:
        """Answer a 401: set a header to retry with, or raise AuthError."""
        if not www_authenticate:
            raise AuthError(f"{self.registry}: unauthorized and no authentication challenge given")
        scheme, params = parse_challenge(www_authenticate)
        with self._lock:
            if self._header is not None and self._header != sent:
                return  # another thread already got a fresh header: retry with it
            self._challenge = (scheme, params)
            if scheme == "basic":
                if self.credentials is None or not self.credentials.username:
                    raise AuthError(self._no_credentials())
                header = self.credentials.basic()
                if sent == header:
                    raise AuthError(f"{self.registry}: username or password rejected")
                self._header = header
            elif scheme == "bearer":
                scopes = set(self._scopes)
                if params.get("scope"):
                    scopes.update(params["scope"].split(" "))
                covered = sent is not None and sent.startswith("Bearer ")
                covered = covered and self._token_scopes >= scopes
                denied = params.get("error") == "insufficient_scope" or sent == self._unproven
                if covered and denied:
                    # A good token for every scope we need was refused: no access. (A token
                    # that worked before and is refused now has expired: fetch another.)
                    if self.credentials is None:
                        raise AuthError(self._no_credentials())
                    raise AuthError(
                        f"{self.registry}: access denied for {' '.join(sorted(scopes))}"
                    )
                self._header = "Bearer " + self._fetch_token(params, scopes, fetch)
                self._token_scopes = frozenset(scopes)
                self._unproven = self._header
            else:
                raise AuthError(f"{self.registry}: unsupported authentication scheme {scheme!r}")

    def refresh_for_scopes(self, fetch: Fetch) -> None:
        """Get a token covering newly added scopes before a request needs it (Bearer only)."""
        with self._lock:
            if self._challenge is None or self._challenge[0] != "bearer":
                return
            if self._token_scopes >= self._scopes:
                return
            scopes = set(self._scopes) | set(self._token_scopes)
            self._header = "Bearer " + self._fetch_token(self._challenge[1], scopes, fetch)
            self._token_scopes = frozenset(scopes)

    def _no_credentials(self) -> str:
        return (
            f"{self.registry}: authentication required and no credentials found "
            "(docker login, $DOCKER_CONFIG/config.json or --authfile)"
        )

    def _fetch_token(self, params: dict[str, str], scopes: set[str], fetch: Fetch) -> str:
        realm = params.get("realm")
        if not realm:
            raise AuthError(f"{self.registry}: Bearer challenge without a realm")
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in sorted(scopes)]
        creds = self.credentials
        headers: dict[str, str] = {}
        if creds is not None and creds.identity_token:
            # OAuth2 refresh-token grant: how docker uses an identity token.
            form = urllib.parse.urlencode(
                [
                    ("grant_type", "refresh_token"),
                    ("refresh_token", creds.identity_token),
                    ("client_id", "cowfs"),
                    *query,
                ]
            ).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            status, body = fetch("POST", realm, headers, form)
        else:
            if creds is not None and creds.username:
                headers["Authorization"] = creds.basic()
            sep = "&" if "?" in realm else "?"
            url = realm + (sep + urllib.parse.urlencode(query) if query else "")
            status, body = fetch("GET", url, headers, None)
        if status in (401, 403):
            if creds is None:
                raise AuthError(self._no_credentials())
            raise AuthError(f"{self.registry}: token service refused the credentials ({status})")
        if status != 200:
            raise AuthError(f"{self.registry}: token service {realm} answered {status}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise AuthError(f"{self.registry}: token service {realm} gave no token")
        return token
