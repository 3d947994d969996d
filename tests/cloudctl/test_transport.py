"""cloudctl's HTTP session (http.client, kept-alive connections) against a small local server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cloudctl import transport


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None, chunked: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 5):
                piece = body[i:i + 5]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _record(self, body: bytes = b"") -> None:
        Handler.seen.append({"method": self.command, "path": self.path, "port": self.client_address[1],
                             "headers": dict(self.headers), "body": body})

    def do_GET(self) -> None:
        self._record()
        if self.path.startswith("/moved"):
            self._answer(302, b"", {"Location": "/json?via=redirect"})
        elif self.path.startswith("/chunked"):
            self._answer(200, json.dumps({"chunked": True}).encode(), chunked=True)
        elif self.path.startswith("/slow"):
            time.sleep(1.0)
            self._answer(200, b"{}")
        elif self.path.startswith("/close-after"):
            self._answer(200, b"{}")
            self.close_connection = True  # without saying so: the client finds the connection closed later
        else:
            self._answer(200, json.dumps({"path": self.path}).encode(), {"Retry-After": "7"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._record(body)
        self._answer(201, body or b"{}")

    do_PUT = do_POST


@pytest.fixture
def server() -> Iterator[str]:
    Handler.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_json_params_and_kept_alive_connections(server: str):
    session = transport.Session({"Authorization": "Bearer t"})
    first = session.request("GET", f"{server}/json", params={"page_size": 500, "all": "true"}, timeout=5)
    assert first.status_code == 200 and first.json() == {"path": "/json?page_size=500&all=true"}
    assert first.headers.get("retry-after") == "7"
    posted = session.request("POST", f"{server}/things", json={"a": [1, 2]}, timeout=5)
    assert posted.status_code == 201 and posted.json() == {"a": [1, 2]}
    assert [s["port"] for s in Handler.seen] == [Handler.seen[0]["port"]] * 2  # one connection for both
    assert Handler.seen[1]["headers"]["Content-Type"] == "application/json"
    assert Handler.seen[0]["headers"]["Authorization"] == "Bearer t"
    session.close()


def test_a_body_streamed_from_an_iterable_of_known_length(server: str):
    class Body:
        def __len__(self) -> int:
            return 11

        def __iter__(self) -> Iterator[bytes]:
            yield b"hello "
            yield b"world"

    answer = transport.Session().request("PUT", f"{server}/blob", data=Body(), timeout=5)
    assert answer.status_code == 201 and answer.content == b"hello world"
    assert Handler.seen[0]["headers"]["Content-Length"] == "11"


def test_chunked_answers_and_get_redirects(server: str):
    session = transport.Session({"Authorization": "Bearer t"})
    assert session.request("GET", f"{server}/chunked", timeout=5).json() == {"chunked": True}
    moved = session.request("GET", f"{server}/moved", timeout=5)
    assert moved.status_code == 200 and moved.json() == {"path": "/json?via=redirect"}
    assert Handler.seen[-1]["headers"]["Authorization"] == "Bearer t"  # the same host


def test_a_connection_the_server_closed_while_idle_is_not_reused(server: str):
    session = transport.Session()
    session.request("GET", f"{server}/close-after", timeout=5)
    time.sleep(0.1)
    assert session.request("GET", f"{server}/json", timeout=5).status_code == 200
    assert Handler.seen[0]["port"] != Handler.seen[1]["port"]


def test_failures_are_transport_errors(server: str):
    session = transport.Session()
    with pytest.raises(transport.Timeout):
        session.request("GET", f"{server}/slow", timeout=0.2)
    with pytest.raises(transport.TransportError):
        session.request("GET", "http://127.0.0.1:9/", timeout=5)
    with pytest.raises(transport.InvalidURL):
        session.request("GET", "http://127.0.0.1:notaport/", timeout=5)


def test_a_configured_proxy_is_left_to_requests(monkeypatch: pytest.MonkeyPatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(transport.new_session({}), transport.Session)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    proxied = transport.new_session({"Authorization": "Bearer t"})
    assert isinstance(proxied, transport.ProxiedSession)
    assert proxied.headers["Authorization"] == "Bearer t"
    with pytest.raises(transport.TransportError):
        proxied.request("GET", "https://cp.invalid/api/v1/", timeout=5)
