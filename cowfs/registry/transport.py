"""HTTP transport for the registry client: per-thread keep-alive connections to any host
(registry, token service, blob CDN), TLS contexts and proxies.

Connections are per thread so that a small pool of threads can download layers in parallel
over http.client, which is not thread-safe. $https_proxy (CONNECT tunnels), $http_proxy
(absolute-form requests) and $no_proxy are honoured as curl and docker do.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import threading
import urllib.parse
import urllib.request
import weakref
from typing import BinaryIO

from cowfs.errors import RegistryError

CHUNK = 1 << 20  # read and send in blocks of this size (http.client's default 8 KiB is slow)


class Response:
    """One HTTP response; closing it early drops its connection (leftover bytes would poison it)."""

    def __init__(
        self,
        transport: Transport,
        key: tuple[str, str],
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
    ) -> None:
        self._transport = transport
        self._key = key
        self._conn = conn
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers

    def read(self, n: int = -1) -> bytes:
        return self._resp.read(n) if n >= 0 else self._resp.read()

    def read_limited(self, limit: int) -> bytes:
        """The body, refusing one longer than `limit` (a manifest, an error, a token)."""
        data = self._resp.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise RegistryError(f"response to {self._resp_url()} is larger than {limit} bytes")
        return data

    def _resp_url(self) -> str:
        return f"{self._key[0]}://{self._key[1]}"

    def close(self) -> None:
        if not self._resp.isclosed():
            self._transport.drop(self._key)
        self._resp.close()


class Transport:
    """Per-thread keep-alive connections to any host (registry, token service, blob CDN)."""

    def __init__(self, *, insecure: bool = False, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.ssl_context = ssl.create_default_context()
        if insecure:
            self.ssl_context.check_hostname = False
            self.ssl_context.verify_mode = ssl.CERT_NONE
        self._local = threading.local()
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self.aborted = False

    def abort(self) -> None:
        """Break off every transfer in flight, in any thread, and refuse new ones: a thread
        blocked on a stalled socket would otherwise hold up Ctrl-C for the socket timeout."""
        with self._lock:
            self.aborted = True
            live = list(self._live)
        for conn in live:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _pool(self) -> dict[tuple[str, str], http.client.HTTPConnection]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def drop(self, key: tuple[str, str]) -> None:
        conn = self._pool().pop(key, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for key in list(self._pool()):
            self.drop(key)

    def _connect(self, parts: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        """A new connection, through $https_proxy/$http_proxy unless $no_proxy exempts the
        host: HTTPS tunnels with CONNECT, plain HTTP sends absolute URLs to the proxy."""
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"unsupported URL scheme {parts.scheme!r}")
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and urllib.request.proxy_bypass(parts.hostname or ""):
            proxy = None
        proxy_auth = {}
        if proxy:
            p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            if p.username:
                raw = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
                proxy_auth["Proxy-Authorization"] = (
                    "Basic " + base64.b64encode(raw.encode()).decode()
                )
            where = p.hostname + (f":{p.port}" if p.port else "")
        else:
            where = parts.netloc
        # Uploads are sent in blocks of CHUNK bytes (8 KiB by default: slow).
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                where, timeout=self.timeout, context=self.ssl_context, blocksize=CHUNK
            )
            if proxy:
                conn.set_tunnel(parts.hostname or "", parts.port or 443, headers=proxy_auth)
        else:
            conn = http.client.HTTPConnection(where, timeout=self.timeout, blocksize=CHUNK)
            if proxy:
                conn.cowfs_absolute = True  # type: ignore[attr-defined]
                conn.cowfs_proxy_headers = proxy_auth  # type: ignore[attr-defined]
        return conn

    def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | BinaryIO | None
    ) -> Response:
        parts = urllib.parse.urlsplit(url)
        key = (parts.scheme, parts.netloc)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        start = body.tell() if hasattr(body, "tell") else None  # type: ignore[union-attr]
        for attempt in (0, 1):
            pool = self._pool()
            conn = pool.get(key)
            reused = conn is not None
            if self.aborted:
                raise RegistryError("transfer aborted")
            if conn is None:
                conn = self._connect(parts)
                pool[key] = conn
                with self._lock:
                    self._live.add(conn)
            if getattr(conn, "cowfs_absolute", False):
                target = url  # through an HTTP proxy: the request line names the whole URL
            try:
                extra = getattr(conn, "cowfs_proxy_headers", None)
                conn.request(method, target, body=body, headers={**headers, **(extra or {})})
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.drop(key)
                # A keep-alive connection the server closed meanwhile: retry once on a new one.
                if attempt == 0 and reused:
                    if start is not None:
                        body.seek(start)  # type: ignore[union-attr]
                    continue
                raise
            except BaseException:
                self.drop(key)
                raise
            return Response(self, key, conn, resp)
        raise AssertionError("unreachable")
