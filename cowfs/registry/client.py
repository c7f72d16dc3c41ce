"""A client of the OCI distribution API v2 (what docker, skopeo and every registry speak).

Plain http.client over per-thread keep-alive connections (transport.py), so a small thread
pool can download layers in parallel. HTTPS by default; plain HTTP only with `insecure` or for
a registry on this machine (localhost, 127.0.0.0/8, ::1: docker's default insecure registries).
TLS certificates are verified unless `insecure`; a private CA is trusted through
$SSL_CERT_FILE. The first request (GET /v2/) picks the scheme and learns the authentication
challenge; a 401 later (a token that expired, a new scope) is answered once and the request
retried. GET and HEAD are retried after broken connections and 5xx answers.

Blob downloads are checked while they stream: a body longer than the manifest's size stops at
once, a short one resumes with a Range request, and the sha256 must match the digest.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cowfs.errors import AuthError, DigestMismatch, RegistryError, TransferAborted, TransferError
from cowfs.registry import manifest as mf
from cowfs.registry.auth import Authenticator, Credentials, lookup
from cowfs.registry.reference import Reference
from cowfs.registry.transport import CHUNK, Response, Transport

RETRIES = 3  # attempts for a GET or HEAD, and for a blob download (resumed with Range)
BACKOFF = 0.25  # seconds before the second attempt; doubles after each
_REDIRECTS = (301, 302, 303, 307, 308)
Progress = Callable[[int], None]


def _error_text(body: bytes) -> str:
    """The registry's own words: {"errors": [{"code", "message", "detail"}]}."""
    try:
        errors = json.loads(body).get("errors") or []
        texts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors]
        return "; ".join(t for t in texts if t)
    except (ValueError, AttributeError, TypeError):
        return body[:200].decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""


