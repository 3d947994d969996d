"""The `local` provider: each "machine" is a runtime-agent process tree on this host.

A machine is a folder `nodes_dir/<node_key>/` holding `instance.json` (what `list_nodes`
reports), `agent.json` (the agent's config), `agent.pid`, `agent.log`, and once
terminated a `terminated.json` marker. The agent is launched detached: in its own
session, reparented to init through a short-lived launcher, so it survives a restart of
the Celery worker or web server that created it and never becomes their zombie.

Every process of a node (the agent, `ray start`, raylet, GCS, workers, ...) carries the
env var `CUMULUS_NODE_KEY=<node key>`; that marker, not the process group (Ray moves some
children to other groups) and never `ray stop` (it kills every Ray process on the host),
is how a node is found and stopped.

Assumptions: one host, Linux `/proc` (psutil), and the same user runs every caller.
This module must not import Django or any model (import-linter enforces it).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil

from clusters.providers import catalog
from clusters.providers.base import (
    TAG_CLUSTER,
    TAG_GROUP,
    TAG_INSTALL,
    TAG_NODE,
    TAG_ROLE,
    Instance,
    InstanceTypeInfo,
    LaunchRequest,
    PermanentProviderError,
    TransientProviderError,
)

logger = logging.getLogger(__name__)

NODE_KEY_ENV = "CUMULUS_NODE_KEY"
RAY_TEMP_ROOT = "/tmp/cumulus-ray"  # noqa: S108 - short on purpose: Ray's unix socket paths must stay < 108 bytes
TERMINATE_GRACE_S = 10.0
POLL_S = 0.05

INSTANCE_FILE = "instance.json"
AGENT_CONFIG_FILE = "agent.json"
PID_FILE = "agent.pid"
LOG_FILE = "agent.log"
TERMINATED_FILE = "terminated.json"
LOCK_FILE = ".lock"

# Runs as the short-lived middle process: starts the agent in a new session, prints its
# pid and exits, so the agent is reparented to init (or the nearest subreaper).
_LAUNCHER = """
import os, subprocess, sys
log = open(sys.argv[1], "ab")
p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                     start_new_session=True, close_fds=True)
print(p.pid, flush=True)
"""


def ray_temp_dir(node_key: str) -> str:
    """The node's Ray `--temp-dir` (written into agent.json, so the agent uses the same one)."""
    return os.path.join(RAY_TEMP_ROOT, node_key.replace("-", "")[:12])


def instance_id_for(node_key: str) -> str:
    return "local-" + node_key.replace("-", "")[:12]


def processes_by_node_key() -> dict[str, list[psutil.Process]]:
    """One scan of the host: every live (non-zombie) process carrying the node marker, by node key."""
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            key = proc.environ().get(NODE_KEY_ENV)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if key:
            found.setdefault(key, []).append(proc)
    return found


def node_processes(node_key: str) -> list[psutil.Process]:
    """Every live (non-zombie) process whose environment carries `CUMULUS_NODE_KEY=node_key`."""
    return processes_by_node_key().get(node_key, [])


def _write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _agent_pythonpath() -> str:
    """The folder that holds the `runtime_agent` package (found without importing it)."""
    spec = importlib.util.find_spec("runtime_agent")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise PermanentProviderError("the runtime_agent package is not importable here")
    return os.path.dirname(os.path.abspath(locations[0]))


