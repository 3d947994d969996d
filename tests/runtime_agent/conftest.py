"""A stdlib HTTP server that plays the control plane's agent API, for agent-level protocol tests."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from clusters.providers.local import LocalProvider, instance_id_for, node_processes
from tests.providers.conftest import kill_node_trees


@dataclass
class FakeNode:
    node_id: str
    token: str
    role: str
    registered_at: float
    heartbeats: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any] | None:
        return self.heartbeats[-1][1] if self.heartbeats else None

    def first_time_in(self, state: str) -> float | None:
        return next((t for t, body in self.heartbeats if body["state"] == state), None)


class FakeControlPlane:
    """Hands out roles by bootstrap token; tells workers to join once the head reports ready."""

    def __init__(self, heartbeat_interval_s: float = 0.5) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.bootstrap: dict[str, str] = {}  # token -> role, one-time
        self.nodes: dict[str, FakeNode] = {}  # by bootstrap token
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_token(self, role: str) -> str:
        token = f"boot-{role}-{uuid.uuid4().hex[:8]}"
        self.bootstrap[token] = role
        return token

    def node(self, bootstrap_token: str) -> FakeNode | None:
        with self.lock:
            return self.nodes.get(bootstrap_token)

    def stop_node(self, bootstrap_token: str, reason: str = "test") -> None:
        with self.lock:
            self.nodes[bootstrap_token].commands.append({"type": "stop", "reason": reason})

    def _head(self) -> FakeNode | None:
        return next((n for n in self.nodes.values() if n.role == "head"), None)

    def register(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            token = body.get("bootstrap_token")
            if token not in self.bootstrap or token in self.nodes:
                return 401, {"detail": "unknown or used bootstrap token"}
            role = self.bootstrap[token]
            node = FakeNode(node_id=str(uuid.uuid4()), token=uuid.uuid4().hex, role=role, registered_at=time.time())
            self.nodes[token] = node
        return 200, {
            "node_id": node.node_id, "node_token": node.token, "role": role, "cluster": "c1",
            "ray": {"num_cpus": 1, "num_gpus": 0, "memory_bytes": 1024**3, "resources": {"local.small": 1.0},
                    "labels": {"cumulus-group": "head" if role == "head" else "cpu"}},
            "heartbeat_interval_s": self.heartbeat_interval_s,
        }

    def heartbeat(self, node_id: str, auth: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            node = next((n for n in self.nodes.values() if n.node_id == node_id), None)
            if node is None or auth != f"Bearer {node.token}":
                return 401, {"detail": "bad node token"}
            node.heartbeats.append((time.time(), body))
            commands, node.commands = node.commands, []
            head = self._head()
            if (node.role == "worker" and body["state"] == "waiting_for_head" and head is not None
                    and head.last and head.last["state"] == "ready"):
                commands.append({"type": "join", "gcs_address": head.last["ray"]["gcs_address"]})
        return 200, {"commands": commands, "heartbeat_interval_s": self.heartbeat_interval_s}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                parts = self.path.strip("/").split("/")
                if self.path == "/api/agent/v1/register":
                    status, out = plane.register(body)
                elif len(parts) == 6 and parts[:4] == ["api", "agent", "v1", "nodes"] and parts[5] == "heartbeat":
                    status, out = plane.heartbeat(parts[4], self.headers.get("Authorization", ""), body)
                else:
                    status, out = 404, {"detail": "not found"}
                raw = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def control_plane() -> Iterator[FakeControlPlane]:
    plane = FakeControlPlane()
    plane.thread.start()
    yield plane
    plane.server.shutdown()
    plane.server.server_close()


@pytest.fixture
def node_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProvider]:
    """A local provider whose every node process is gone after the test, pass or fail."""
    provider = LocalProvider(str(tmp_path_factory.mktemp("nodes")), install_id=f"test-{uuid.uuid4().hex[:8]}")
    yield provider
    keys = [name for name in os.listdir(provider.nodes_dir) if os.path.isdir(os.path.join(provider.nodes_dir, name))]
    provider.terminate_nodes([instance_id_for(k) for k in keys])
    kill_node_trees(keys)
    assert not any(node_processes(k) for k in keys)
