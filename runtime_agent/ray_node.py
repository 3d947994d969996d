"""Start, probe and stop the one Ray node this agent owns.

The node runs as a child `ray start ... --block` in its own process group; it inherits
the agent's environment, including `CUMULUS_NODE_KEY`, which is how the local provider
finds every process of a node. We stop it with SIGTERM to that child (Ray's `--block`
mode then stops its own processes) and SIGKILL whatever is left; never `ray stop`, which
kills every Ray process on the host.

`ray` is imported lazily (only the GCS probe needs it) so that the agent can launch
`ray start` before paying for the import.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from runtime_agent.ports import RayPorts

logger = logging.getLogger(__name__)

NODE_KEY_ENV = "CUMULUS_NODE_KEY"
OUTPUT_TAIL_LINES = 40


@dataclass(frozen=True)
class RaySpec:
    """What the control plane told this node to be (from the register response)."""

    role: str  # "head" | "worker"
    num_cpus: int
    num_gpus: int = 0
    memory_bytes: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_register(cls, body: dict[str, Any]) -> RaySpec:
        ray = body.get("ray") or {}
        return cls(
            role=str(body["role"]),
            num_cpus=int(ray.get("num_cpus", 1)),
            num_gpus=int(ray.get("num_gpus", 0)),
            memory_bytes=int(ray.get("memory_bytes", 0)),
            resources={str(k): float(v) for k, v in (ray.get("resources") or {}).items()},
            labels={str(k): str(v) for k, v in (ray.get("labels") or {}).items()},
        )


def ray_cli() -> list[str]:
    """The `ray` command of the interpreter running the agent (same Ray version by construction)."""
    script = os.path.join(os.path.dirname(sys.executable), "ray")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def build_start_command(
    *,
    spec: RaySpec,
    ports: RayPorts,
    node_ip: str,
    temp_dir: str,
    gcs_address: str | None = None,
    dashboard_host: str = "127.0.0.1",
) -> list[str]:
    """The full `ray start --block` command line for this node: every port explicit, no Ray default used."""
    cmd = [*ray_cli(), "start", "--block", "--disable-usage-stats"]
    if spec.role == "head":
        cmd += [
            "--head",
            f"--port={ports.gcs}",
            "--include-dashboard=true",
            f"--dashboard-host={dashboard_host}",
            f"--dashboard-port={ports.dashboard}",
            f"--ray-client-server-port={ports.client_server}",
        ]
    else:
        if not gcs_address:
            raise ValueError("a worker needs the head's gcs_address")
        cmd.append(f"--address={gcs_address}")
    cmd += [
        f"--node-ip-address={node_ip}",
        f"--temp-dir={temp_dir}",  # per node, also on workers (else they share the head's)
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
        f"--num-cpus={spec.num_cpus}",
        f"--num-gpus={spec.num_gpus}",
    ]
    if spec.memory_bytes > 0:
        cmd.append(f"--memory={spec.memory_bytes}")
        # Ray's default object store is 30% of the *host's* memory; several nodes share a
        # host here, so size it from this node's share instead (Ray's minimum is 75 MiB).
        cmd.append(f"--object-store-memory={max(int(spec.memory_bytes * 0.3), 80 * 1024 * 1024)}")
    if spec.resources:
        cmd.append(f"--resources={json.dumps(spec.resources, sort_keys=True)}")
    if spec.labels:
        cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(spec.labels.items())))
    return cmd


def build_start_env(*, node_key: str, ports: RayPorts, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of `ray start`: the node marker, plus the two metrics ports Ray takes only from env vars."""
    env = dict(os.environ if base is None else base)
    env[NODE_KEY_ENV] = node_key
    env["AUTOSCALER_METRIC_PORT"] = str(ports.autoscaler_metrics)
    env["DASHBOARD_METRIC_PORT"] = str(ports.dashboard_metrics)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Jobs run shell commands (`python train.py`): their `python` must be the one that runs Ray here,
    # with the bundled Ray importable, whatever else the host's PATH holds.
    bin_dir = os.path.dirname(sys.executable)
    path = env.get("PATH", os.defpath)
    if path.split(os.pathsep)[0] != bin_dir:
        env["PATH"] = bin_dir + os.pathsep + path
    return env


