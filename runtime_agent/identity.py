"""The agent's configuration file and its persisted identity.

The identity (node id, node token and the register response) is written atomically,
mode 0600, the moment registration succeeds: a restarted agent reuses it and never
registers twice (the bootstrap token is one-time anyway).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, fields
from typing import Any

IDENTITY_FILE = "identity.json"


@dataclass(frozen=True)
class AgentConfig:
    """`agent.json`: written by the provider (or the bootstrap script) before the agent starts."""

    control_plane_url: str
    bootstrap_token: str
    node_key: str
    state_dir: str
    address: str | None = None  # the IP other nodes reach this one at; detected when absent
    ray_temp_dir: str | None = None  # default: /tmp/cumulus-ray/<first 12 hex of node key>
    dashboard_host: str = "127.0.0.1"
    waiting_poll_s: float = 0.5  # heartbeat period while a worker waits for its join command
    stop_grace_s: float = 10.0
    ready_timeout_s: float = 180.0
    # Set by providers that put several nodes on one host (`local`): Ray's start-up is CPU-bound,
    # so nodes of a host boot one at a time, each holding this lock until it is ALIVE in the GCS.
    # Parallel boots on a small host only make every node, including the first, late.
    boot_lock: str | None = None
    boot_lock_max_hold_s: float = 30.0

    @classmethod
    def load(cls, path: str) -> AgentConfig:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @property
    def temp_dir(self) -> str:
        return self.ray_temp_dir or default_ray_temp_dir(self.node_key)


def default_ray_temp_dir(node_key: str) -> str:
    """Short on purpose: Ray puts unix sockets under it and sun_path is limited to 107 bytes."""
    return f"/tmp/cumulus-ray/{node_key.replace('-', '')[:12]}"  # noqa: S108 - per-node dir, by design


@dataclass(frozen=True)
class Identity:
    """Who this node is to the control plane."""

    node_id: str
    node_token: str
    registration: dict[str, Any]  # the full register response (role, cluster, ray resources)


def write_json_atomic(path: str, data: Any, mode: int = 0o600) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_identity(state_dir: str, identity: Identity) -> None:
    os.makedirs(state_dir, exist_ok=True)
    write_json_atomic(
        os.path.join(state_dir, IDENTITY_FILE),
        {"node_id": identity.node_id, "node_token": identity.node_token, "registration": identity.registration},
    )


def load_identity(state_dir: str) -> Identity | None:
    try:
        with open(os.path.join(state_dir, IDENTITY_FILE), encoding="utf-8") as fh:
            raw = json.load(fh)
        return Identity(node_id=str(raw["node_id"]), node_token=str(raw["node_token"]),
                        registration=dict(raw["registration"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"corrupt identity file in {state_dir}: {exc}") from exc
