"""HTTP transport for the registry client: per-thread keep-alive connections to any host
(registry, token service, blob CDN), TLS contexts and proxies.

Connections are per thread so that a small pool of threads can download layers in parallel
over http.client, which is not thread-safe. $https_proxy (CONNECT tunnels), $http_proxy
(absolute-form requests) and $no_proxy are honoured as curl and docker do.

abort() (Ctrl-C, a failed sibling transfer) must stop every thread's transfer at once, whatever
stage it is at: every socket is known to the transport from its creation, before it connects,
so that abort() can shut it down while it connects, passes a proxy's CONNECT, does its TLS
handshake or transfers; and once aborted, the transport opens nothing more and refuses to send.
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
from typing import Any, BinaryIO

from cowfs.errors import RegistryError, TransferAborted

CHUNK = 1 << 20  # read and send in blocks of this size (http.client's default 8 KiB is slow)


class _Connection(http.client.HTTPConnection):
    """Plain HTTP, on sockets made by the transport (known to abort() before they connect)."""

    absolute = False  # to an HTTP proxy: the request line names the whole URL
    proxy_headers: dict[str, str] | None = None  # sent with every request (to an HTTP proxy)

    def __init__(self, transport: Transport, host: str, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._create_connection = transport._open_socket


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS, on sockets made by the transport; the TLS handshake is done apart so that the TLS
    socket is known to abort() before it starts (http.client's connect() would handshake inside
    wrap_socket, where nothing can reach the socket: the plain one is detached by then)."""

    def __init__(self, transport: Transport, host: str, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._transport = transport
        self._create_connection = transport._open_socket

    def connect(self) -> None:
        # As http.client.HTTPSConnection.connect: TCP (and a proxy's CONNECT), then TLS.
        http.client.HTTPConnection.connect(self)
        server_hostname = getattr(self, "_tunnel_host", None) or self.host
        context: ssl.SSLContext = self._context  # type: ignore[attr-defined]
        tls = context.wrap_socket(
            self.sock, server_hostname=server_hostname, do_handshake_on_connect=False
        )
        self.sock = tls  # closed by close() from now on, whatever happens below
        self._transport._track(tls)
        tls.do_handshake()


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
        self._lock = threading.Lock()  # orders abort() against _track()
        # Every socket made, in every thread, until it is garbage: what abort() shuts down.
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._aborted = threading.Event()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def abort(self) -> None:
        """Break off every transfer in flight, in any thread, and refuse new ones: a thread
        blocked on a stalled socket would otherwise hold up Ctrl-C for the socket timeout."""
        with self._lock:
            self._aborted.set()
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                # socket.socket's own shutdown, also for a TLS socket: SSLSocket.shutdown would
                # drop its SSL object under the thread using it (an AttributeError there, not
                # an OSError). Shutting down wakes a thread blocked in connect, send or recv.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # not connected yet (the connect will see the abort), or closed already

    def pause(self, seconds: float) -> None:
        """Sleep before a retry, cut short by abort() (then TransferAborted): a retry after an
        abort must not even wait."""
        if self._aborted.wait(seconds):
            raise TransferAborted("transfer aborted")

    def _track(self, sock: socket.socket) -> None:
        """Make a new socket known to abort(); after abort() it is closed at once instead and
        TransferAborted raised: nothing new goes out."""
        with self._lock:
            if not self._aborted.is_set():
                self._sockets.add(sock)
                return
        sock.close()
        raise TransferAborted("transfer aborted")

    def _open_socket(
        self,
        address: tuple[str, int],
        timeout: float | None = None,
        source_address: tuple[str, int] | None = None,
    ) -> socket.socket:
        """socket.create_connection, but each socket is tracked before it connects, so that
        abort() can break off a connect that hangs (a host that drops our SYNs)."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            self._track(sock)
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                if self.aborted:  # shut down while connecting: not a reason to try the next
                    raise TransferAborted("transfer aborted") from None
                error = exc
                continue
            if self.aborted:
                # abort() came before the connect started: its shutdown did not stop it.
                sock.close()
                raise TransferAborted("transfer aborted")
            return sock
        raise error or OSError(f"cannot resolve {host}")

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
            conn = _TLSConnection(
                self, where, timeout=self.timeout, context=self.ssl_context, blocksize=CHUNK
            )
            if proxy:
                conn.set_tunnel(parts.hostname or "", parts.port or 443, headers=proxy_auth)
        else:
            conn = _Connection(self, where, timeout=self.timeout, blocksize=CHUNK)
            if proxy:
                conn.absolute = True
                conn.proxy_headers = proxy_auth
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
            if self.aborted:
                raise TransferAborted("transfer aborted")
            pool = self._pool()
            conn = pool.get(key)
            reused = conn is not None
            if conn is None:
                conn = self._connect(parts)  # connects on first use, on a tracked socket
                pool[key] = conn
            if isinstance(conn, _Connection) and conn.absolute:
                target = url  # through an HTTP proxy: the request line names the whole URL
            try:
                extra = conn.proxy_headers if isinstance(conn, _Connection) else None
                conn.request(method, target, body=body, headers={**headers, **(extra or {})})
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.drop(key)
                if self.aborted:  # our own abort() broke it: no retry
                    raise TransferAborted("transfer aborted") from None
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
