"""The runtime agent's state machine and main loop.

States reported to the control plane::

    (register) -> starting_ray (head) | waiting_for_head (worker) --join--> starting_ray
    starting_ray -> ready            this node is ALIVE in the GCS
    any -> failed                    `ray start --block` exited on its own; the agent exits 1
    any -> stopping                  a stop/drain command or SIGTERM; Ray is stopped, exit 0

One thread runs the loop (heartbeats, commands, watching the Ray child); a second one
polls the GCS every 50 ms while Ray starts, so that "ready" is reported the moment it is
true. Heartbeats go out at once on every state change and otherwise every
`heartbeat_interval_s` of the latest response.

When the control plane is unreachable the agent backs off (jittered, capped at 5 s) and
keeps Ray running; it never drops its identity.

The head's heartbeat carries the Ray cluster's load (runtime_agent/load.py). Every
`LOAD_CHECK_S` the head also looks at what is waiting (one sub-millisecond GCS call) and
heartbeats at once when a pending shape or placement group appears that was neither
waiting at the previous check nor in the last heartbeat: the autoscaler's fast path, which
does not wait for the interval. It covers "nothing waited, now something does", and each
new demand wakes the loop once, so it adds at most about one heartbeat per GCS refresh (1 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import signal
import socket
import threading
import time
import urllib.parse
from typing import Any

from runtime_agent.client import AgentClient, Backoff, ProtocolError, Unauthorized, Unreachable
from runtime_agent.identity import AgentConfig, Identity, load_identity, save_identity
from runtime_agent.jobs import ArchiveServer, BlobCache, JobManager, NodeContext
from runtime_agent.load import LoadReader, demand_signature, load_signature
from runtime_agent.ports import PortReservation, RayPorts
from runtime_agent.ray_node import GcsProbe, RayProcess, RaySpec, build_start_command, build_start_env, node_pids

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNAUTHORIZED = 2

UNAUTHORIZED_RETRY_S = 15.0
READY_POLL_S = 0.05
LOOP_TICK_S = 0.1  # how often the loop checks the Ray child
START_ATTEMPTS = 2  # a port clash with another node makes `ray start` fail early: retry once
LOAD_CHECK_S = 0.25  # the head's check for new pending demand (the GCS refreshes it once a second)
LOAD_ERROR_PAUSE_S = 2.0  # after a failed check, before the next one


def detect_address(control_plane_url: str) -> str:
    """The local IP that routes to the control plane (no packet is sent: UDP connect only picks a route)."""
    host = urllib.parse.urlsplit(control_plane_url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, 9))
            return str(sock.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def ray_version() -> str:
    try:
        return importlib.metadata.version("ray")  # no `import ray`: that costs ~0.3 s
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class BootLock:
    """A host-wide, non-blocking file lock (fcntl): released by the kernel if the agent dies."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._since = 0.0
        self._mutex = threading.Lock()

    def acquire(self) -> bool:
        if self.path is None:
            return True
        with self._mutex:
            if self._fd is not None:
                return True
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._fd, self._since = fd, time.monotonic()
            return True

    def held_for(self) -> float:
        return time.monotonic() - self._since if self._fd is not None else 0.0

    def release(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)  # closing the descriptor drops the lock
                self._fd = None