class RayProcess:
    """The `ray start --block` child: launch, watch output, stop."""

    def __init__(
        self, command: list[str], *, node_key: str, env: dict[str, str] | None = None, log_path: str | None = None,
    ) -> None:
        self.command = command
        self.env = env
        self.node_key = node_key
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        env = dict(self.env if self.env is not None else os.environ)
        env[NODE_KEY_ENV] = self.node_key
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: we can signal the whole node at once
        )
        self._reader = threading.Thread(target=self._pump, name="ray-output", daemon=True)
        self._reader.start()
        logger.info("ray.start.launched pid=%s", self.proc.pid)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - closed below
        try:
            for raw in self.proc.stdout:
                self._tail.append(raw.decode(errors="replace").rstrip("\n"))
                if log:
                    log.write(raw)
                    log.flush()
        finally:
            if log:
                log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        """The exit code, or None while running."""
        return self.proc.poll() if self.proc else None

    def output_tail(self, lines: int = 20) -> str:
        if self._reader is not None:
            self._reader.join(timeout=0.5)  # let the pump drain the last lines after an exit
        return "\n".join(list(self._tail)[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the `ray start --block` child, wait up to `grace_s`, then SIGKILL what is left of the node."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # session leader: pgid == pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("ray.stop.timeout pid=%s", self.proc.pid)
        deadline = time.monotonic() + 2.0
        leftovers = node_pids(self.node_key, exclude={os.getpid()})
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        if leftovers:
            logger.warning("ray.stop.killed_leftovers pids=%s", leftovers)
        logger.info("ray.stop.done code=%s", self.proc.returncode)


def node_pids(node_key: str, exclude: set[int] | None = None) -> list[int]:
    """PIDs of live processes whose environment carries `CUMULUS_NODE_KEY=node_key` (Linux /proc scan).

    Ray moves some children into other process groups, so the process group alone is not
    enough to find every process of the node.
    """
    marker = f"{NODE_KEY_ENV}={node_key}".encode()
    exclude = exclude or set()
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state in (b"Z", b"X"):
            continue
        if marker in env.split(b"\0"):
            found.append(int(entry))
    return found


class GcsProbe:
    """Reads node state from the GCS without `ray.init()` (cheap: well under 1 ms a call)."""

    def __init__(self, gcs_address: str) -> None:
        from ray._raylet import GcsClient  # lazy: importing ray costs ~0.3 s

        self.gcs_address = gcs_address
        self._client = GcsClient(address=gcs_address)

    @property
    def client(self) -> Any:
        """The `ray._raylet.GcsClient`, for other readers that should reuse the connection."""
        return self._client

    def alive_nodes(self, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """Every ALIVE node as {node_id, ip, node_manager_port}."""
        from ray.core.generated import gcs_pb2

        infos = self._client.get_all_node_info(timeout=timeout_s)
        alive = []
        for node_id, info in infos.items():
            if info.state != gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE:
                continue
            alive.append({
                "node_id": node_id.hex() if hasattr(node_id, "hex") else str(node_id),
                "ip": info.node_manager_address,
                "node_manager_port": info.node_manager_port,
            })
        return alive

    def find_node(self, ip: str, node_manager_port: int, timeout_s: float = 2.0) -> str | None:
        """This node's Ray id once it is ALIVE, matched by node-manager port (unique per host: we allocate it).

        Ray replaces a loopback `--node-ip-address` with the host's primary IP, so the IP is
        only a tie-breaker (same port on two hosts).
        """
        matches = [n for n in self.alive_nodes(timeout_s) if n["node_manager_port"] == node_manager_port]
        exact = [n for n in matches if n["ip"] == ip]
        chosen = exact or (matches if len(matches) == 1 else [])
        return str(chosen[0]["node_id"]) if chosen else None
