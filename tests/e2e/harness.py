"""A whole control plane in real processes, for end-to-end tests and benchmarks.

`ControlPlaneHarness` gives each run its own data directory, its own database (a fresh
PostgreSQL database when DATABASE_URL is set, else SQLite), its own broker queue (on the
broker in CELERY_BROKER_URL, else the folder transport) and its own install id, then
starts gunicorn, a Celery worker and beat exactly as `make run` does. `close()` stops them,
terminates every machine of the install and drops the database.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from controlplane.devserver import ControlPlane

ROOT = Path(__file__).resolve().parents[2]

# Tight timings so faults show within seconds; production defaults are in settings/base.py.
FAST_SETTINGS = {
    "CUMULUS_SWEEP_INTERVAL_S": "2",
    "CUMULUS_RECONCILE_LEASE_S": "10",
    "CUMULUS_NODE_LOST_AFTER_S": "15",
    "CUMULUS_ORPHAN_GRACE_S": "5",
    "CUMULUS_HEARTBEAT_INTERVAL_S": "2",
    "CUMULUS_HEARTBEAT_FAST_INTERVAL_S": "0.5",
}


def with_default_sigint() -> None:
    """A `preexec_fn` for a program a test presses Ctrl-C in: SIGINT as a terminal's foreground program has it.

    A test run started as a background job (`... &` in a script) ignores SIGINT, and its children
    inherit that; Python then installs no KeyboardInterrupt handler, and the Ctrl-C goes nowhere.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; return its value, or fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


class Api:
    """A small client of the public REST API."""

    def __init__(self, base: str, token: str, workspace: str) -> None:
        self.base = base.rstrip("/") + "/api/v1"
        self.ws = workspace
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.base + path, timeout=30, **kwargs)

    def cluster_path(self, name: str = "") -> str:
        return f"/workspaces/{self.ws}/clusters/" + (f"{name}/" if name else "")

    def create_cluster(self, spec: dict) -> dict:
        response = self.request("POST", self.cluster_path(), json=spec)
        assert response.status_code == 201, response.text
        return response.json()

    def cluster(self, name: str) -> dict:
        response = self.request("GET", self.cluster_path(name))
        assert response.status_code == 200, response.text
        return response.json()

    def nodes(self, name: str, all: bool = False) -> list[dict]:
        response = self.request("GET", self.cluster_path(name) + "nodes/", params={"all": "true"} if all else None)
        assert response.status_code == 200, response.text
        return response.json()["results"]

    def events(self, name: str) -> list[str]:
        response = self.request("GET", self.cluster_path(name) + "events/", params={"page_size": 500})
        assert response.status_code == 200, response.text
        return [e["message"] for e in reversed(response.json()["results"])]

    def wait_status(self, name: str, status: str, timeout: float = 90.0) -> dict:
        def reached() -> dict | None:
            cluster = self.cluster(name)
            if cluster["status"] == "FAILED" and status != "FAILED":
                raise AssertionError(f"cluster {name} FAILED: {cluster['status_message']}")
            return cluster if cluster["status"] == status else None

        return wait_for(reached, timeout, what=f"cluster {name} to be {status}")


class ControlPlaneHarness:
    def __init__(self, tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.install_id = "e2e-" + secrets.token_hex(4)
        self.port = free_port()
        self.db_name: str | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CUMULUS_", "PYTEST_"))}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        env.update(FAST_SETTINGS)
        env.update({
            "DJANGO_SETTINGS_MODULE": "controlplane.settings.dev",
            "CUMULUS_DATA_DIR": str(self.data_dir),
            "CUMULUS_INSTALL_ID": self.install_id,
            "CUMULUS_QUEUE": "cumulus-" + self.install_id,
            "PORT": str(self.port),
            "CUMULUS_PUBLIC_URL": f"http://127.0.0.1:{self.port}",
        })
        base_db = os.environ.get("DATABASE_URL", "")
        if base_db.startswith(("postgres://", "postgresql://")):
            self.db_name = "cumulus_" + self.install_id.replace("-", "_")
            self._admin_sql(base_db, f'CREATE DATABASE "{self.db_name}"')
            parsed = urllib.parse.urlparse(base_db)
            env["DATABASE_URL"] = parsed._replace(path="/" + self.db_name).geturl()
        else:
            env.pop("DATABASE_URL", None)
        env.update(extra_env or {})
        self.env = env
        self.plane = ControlPlane(cwd=ROOT, env=env, port=self.port, log_dir=self.data_dir / "logs")
        self.token = ""
        self.workspace = "e2e"

    @staticmethod
    def _admin_sql(url: str, sql: str) -> None:
        import psycopg

        parsed = urllib.parse.urlparse(url)
        admin = parsed._replace(path="/postgres").geturl()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql)

    def manage(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def start(self) -> ControlPlaneHarness:
        self.manage("migrate", "-v0")
        out = self.manage("create_user", "e2e@example.com", "--workspace", self.workspace)
        self.token = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("API token: "))
        self.plane.start()
        self.plane.wait_healthy()
        return self

    def api(self) -> Api:
        return Api(self.plane.url, self.token, self.workspace)

    def provider(self):
        from clusters.providers.local import LocalProvider

        return LocalProvider(nodes_dir=str(self.data_dir / "nodes"), install_id=self.install_id)

    def machines(self, cluster_uid: str | None = None) -> list:
        return self.provider().list_nodes(cluster_uid=cluster_uid)

    def logs(self) -> str:
        out = []
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            out.append(f"--- {path.name} ---\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(out)

    def close(self) -> None:
        try:
            self.plane.stop()
        finally:
            provider = self.provider()
            leftovers = provider.list_nodes(cluster_uid=None)
            if leftovers:
                provider.terminate_nodes([i.instance_id for i in leftovers])
            if self.db_name:
                self._admin_sql(os.environ["DATABASE_URL"], f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


def node_pids(node_key: str) -> set[int]:
    from clusters.providers.local import node_processes

    return {p.pid for p in node_processes(node_key)}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