class Agent:
    """One node's agent. `run()` returns the process exit code."""

    def __init__(self, config: AgentConfig, client: AgentClient | None = None) -> None:
        self.config = config
        self.client = client or AgentClient(config.control_plane_url)
        self.address = config.address or detect_address(config.control_plane_url)
        self.identity: Identity | None = None
        self.spec: RaySpec | None = None
        self.heartbeat_interval_s = 5.0

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._state = "starting"
        self._message = ""
        self._stop_reason: str | None = None
        self._stop_is_command = False

        self.ray: RayProcess | None = None
        self.ports: RayPorts | None = None
        self.gcs_address: str | None = None
        self.ray_node_id: str | None = None
        self.dashboard_url: str | None = None
        self._probe: GcsProbe | None = None
        self._start_attempts = 0
        self._pending_start: tuple[str | None] | None = None
        self._boot_lock = BootLock(config.boot_lock)
        self._load_reader: LoadReader | None = None
        self._demand_checked: frozenset = frozenset()  # what was waiting at the last check
        self._demand_sent: frozenset = frozenset()  # what was waiting in the last heartbeat's load
        self._next_load_check = 0.0
        self._jobs: JobManager | None = None

    # -- state --------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    def set_state(self, state: str, message: str = "") -> None:
        with self._lock:
            changed = (state, message) != (self._state, self._message)
            self._state, self._message = state, message
        if changed:
            logger.info("agent.state state=%s message=%s", state, message[:200])
            self._wake.set()  # heartbeat now, not at the next interval

    def request_stop(self, reason: str, *, command: bool = False) -> None:
        """Ask the loop to stop Ray and exit 0 (signal handler, or a stop/drain command)."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
                self._stop_is_command = command
        self._wake.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            self.request_stop(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- registration ---------------------------------------------------------------------

    def ensure_identity(self) -> int | None:
        """Load the saved identity or register. Returns an exit code when the agent must stop."""
        saved = load_identity(self.config.state_dir)
        if saved is not None:
            logger.info("agent.identity.reused node_id=%s", saved.node_id)
            self._adopt(saved)
            self._kill_stale_ray()
            return None
        body = {
            "bootstrap_token": self.config.bootstrap_token,
            "hostname": socket.gethostname(),
            "address": self.address,
            "agent_pid": os.getpid(),
            "ray_version": ray_version(),
        }
        backoff = Backoff()
        while self._stop_reason is None:
            try:
                response = self.client.register(body)
                identity = Identity(
                    node_id=str(response["node_id"]), node_token=str(response["node_token"]), registration=response,
                )
            except Unauthorized as exc:
                logger.error("agent.register.refused %s", exc)
                return EXIT_UNAUTHORIZED  # a used or unknown bootstrap token can never become valid
            except (Unreachable, ProtocolError, KeyError) as exc:
                delay = backoff.next_delay()
                logger.warning("agent.register.retry error=%s delay_s=%.2f", exc, delay)
                self._wake.wait(delay)
                self._wake.clear()
                continue
            save_identity(self.config.state_dir, identity)
            logger.info("agent.register.ok node_id=%s role=%s", identity.node_id, response.get("role"))
            self._adopt(identity)
            return None
        return EXIT_OK

    def _adopt(self, identity: Identity) -> None:
        self.identity = identity
        self.spec = RaySpec.from_register(identity.registration)
        self.heartbeat_interval_s = float(identity.registration.get("heartbeat_interval_s", 5.0))

    def _kill_stale_ray(self) -> None:
        """After an agent restart, a Ray node from the previous run may still hold our ports: end it."""
        stale = node_pids(self.config.node_key, exclude={os.getpid(), os.getppid()})
        for pid in stale:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if stale:
            logger.warning("agent.ray.stale_killed pids=%s", stale)

    # -- Ray ------------------------------------------------------------------------------

    def start_ray(self, gcs_address: str | None) -> None:
        """Start Ray now, or as soon as this host's boot lock is free (see AgentConfig.boot_lock)."""
        self._pending_start = (gcs_address,)
        self._try_pending_start()

    def _try_pending_start(self) -> None:
        if self._pending_start is None:
            return
        if self.config.boot_lock and not self._boot_lock.acquire():
            if self._state != "starting_ray":
                self.set_state("starting_ray", "waiting for another node on this host to finish booting")
            return
        (gcs_address,) = self._pending_start
        self._pending_start = None
        self._launch_ray(gcs_address)

    def _launch_ray(self, gcs_address: str | None) -> None:
        """Reserve ports, launch `ray start --block`, and poll the GCS for readiness in the background."""
        assert self.spec is not None
        self._start_attempts += 1
        os.makedirs(self.config.temp_dir, exist_ok=True)
        with PortReservation() as reservation:
            ports = reservation.ray_ports()
            command = build_start_command(
                spec=self.spec, ports=ports, node_ip=self.address, temp_dir=self.config.temp_dir,
                gcs_address=gcs_address, dashboard_host=self.config.dashboard_host,
            )
        # The reservation is released here, right before Ray binds the ports.
        self.ports = ports
        if self.spec.role == "head":
            self.gcs_address = f"{self.address}:{ports.gcs}"
            self.dashboard_url = f"http://{self.config.dashboard_host}:{ports.dashboard}"
        else:
            self.gcs_address = gcs_address
        self.ray = RayProcess(
            command,
            node_key=self.config.node_key,
            env=build_start_env(node_key=self.config.node_key, ports=ports),
            log_path=os.path.join(self.config.state_dir, "ray-start.log"),
        )
        self.ray.start()
        self.set_state("starting_ray", f"ray start launched (pid {self.ray.pid})")
        threading.Thread(target=self._watch_ready, args=(self.ray, ports), name="ray-ready", daemon=True).start()

    def _watch_ready(self, ray: RayProcess, ports: RayPorts) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        assert self.gcs_address is not None
        while time.monotonic() < deadline and ray.poll() is None and self._stop_reason is None:
            try:
                if self._probe is None:
                    self._probe = GcsProbe(self.gcs_address)
                node_id = self._probe.find_node(self.address, ports.node_manager, timeout_s=1.0)
            except Exception as exc:  # the GCS is not up yet: every error here means "not yet"
                logger.debug("agent.ready.probe error=%s", exc)
                node_id = None
            if node_id and ray is self.ray:
                self.ray_node_id = node_id
                self._boot_lock.release()
                self.set_state("ready", "")
                return
            if self._boot_lock.held_for() > self.config.boot_lock_max_hold_s:
                self._boot_lock.release()  # a slow boot must not hold up every other node for ever
            time.sleep(READY_POLL_S)
        self._boot_lock.release()
        if ray.poll() is None and self._stop_reason is None and time.monotonic() >= deadline:
            logger.error("agent.ready.timeout")
            self.set_state("starting_ray", f"not ALIVE in the GCS after {self.config.ready_timeout_s:.0f} s")

    def _check_ray_exit(self) -> int | None:
        """When the Ray child has exited on its own: retry a failed start once, else report `failed`."""
        if self.ray is None or self._stop_reason is not None:
            return None
        code = self.ray.poll()
        if code is None:
            return None
        tail = self.ray.output_tail()
        if self._state == "starting_ray" and self._start_attempts < START_ATTEMPTS:
            logger.warning("agent.ray.start_failed_retrying code=%s tail=%s", code, tail[-500:])
            self.ray.stop(grace_s=1.0)  # reap leftovers of the failed attempt
            self._probe = None
            self.start_ray(self.gcs_address if self.spec and self.spec.role == "worker" else None)
            return None
        logger.error("agent.ray.exited code=%s", code)
        self.ray.stop(grace_s=1.0)
        self.set_state("failed", f"ray start exited with code {code}:\n{tail}")
        self._send_final_heartbeat(tries=3)
        return EXIT_FAILED

    # -- load (head only) -----------------------------------------------------------------

    def _head_ready(self) -> bool:
        return self.spec is not None and self.spec.role == "head" and self._state == "ready" and self._probe is not None

    def _reader(self) -> LoadReader | None:
        if self._load_reader is None and self._probe is not None:
            self._load_reader = LoadReader(self._probe.client)
        return self._load_reader

    def read_load(self) -> dict[str, Any] | None:
        """The Ray cluster's load for the heartbeat; None when the GCS does not answer."""
        reader = self._reader()
        if reader is None:
            return None
        try:
            load = reader.read()
        except Exception as exc:  # a slow GCS must not block the heartbeat
            logger.warning("agent.heartbeat.load_failed error=%s", exc)
            return None
        self._demand_sent = load_signature(load)
        return load

    def check_new_demand(self) -> bool:
        """True when something waits that was neither waiting at the last check nor in the last heartbeat."""
        reader = self._reader()
        if reader is None:
            return False
        try:
            current = demand_signature(reader.state())
        except Exception as exc:
            logger.debug("agent.load.check_failed error=%s", exc)
            self._next_load_check = time.monotonic() + LOAD_ERROR_PAUSE_S
            return False
        new = current - self._demand_checked - self._demand_sent
        self._demand_checked = current
        return bool(new)

    def _maybe_fast_heartbeat(self, now: float) -> None:
        if now < self._next_load_check or not self._head_ready():
            return
        self._next_load_check = now + LOAD_CHECK_S
        if self.check_new_demand():
            logger.info("agent.load.new_demand heartbeat=now")
            self._wake.set()

    # -- heartbeats -----------------------------------------------------------------------

    def heartbeat_body(self) -> dict[str, Any]:
        with self._lock:
            state, message = self._state, self._message
        alive: list[str] = []
        load: dict[str, Any] | None = None
        if self.spec is not None and self.spec.role == "head" and state == "ready" and self._probe is not None:
            try:
                alive = [str(n["node_id"]) for n in self._probe.alive_nodes(timeout_s=1.0)]
            except Exception as exc:  # a slow GCS must not block the heartbeat
                logger.warning("agent.heartbeat.alive_nodes_failed error=%s", exc)
            load = self.read_load()
        ready = state == "ready"
        return {
            "state": state,
            "message": message,
            "ray": {
                "node_id": self.ray_node_id if ready else None,
                "gcs_address": self.gcs_address if ready else None,
                "dashboard_url": self.dashboard_url if ready else None,
                "alive_node_ids": alive,
                "load": load,
            },
        }

    def send_heartbeat(self, timeout_s: float | None = None) -> dict[str, Any]:
        assert self.identity is not None
        body = self.heartbeat_body()
        try:
            return self.client.heartbeat(self.identity.node_id, self.identity.node_token, body, timeout_s=timeout_s)
        except ProtocolError as exc:
            if body["ray"]["load"] is None:
                raise
            # A load the control plane refuses must not cost the node its liveness: resend without it.
            logger.error("agent.heartbeat.load_refused error=%s", exc)
            body["ray"]["load"] = None
            return self.client.heartbeat(self.identity.node_id, self.identity.node_token, body, timeout_s=timeout_s)

    def job_manager(self) -> JobManager:
        """The head's job runners (runtime_agent/jobs.py), created on the first job."""
        if self._jobs is None:
            assert self.identity is not None
            jobs_dir = os.path.join(self.config.state_dir, "jobs")
            self._jobs = JobManager(NodeContext(
                client=self.client, node_id=self.identity.node_id, node_token=self.identity.node_token,
                address=self.address, ray_temp_dir=self.config.temp_dir, dashboard_url=lambda: self.dashboard_url,
                cache=BlobCache(os.path.join(jobs_dir, "blobs")), archives=os.path.join(jobs_dir, "archives"),
                server=ArchiveServer(os.path.join(jobs_dir, "archives"), self.address),
            ))
        return self._jobs

    def handle_response(self, response: dict[str, Any]) -> None:
        interval = response.get("heartbeat_interval_s")
        if isinstance(interval, int | float) and interval > 0:
            self.heartbeat_interval_s = float(interval)
        commands = [c for c in response.get("commands") or [] if isinstance(c, dict)]
        jobs = [c.get("job") for c in commands if c.get("type") == "run_job"]
        if jobs or self._jobs is not None:
            self.job_manager().reconcile(jobs)
        for command in response.get("commands") or []:
            kind = command.get("type") if isinstance(command, dict) else None
            logger.info("agent.command type=%s", kind)
            if kind == "join":
                self._on_join(str(command.get("gcs_address") or ""))
            elif kind == "stop":
                self.request_stop(f"stop: {command.get('reason', '')}", command=True)
            elif kind == "drain":
                self.drain(str(command.get("reason", "")))
            elif kind == "run_job":
                pass  # handled above, all at once
            else:
                logger.warning("agent.command.unknown command=%s", command)

    def drain(self, reason: str) -> None:
        """Scale-down: ask Ray to let this node go, then stop. Ray may refuse while the node still
        holds work (a rejectable DrainNode, as Ray's own autoscaler v2 uses); then the node stays
        and says so, and the control plane puts it back in service."""
        if self._stop_reason is not None:
            return
        if self._probe is None or not self.ray_node_id:
            self.request_stop(f"drain: {reason}", command=True)  # not in Ray (yet): nothing to hand back
            return
        try:
            from ray.core.generated import autoscaler_pb2

            accepted, rejection = self._probe.client.drain_node(
                self.ray_node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_IDLE_TERMINATION"),
                reason or "idle", 0,
            )
        except Exception as exc:  # the GCS is unreachable: the head is gone, so is the work
            logger.warning("agent.drain.failed error=%s", exc)
            accepted, rejection = True, ""
        if accepted:
            logger.info("agent.drain.accepted reason=%s", reason)
            self.request_stop(f"drain: {reason}", command=True)
        else:
            logger.info("agent.drain.rejected reason=%s", rejection)
            self.set_state("ready", f"drain rejected: {rejection}")

    def _on_join(self, gcs_address: str) -> None:
        if self.spec is None or self.spec.role != "worker":
            return  # the head never joins anyone
        if self.ray is not None or not gcs_address:
            return  # already joining or joined (the command repeats until we report ready)
        self.start_ray(gcs_address)

    def _send_final_heartbeat(self, tries: int) -> None:
        for attempt in range(tries):
            try:
                self.send_heartbeat(timeout_s=2.0)
                return
            except (Unreachable, Unauthorized, ProtocolError) as exc:
                logger.warning("agent.heartbeat.final_failed attempt=%s error=%s", attempt + 1, exc)
                if attempt + 1 < tries:
                    time.sleep(0.3)

    def _next_period(self) -> float:
        if self._state == "waiting_for_head":
            return min(self.heartbeat_interval_s, self.config.waiting_poll_s)  # join latency counts
        return self.heartbeat_interval_s

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        code = self.ensure_identity()
        if code is not None:
            return code
        assert self.spec is not None
        if self.spec.role == "head":
            self.start_ray(None)
        else:
            self.set_state("waiting_for_head", "waiting for the head's address")
        backoff = Backoff()
        next_beat = 0.0  # at once
        while True:
            if self._stop_reason is not None:
                return self.shutdown()
            exit_code = self._check_ray_exit()
            if exit_code is not None:
                return exit_code
            self._try_pending_start()
            now = time.monotonic()
            self._maybe_fast_heartbeat(now)
            if self._wake.is_set() or now >= next_beat:
                self._wake.clear()
                if self._stop_reason is not None:
                    continue
                try:
                    response = self.send_heartbeat()
                except Unreachable as exc:
                    delay = backoff.next_delay()
                    logger.warning("agent.heartbeat.unreachable error=%s retry_s=%.2f", exc, delay)
                    next_beat = time.monotonic() + delay
                except Unauthorized as exc:
                    logger.error("agent.heartbeat.unauthorized %s retry_s=%s", exc, UNAUTHORIZED_RETRY_S)
                    next_beat = time.monotonic() + UNAUTHORIZED_RETRY_S
                except ProtocolError as exc:
                    logger.error("agent.heartbeat.protocol_error %s", exc)
                    next_beat = time.monotonic() + min(self.heartbeat_interval_s, 5.0)
                else:
                    backoff.reset()
                    self.handle_response(response)
                    next_beat = time.monotonic() + self._next_period()
            self._wake.wait(max(0.0, min(LOOP_TICK_S, next_beat - time.monotonic())))

    def shutdown(self) -> int:
        """Stop Ray gracefully, tell the control plane, exit 0."""
        logger.info("agent.stop reason=%s", self._stop_reason)
        with self._lock:
            self._state, self._message = "stopping", self._stop_reason or ""
        if self.ray is not None:
            self.ray.stop(grace_s=self.config.stop_grace_s)
        if self._jobs is not None:
            self._jobs.close()
        if self.identity is not None:
            self._send_final_heartbeat(tries=3 if self._stop_is_command else 1)
        logger.info("agent.stopped")
        return EXIT_OK