class LocalProvider:
    """Process trees on this host, one folder per machine. Cheap to construct; holds no state."""

    name = "local"

    def __init__(self, nodes_dir: str, install_id: str, *, terminate_grace_s: float = TERMINATE_GRACE_S) -> None:
        self.nodes_dir = os.path.abspath(nodes_dir)
        self.install_id = install_id
        self.terminate_grace_s = terminate_grace_s
        os.makedirs(self.nodes_dir, exist_ok=True)

    # -- catalog ---------------------------------------------------------------------------

    def instance_types(self) -> list[InstanceTypeInfo]:
        return list(catalog.LOCAL_TYPES)

    # -- create ----------------------------------------------------------------------------

    def create_node(self, request: LaunchRequest) -> Instance:
        """Launch the agent for `request.node_key`, or return the machine that key already has."""
        if not request.node_key or os.sep in request.node_key or request.node_key.startswith("."):
            raise PermanentProviderError(f"invalid node key {request.node_key!r}")
        node_dir = self._node_dir(request.node_key)
        os.makedirs(node_dir, exist_ok=True)
        with self._locked(node_dir):
            info = _read_json(os.path.join(node_dir, INSTANCE_FILE))
            if info is not None:
                if self._is_terminated(node_dir):
                    return self._instance(info, "terminated")
                # The marker, not the pid file, tells whether the machine runs: a caller killed
                # between starting the launcher and writing agent.pid must not launch a twin.
                if node_processes(request.node_key):
                    return self._instance(info, "running")
                if os.path.exists(os.path.join(node_dir, PID_FILE)):
                    # Launched once and died since: a dead VM is not restarted.
                    self._mark_terminated(node_dir, "process tree exited")
                    self._remove_temp_dir(request.node_key)
                    return self._instance(info, "terminated")
                # Files written but nothing started (the caller died first): launch now.
            info = self._write_node_files(node_dir, request)
            self._launch(node_dir, request.node_key)
        logger.info("local.node.launched node_key=%s", request.node_key)
        return self._instance(info, "running")

    def _write_node_files(self, node_dir: str, request: LaunchRequest) -> dict[str, Any]:
        tags = {
            **request.tags,
            TAG_INSTALL: self.install_id,
            TAG_CLUSTER: request.cluster_uid,
            TAG_NODE: request.node_key,
            TAG_ROLE: request.role,
            TAG_GROUP: request.group,
        }
        info: dict[str, Any] = {
            "instance_id": instance_id_for(request.node_key),
            "node_key": request.node_key,
            "cluster_uid": request.cluster_uid,
            "cluster_name": request.cluster_name,
            "workspace": request.workspace,
            "role": request.role,
            "group": request.group,
            "instance_type": request.instance_type.name,
            "tags": tags,
            "launched_at": time.time(),
        }
        state_dir = os.path.join(node_dir, "state")
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        _write_json_atomic(os.path.join(node_dir, AGENT_CONFIG_FILE), {
            "control_plane_url": request.bootstrap.control_plane_url,
            "bootstrap_token": request.bootstrap.bootstrap_token,
            "node_key": request.node_key,
            "state_dir": state_dir,
            "address": "127.0.0.1",
            "ray_temp_dir": ray_temp_dir(request.node_key),
            "dashboard_host": "127.0.0.1",
            # Every node of this host shares the CPU: boot them one at a time (see AgentConfig.boot_lock).
            "boot_lock": os.path.join(RAY_TEMP_ROOT, "boot.lock"),
        })
        os.chmod(os.path.join(node_dir, AGENT_CONFIG_FILE), 0o600)  # holds the bootstrap token
        _write_json_atomic(os.path.join(node_dir, INSTANCE_FILE), info)
        return info

    def _launch(self, node_dir: str, node_key: str) -> None:
        env = dict(os.environ)
        env[NODE_KEY_ENV] = node_key
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_agent_pythonpath(), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        # Settings of the caller (Django, Celery) mean nothing to the agent.
        for key in ("DJANGO_SETTINGS_MODULE",):
            env.pop(key, None)
        agent_cmd = [sys.executable, "-m", "runtime_agent", "--config", os.path.join(node_dir, AGENT_CONFIG_FILE)]
        try:
            out = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, os.path.join(node_dir, LOG_FILE), *agent_cmd],
                env=env, cwd=node_dir, stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                start_new_session=True, check=True,
            )
            pid = int(out.stdout.strip())
        except (subprocess.SubprocessError, ValueError, OSError) as exc:
            raise TransientProviderError(f"could not launch the agent for {node_key}: {exc}") from exc
        with open(os.path.join(node_dir, PID_FILE + ".tmp"), "w", encoding="utf-8") as fh:
            fh.write(f"{pid}\n")
        os.replace(os.path.join(node_dir, PID_FILE + ".tmp"), os.path.join(node_dir, PID_FILE))

    # -- list ------------------------------------------------------------------------------

    def list_nodes(self, cluster_uid: str | None = None) -> list[Instance]:
        """Live machines of this install (optionally one cluster); dead trees are marked terminated."""
        result: list[Instance] = []
        running = processes_by_node_key()
        for node_dir, info in self._scan():
            tags = info.get("tags") or {}
            if tags.get(TAG_INSTALL) != self.install_id:
                continue
            if cluster_uid is not None and info.get("cluster_uid") != cluster_uid:
                continue
            if self._is_terminated(node_dir):
                continue
            if running.get(str(info["node_key"])):
                result.append(self._instance(info, "running"))
                continue
            if not os.path.exists(os.path.join(node_dir, PID_FILE)):
                # Files written, nothing started yet: a launch in progress, or one whose caller
                # died first (the reconciler's retry of create_node with the same key launches it).
                continue
            # The whole tree is gone (killed, crashed): like a dead VM, it is terminated.
            with self._locked(node_dir):
                if not node_processes(str(info["node_key"])) and not self._is_terminated(node_dir):
                    self._mark_terminated(node_dir, "process tree exited")
                    self._remove_temp_dir(info["node_key"])
                    logger.warning("local.node.lost node_key=%s", info["node_key"])
        return result

    # -- terminate -------------------------------------------------------------------------

    def terminate_nodes(self, instance_ids: list[str]) -> None:
        """Stop these machines (in parallel): SIGTERM, up to ~10 s grace, then SIGKILL. Idempotent."""
        wanted = set(instance_ids)
        targets = [(d, info) for d, info in self._scan() if info.get("instance_id") in wanted
                   and (info.get("tags") or {}).get(TAG_INSTALL) == self.install_id]
        keys: list[str] = []
        for node_dir, info in targets:
            key = str(info["node_key"])
            keys.append(key)
            with self._locked(node_dir):
                if not self._is_terminated(node_dir):
                    self._mark_terminated(node_dir, "terminate_nodes")
            agent = self._agent_process(node_dir)
            if agent is not None:
                # The agent stops `ray start --block` gracefully, which stops the node's processes.
                with contextlib.suppress(psutil.NoSuchProcess):
                    agent.send_signal(signal.SIGTERM)
            else:
                for proc in node_processes(key):
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.terminate_grace_s
        pending = list(keys)
        while pending and time.monotonic() < deadline:
            pending = [k for k in pending if node_processes(k)]
            if pending:
                time.sleep(POLL_S)
        for key in pending:
            survivors = node_processes(key)
            logger.warning("local.node.kill_survivors node_key=%s pids=%s", key, [p.pid for p in survivors])
            for proc in survivors:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    proc.kill()
            psutil.wait_procs(survivors, timeout=2.0)
        for key in keys:
            self._remove_temp_dir(key)
            logger.info("local.node.terminated node_key=%s", key)

    # -- helpers ---------------------------------------------------------------------------

    def _node_dir(self, node_key: str) -> str:
        return os.path.join(self.nodes_dir, node_key)

    def _scan(self) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            names = sorted(os.listdir(self.nodes_dir))
        except FileNotFoundError:
            return
        for name in names:
            node_dir = os.path.join(self.nodes_dir, name)
            info = _read_json(os.path.join(node_dir, INSTANCE_FILE))
            if info is not None and "node_key" in info:
                yield node_dir, info

    @contextlib.contextmanager
    def _locked(self, node_dir: str) -> Iterator[None]:
        """Serialize create/terminate of one node across threads and processes (two Celery workers)."""
        with open(os.path.join(node_dir, LOCK_FILE), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _agent_process(self, node_dir: str) -> psutil.Process | None:
        """The agent process, if alive. A PID reused by another program is not mistaken for it:
        its command line must name this node's agent.json."""
        try:
            with open(os.path.join(node_dir, PID_FILE), encoding="utf-8") as fh:
                pid = int(fh.read().strip())
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            if os.path.join(node_dir, AGENT_CONFIG_FILE) not in proc.cmdline():
                return None
            return proc
        except (FileNotFoundError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None

    @staticmethod
    def _is_terminated(node_dir: str) -> bool:
        return os.path.exists(os.path.join(node_dir, TERMINATED_FILE))

    @staticmethod
    def _mark_terminated(node_dir: str, reason: str) -> None:
        _write_json_atomic(os.path.join(node_dir, TERMINATED_FILE), {"at": time.time(), "reason": reason})

    @staticmethod
    def _remove_temp_dir(node_key: str) -> None:
        shutil.rmtree(ray_temp_dir(node_key), ignore_errors=True)

    def _instance(self, info: dict[str, Any], status: str) -> Instance:
        return Instance(
            instance_id=str(info["instance_id"]),
            node_key=str(info["node_key"]),
            cluster_uid=str(info["cluster_uid"]),
            status=status,  # type: ignore[arg-type]
            instance_type=str(info["instance_type"]),
            private_ip="127.0.0.1",
            launched_at=info.get("launched_at"),
            tags=dict(info.get("tags") or {}),
        )

