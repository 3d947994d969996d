"""HTTP for `Client`: a small keep-alive session on `http.client`, or requests where a proxy is configured.

requests takes about 60 ms to import, a third of what a whole `cloudctl sync` of an unchanged
project should take; `http.client` about 20. What cloudctl needs of HTTP is small: JSON in and
out, a body streamed from an iterable of known length, keep-alive connections shared by a few
threads, redirects of GET requests, and HTTPS verified against the same certificates as before
(REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else certifi's). Proxies are the exception: when the
environment names one (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, in either case), `new_session` returns
a requests session, which honours them and NO_PROXY exactly as cloudctl always has.

Both kinds answer `request(method, url, *, params, json, data, headers, timeout)` with an object
that has `status_code`, `headers`, `content` and `json()`, and raise `TransportError` (or its
subclasses `Timeout` and `InvalidURL`) when no answer came.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import os
import select
import threading
from urllib.parse import urlencode, urljoin, urlsplit

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `cloudctl sync` pays for every import
if TYPE_CHECKING:
    from typing import Any

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10
IDLE_PER_HOST = 10  # keep-alive connections kept for reuse per host
USER_AGENT = "cloudctl"


class TransportError(Exception):
    """The request got no answer: the host cannot be reached, the connection broke, the URL is unusable."""


class Timeout(TransportError):
    pass


class InvalidURL(TransportError):
    pass


class Response:
    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: http.client.HTTPMessage, content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers  # case-insensitive `get`
        self.content = content

    def json(self) -> Any:
        return jsonlib.loads(self.content)


def proxy_configured() -> bool:
    return any(os.environ.get(name) or os.environ.get(name.upper()) for name in PROXY_VARIABLES)


def new_session(headers: dict[str, str]) -> Session | ProxiedSession:
    """The session `Client` uses: ours, or requests' where the environment configures a proxy."""
    return ProxiedSession(headers) if proxy_configured() else Session(headers)


def _ca_locations() -> dict[str, str]:
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        return {"capath": bundle} if os.path.isdir(bundle) else {"cafile": bundle}
    try:
        import certifi
    except ImportError:  # the system's store, then
        return {}
    return {"cafile": certifi.where()}


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection was closed by the server (it is then readable: EOF)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class Session:
    """Keep-alive HTTP/1.1 connections, shared by threads: each request takes an idle one or opens one."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers = {"User-Agent": USER_AGENT, **(headers or {})}
        self._idle: dict[tuple[str, str, int | None], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl_context: Any = None

    def request(self, method: str, url: str, *, params: dict | None = None, json: Any = None, data: Any = None,
                headers: dict[str, str] | None = None, timeout: float | None = None) -> Response:
        """Send one request and read the whole answer. `data` is bytes or an iterable of bytes with a `len()`."""
        merged = {**self.headers, **(headers or {})}
        if json is not None:
            data = jsonlib.dumps(json, separators=(",", ":")).encode()
            merged.setdefault("Content-Type", "application/json")
        elif data is not None and not isinstance(data, bytes | bytearray):
            merged["Content-Length"] = str(len(data))
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params, doseq=True)
        for _ in range(MAX_REDIRECTS):
            response = self._send(method, url, data, merged, timeout)
            location = response.headers.get("Location")
            if response.status_code not in REDIRECTS or not location or method not in ("GET", "HEAD"):
                return response
            target = urljoin(url, location)
            if urlsplit(target).netloc != urlsplit(url).netloc:
                merged.pop("Authorization", None)  # a token goes to the host it was given for, only
            url = target
        raise TransportError(f"More than {MAX_REDIRECTS} redirects.")

    def _send(self, method: str, url: str, body: Any, headers: dict[str, str], timeout: float | None) -> Response:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise InvalidURL(f"{url} has an invalid port.") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidURL(f"{url} is not an http:// or https:// URL.")
        key = (parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        replayable = body is None or isinstance(body, bytes | bytearray)
        while True:
            conn, reused = self._connection(key, timeout)
            try:
                conn.request(method, target, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                conn.close()
                if reused and replayable:
                    continue  # the server closed it as we sent: the request was not received, so send it again
                raise TransportError(f"The connection to {parts.netloc} broke.") from None
            except Exception as exc:
                conn.close()
                raise self._translate(exc) from None
            try:
                answer = conn.getresponse()
                content = answer.read()
            except http.client.RemoteDisconnected:
                conn.close()
                if reused and replayable and method in ("GET", "HEAD"):
                    continue  # closed by the server just as it was reused, before answering: ask again
                raise TransportError(f"{parts.netloc} closed the connection without answering.") from None
            except Exception as exc:
                conn.close()
                raise self._translate(exc) from None
            break
        if answer.will_close:
            conn.close()
        else:
            self._release(key, conn)
        return Response(answer.status, answer.headers, content)

    @staticmethod
    def _translate(exc: Exception) -> Exception:
        if isinstance(exc, TimeoutError):
            return Timeout(str(exc))
        if isinstance(exc, http.client.InvalidURL | UnicodeError):
            return InvalidURL(str(exc))
        if isinstance(exc, OSError | http.client.HTTPException):
            return TransportError(str(exc))
        return exc

    def _connection(self, key: tuple[str, str, int | None], timeout: float | None
                    ) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                conn = idle.pop()
                if not _dropped(conn):
                    conn.timeout = timeout
                    if conn.sock is not None:
                        conn.sock.settimeout(timeout)
                    return conn, True
                conn.close()
        scheme, host, port = key
        if scheme == "https":
            if self._ssl_context is None:
                import ssl

                self._ssl_context = ssl.create_default_context(**_ca_locations())
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ssl_context), False
        return http.client.HTTPConnection(host, port, timeout=timeout), False

    def _release(self, key: tuple[str, str, int | None], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < IDLE_PER_HOST:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


class ProxiedSession:
    """requests, for when a proxy is configured; its failures become TransportError like ours."""

    def __init__(self, headers: dict[str, str]) -> None:
        import requests

        self._requests = requests
        self.session = requests.Session()
        self.session.headers.update(headers)
        self.headers = self.session.headers

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        exceptions = self._requests.exceptions
        try:
            return self.session.request(method, url, **kwargs)
        except (exceptions.InvalidURL, exceptions.MissingSchema, exceptions.InvalidSchema) as exc:
            raise InvalidURL(str(exc)) from None
        except exceptions.Timeout as exc:
            raise Timeout(str(exc)) from None
        except exceptions.RequestException as exc:
            raise TransportError(str(exc)) from None

    def close(self) -> None:
        self.session.close()