class RegistryClient:
    """Talks to one registry; thread-safe (connections are per thread, tokens are shared)."""

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        allow_http: bool = False,
        credentials: Credentials | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.insecure = insecure
        self.allow_http = insecure or allow_http
        self.auth = Authenticator(host, credentials)
        self.transport = Transport(insecure=insecure, timeout=timeout)
        self._base: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_reference(
        cls, ref: Reference, *, insecure: bool = False, authfile: str | None = None
    ) -> RegistryClient:
        return cls(
            ref.api_host,
            insecure=insecure,
            allow_http=ref.is_local,
            credentials=lookup(ref.registry, authfile),
        )

    def abort(self) -> None:
        """Break off the transfers in flight (Ctrl-C, a failed sibling); their threads see an
        error at once (TransferAborted), and this client makes no new requests nor retries."""
        self.transport.abort()

    def _aborted(self) -> TransferAborted:
        return TransferAborted(f"{self.host}: transfer aborted")

    def _backoff(self, attempt: int) -> None:
        """Wait before retry `attempt + 1`; cut short by abort() (then TransferAborted)."""
        try:
            self.transport.pause(BACKOFF * 2**attempt)
        except TransferAborted:
            raise self._aborted() from None

    def add_scope(self, repository: str, actions: str) -> None:
        self.auth.add_scope(f"repository:{repository}:{actions}")
        if self._base is not None:
            self.auth.refresh_for_scopes(self._fetch)

    # -- plumbing -------------------------------------------------------------------------

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | BinaryIO | None
    ) -> Response:
        try:
            return self.transport.send(method, url, headers, body)
        except (OSError, http.client.HTTPException) as exc:
            if self.transport.aborted:
                # The socket was shut down under us on purpose: not a failure worth a retry.
                raise self._aborted() from None
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise self._untrusted(exc) from None
            if isinstance(exc, ssl.SSLError):
                raise RegistryError(f"{self.host}: TLS error: {exc.reason or exc}") from None
            if isinstance(exc, http.client.IncompleteRead):
                raise TransferError(
                    f"{self.host}: connection closed mid-response ({exc})"
                ) from None
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise TransferError(f"cannot reach {self.host}: {reason}") from None

    def _untrusted(self, exc: ssl.SSLCertVerificationError) -> RegistryError:
        return RegistryError(
            f"{self.host}: TLS certificate not trusted ({exc.verify_message}); "
            "trust its CA with SSL_CERT_FILE or use --insecure"
        )

    def _fetch(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, bytes]:
        """For the authenticator: one request to the token service, body read."""
        resp = self._send(method, url, dict(headers), body)
        try:
            return resp.status, resp.read_limited(1 << 20)
        finally:
            resp.close()

    def base(self) -> str:
        """scheme://host, found by GET /v2/ (which also tells how to authenticate)."""
        with self._lock:
            if self._base is None:
                self._base = self._ping()
            return self._base

    def _ping(self) -> str:
        schemes = ("https", "http") if self.allow_http else ("https",)
        for scheme in schemes:
            url = f"{scheme}://{self.host}/v2/"
            try:
                resp = self.transport.send("GET", url, {}, None)
            except (OSError, http.client.HTTPException) as exc:
                if self.transport.aborted:
                    raise self._aborted() from None  # not a reason to try plain HTTP
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise self._untrusted(exc) from None
                if not isinstance(
                    exc, ssl.SSLError | ConnectionResetError | http.client.HTTPException
                ):
                    raise TransferError(
                        f"cannot reach {self.host}: {exc.strerror or exc}"
                    ) from None
                # Not TLS on the other end: try plain HTTP when that is allowed.
                if scheme == "http":
                    raise TransferError(f"{self.host}: no HTTP or HTTPS answer ({exc})") from None
                if not self.allow_http:
                    raise RegistryError(
                        f"{self.host}: cannot talk TLS ({exc}); plain HTTP needs --insecure"
                    ) from None
                continue
            status = resp.status
            www = resp.headers.get("WWW-Authenticate")
            resp.read_limited(1 << 20)
            resp.close()
            if status == 401:
                self.auth.handle_challenge(www, None, self._fetch)
            elif status == 404:
                raise RegistryError(f"{self.host} does not serve the registry API v2 (/v2/: 404)")
            elif status != 200:
                raise RegistryError(f"{self.host}: /v2/ answered HTTP {status}")
            return f"{scheme}://{self.host}"
        raise AssertionError("unreachable")

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | BinaryIO | None = None,
        ok: tuple[int, ...] = (200,),
        what: str = "",
    ) -> Response:
        """Send with authentication and redirects; a status outside `ok` raises. GET and HEAD
        are tried again after a broken connection or a 5xx, as docker does."""
        tries = RETRIES if method in ("GET", "HEAD") else 1
        for attempt in range(tries):
            try:
                return self._request_once(method, path, headers, body, ok, what)
            except TransferError:
                if self.transport.aborted:
                    raise self._aborted() from None
                if attempt == tries - 1:
                    raise
                self._backoff(attempt)
        raise AssertionError("unreachable")

    def _request_once(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None,
        body: bytes | BinaryIO | None,
        ok: tuple[int, ...],
        what: str,
    ) -> Response:
        base = self.base()
        url = path if "://" in path else base + path
        start = body.tell() if hasattr(body, "tell") else None  # type: ignore[union-attr]
        # Credentials go to the registry only, not to an upload URL on another host.
        ours = urllib.parse.urlsplit(url).netloc == self.host
        for attempt in range(3):
            hdrs = dict(headers or {})
            sent = self.auth.header() if ours else None
            if sent:
                hdrs["Authorization"] = sent
            resp = self._send_following(method, url, hdrs, body)
            if resp.status != 401:
                self.auth.accepted(sent)
                break
            if attempt == 2:
                break
            www = resp.headers.get("WWW-Authenticate")
            resp.read_limited(1 << 20)
            resp.close()
            self.auth.handle_challenge(www, sent, self._fetch)
            if start is not None:
                body.seek(start)  # type: ignore[union-attr]
        if resp.status not in ok:
            raise self._error(resp, method, what or urllib.parse.urlsplit(url).path)
        return resp

    def _send_following(
        self, method: str, url: str, headers: dict[str, str], body: bytes | BinaryIO | None
    ) -> Response:
        for _ in range(6):
            resp = self._send(method, url, headers, body)
            location = resp.headers.get("Location")
            if method not in ("GET", "HEAD") or resp.status not in _REDIRECTS or not location:
                return resp
            resp.close()
            new = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(new).netloc != urllib.parse.urlsplit(url).netloc:
                # Blobs are often served by a CDN: never hand it the registry's credentials.
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
            url = new
        raise RegistryError(f"{self.host}: too many redirects for {method} {url}")

    def _error(self, resp: Response, method: str, what: str) -> RegistryError:
        try:
            body = resp.read(64 << 10) if method != "HEAD" else b""
        except (OSError, http.client.HTTPException):
            body = b""
        resp.close()
        detail = _error_text(body)
        text = f"{self.host}: {method} {what}: HTTP {resp.status}" + (
            f" ({detail})" if detail else ""
        )
        err: RegistryError
        if resp.status == 401:
            err = AuthError(text)
        elif resp.status >= 500 or resp.status == 429:
            err = TransferError(text)
        elif resp.status == 403:
            err = AuthError(
                f"{self.host}: access denied to {what}" + (f" ({detail})" if detail else "")
            )
        else:
            err = RegistryError(text)
        err.http_status = resp.status  # type: ignore[attr-defined]
        return err

    # -- manifests ------------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index, its digest verified."""
        resp = self.request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            headers={"Accept": mf.ACCEPT},
            what=f"manifest {repository}:{reference}"
            if ":" not in reference
            else f"manifest {repository}@{reference}",
        )
        try:
            body = resp.read_limited(mf.MAX_MANIFEST_SIZE)
        finally:
            resp.close()
        expected = reference if reference.startswith("sha256:") else None
        digest = mf.verify(body, expected, resp.headers.get("Docker-Content-Digest"))
        return body, resp.headers.get("Content-Type", ""), digest

    def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        resp = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            headers={"Content-Type": media_type},
            body=body,
            ok=(200, 201, 202),
            what=f"manifest {repository}:{reference}",
        )
        resp.read_limited(1 << 20)
        resp.close()
        return mf.verify(body, None, resp.headers.get("Docker-Content-Digest"))

    # -- blobs ----------------------------------------------------------------------------

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The size of a blob the registry has in `repository`, or None."""
        resp = self.request(
            "HEAD", f"/v2/{repository}/blobs/{digest}", ok=(200, 404), what=f"blob {digest}"
        )
        resp.close()
        if resp.status == 404:
            return None
        length = resp.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else -1

    def fetch_blob(
        self,
        repository: str,
        desc: mf.Descriptor,
        out: BinaryIO,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Stream a blob into `out` (a fresh seekable file), checking its size and sha256
        against the descriptor. A transfer that breaks off resumes where it stopped (Range)."""
        name = mf.short(desc.digest)
        state = _BlobState()
        for attempt in range(RETRIES):
            try:
                self._fetch_blob_once(repository, desc, out, state, progress, cancel)
                break
            except TransferError as exc:
                if cancel is not None and cancel.is_set():
                    raise RegistryError(f"download of blob {name} cancelled") from None
                if self.transport.aborted:
                    raise self._aborted() from None
                if attempt == RETRIES - 1:
                    raise TransferError(f"{exc.message} (after {RETRIES} attempts)") from None
                self._backoff(attempt)
        if state.size < desc.size:
            raise TransferError(f"blob {name} truncated: got {state.size} of {desc.size} bytes")
        got = "sha256:" + state.sha.hexdigest()
        if got != desc.digest:
            raise DigestMismatch(f"blob {name} has digest {mf.short(got)}")

    def _fetch_blob_once(
        self,
        repository: str,
        desc: mf.Descriptor,
        out: BinaryIO,
        state: _BlobState,
        progress: Progress | None,
        cancel: threading.Event | None,
    ) -> None:
        name = mf.short(desc.digest)
        headers = {"Range": f"bytes={state.size}-"} if 0 < state.size < desc.size else {}
        resp = self.request(
            "GET",
            f"/v2/{repository}/blobs/{desc.digest}",
            headers=headers,
            ok=(200, 206),
            what=f"blob {name}",
        )
        try:
            if resp.status == 200 and state.size:
                # The registry ignored the Range: start over.
                out.seek(0)
                out.truncate()
                state.reset()
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and state.size + int(length) != desc.size:
                raise DigestMismatch(
                    f"blob {name} is {state.size + int(length)} bytes, the manifest says "
                    f"{desc.size}"
                )
            while True:
                if cancel is not None and cancel.is_set():
                    raise RegistryError(f"download of blob {name} cancelled")
                if self.transport.aborted:
                    raise self._aborted()
                try:
                    chunk = resp.read(CHUNK)
                except http.client.IncompleteRead as exc:
                    state.add(exc.partial, out, progress)
                    raise TransferError(
                        f"blob {name} truncated: got {state.size} of {desc.size} bytes"
                    ) from None
                except (OSError, http.client.HTTPException) as exc:
                    raise TransferError(f"blob {name}: download broke off: {exc}") from None
                if not chunk:
                    if state.size < desc.size:
                        # http.client ends a body cut short quietly when reading by amounts.
                        raise TransferError(
                            f"blob {name} truncated: got {state.size} of {desc.size} bytes"
                        )
                    break
                if state.size + len(chunk) > desc.size:
                    raise DigestMismatch(
                        f"blob {name} is larger than the {desc.size} bytes the manifest says"
                    )
                state.add(chunk, out, progress)
        finally:
            resp.close()

    def fetch_blob_bytes(self, repository: str, desc: mf.Descriptor, limit: int) -> bytes:
        """A small blob (an image config) in memory, verified."""
        if desc.size > limit:
            raise RegistryError(f"blob {mf.short(desc.digest)} is too large ({desc.size} bytes)")
        buf = io.BytesIO()
        self.fetch_blob(repository, desc, buf)
        return buf.getvalue()

    def start_upload(self, repository: str, mount: tuple[str, str] | None = None) -> str | None:
        """Open an upload session and return its URL; with mount=(digest, from_repository) the
        registry may link the blob instead (201), and then None is returned."""
        path = f"/v2/{repository}/blobs/uploads/"
        if mount is not None:
            path += "?" + urllib.parse.urlencode({"mount": mount[0], "from": mount[1]})
        resp = self.request("POST", path, body=b"", ok=(201, 202), what="blob upload")
        resp.read_limited(1 << 20)
        resp.close()
        if resp.status == 201:
            return None
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.host}: upload session without a Location")
        return urllib.parse.urljoin(self.base() + path, location)

    def upload_blob(
        self,
        repository: str,
        path: Path,
        digest: str,
        size: int,
        *,
        location: str | None = None,
        chunk_size: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Upload a file as a blob: one PUT, or PATCH chunks then a closing PUT."""
        location = location or self.start_upload(repository)
        assert location is not None
        name = mf.short(digest)
        with open(path, "rb") as f:
            if chunk_size is None or size <= chunk_size:
                body: BinaryIO = _ProgressReader(f, progress)
                headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            else:
                offset = 0
                while offset < size:
                    data = f.read(chunk_size)
                    resp = self.request(
                        "PATCH",
                        location,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"{offset}-{offset + len(data) - 1}",
                        },
                        body=data,
                        ok=(202,),
                        what=f"blob {name} chunk at {offset}",
                    )
                    resp.read_limited(1 << 20)
                    resp.close()
                    location = urllib.parse.urljoin(
                        location, resp.headers.get("Location", location)
                    )
                    offset += len(data)
                    if progress is not None:
                        progress(len(data))
                body, headers = b"", {"Content-Length": "0"}  # type: ignore[assignment]
            sep = "&" if "?" in location else "?"
            url = location + sep + urllib.parse.urlencode({"digest": digest})
            resp = self.request(
                "PUT", url, headers=headers, body=body, ok=(201,), what=f"blob {name}"
            )
            resp.read_limited(1 << 20)
            resp.close()
        said = resp.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise DigestMismatch(f"registry stored blob {name} as {mf.short(said)}")


class _BlobState:
    """What a blob download has written so far, carried across resumed attempts."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def add(self, data: bytes, out: BinaryIO, progress: Progress | None) -> None:
        self.sha.update(data)
        out.write(data)
        self.size += len(data)
        if progress is not None and data:
            progress(len(data))


class _ProgressReader:
    """A file wrapper that reports how much http.client has read from it."""

    def __init__(self, f: BinaryIO, progress: Progress | None) -> None:
        self._f = f
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if self._progress is not None and data:
            self._progress(len(data))
        return data

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)
