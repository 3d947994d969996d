"""Free-port allocation for a Ray node that shares its host with other Ray nodes.

Several Ray nodes can run on one host (the `local` provider), and port 6379 and friends
may already belong to something else, so the agent never relies on Ray's defaults: it
picks every port itself. Ports come from ranges below the Linux ephemeral range
(32768-60999 by default), so an outgoing connection cannot grab one of them between the
check and Ray's bind. Each candidate is verified free by binding it; the sockets stay
bound (without listening) until just before `ray start`, so one agent never hands out
the same port twice, and random choice makes a clash between two agents unlikely. A
clash that still happens makes `ray start` fail early, and the agent retries with new
ports (see `agent.py`).
"""

from __future__ import annotations

import contextlib
import random
import socket
from dataclasses import dataclass, fields

SINGLE_PORT_RANGE = (20000, 32000)  # [lo, hi): GCS, dashboard, managers, agents, metrics
WORKER_PORT_RANGE = (10000, 20000)  # [lo, hi): blocks of worker ports
WORKER_PORT_BLOCK = 64


class PortAllocationError(RuntimeError):
    """No free port (or port block) could be found after many tries."""


@dataclass(frozen=True)
class RayPorts:
    """Every port a Ray node opens. `gcs`, `dashboard` and `client_server` matter on the head only."""

    gcs: int
    dashboard: int
    client_server: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    metrics_export: int
    runtime_env_agent: int
    node_manager: int
    object_manager: int
    # Not `ray start` flags: Ray reads these two from env vars (defaults 44217 / 44227, fixed).
    autoscaler_metrics: int
    dashboard_metrics: int
    min_worker: int
    max_worker: int

    def single_ports(self) -> list[int]:
        """All individually allocated ports (not the worker block)."""
        return [getattr(self, f.name) for f in fields(self) if f.name not in ("min_worker", "max_worker")]


def _try_bind(port: int, host: str = "") -> socket.socket | None:
    """Bind `port` on all interfaces (and therefore on `host`); return the socket or None when taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # No SO_REUSEADDR: a port in TIME_WAIT or bound by anyone counts as taken.
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


class PortReservation:
    """Holds verified-free ports bound until `release()` (call it right before starting Ray)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.SystemRandom()
        self._sockets: list[socket.socket] = []
        self._taken: set[int] = set()

    def port(self, lo: int = SINGLE_PORT_RANGE[0], hi: int = SINGLE_PORT_RANGE[1], tries: int = 200) -> int:
        """Reserve one free port in [lo, hi)."""
        for _ in range(tries):
            candidate = self._rng.randrange(lo, hi)
            if candidate in self._taken:
                continue
            sock = _try_bind(candidate)
            if sock is not None:
                self._hold(candidate, sock)
                return candidate
        raise PortAllocationError(f"no free port in [{lo}, {hi}) after {tries} tries")

    def block(
        self, size: int = WORKER_PORT_BLOCK, lo: int = WORKER_PORT_RANGE[0], hi: int = WORKER_PORT_RANGE[1],
        tries: int = 100,
    ) -> tuple[int, int]:
        """Reserve `size` consecutive free ports in [lo, hi); return (first, last) inclusive."""
        slots = (hi - lo) // size
        for _ in range(tries):
            first = lo + self._rng.randrange(slots) * size  # aligned blocks: two agents either clash fully or not
            ports = range(first, first + size)
            if self._taken.intersection(ports):
                continue
            held: list[tuple[int, socket.socket]] = []
            for p in ports:
                sock = _try_bind(p)
                if sock is None:
                    break
                held.append((p, sock))
            if len(held) == size:
                for p, sock in held:
                    self._hold(p, sock)
                return first, first + size - 1
            for _, sock in held:
                sock.close()
        raise PortAllocationError(f"no free block of {size} ports in [{lo}, {hi}) after {tries} tries")

    def ray_ports(self) -> RayPorts:
        """Reserve a full set of ports for one Ray node."""
        singles = [self.port() for _ in range(11)]
        first, last = self.block()
        return RayPorts(*singles, min_worker=first, max_worker=last)

    def release(self) -> None:
        """Close every held socket so that Ray can bind the ports."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets.clear()

    def _hold(self, port: int, sock: socket.socket) -> None:
        self._taken.add(port)
        self._sockets.append(sock)

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def allocate_ray_ports() -> RayPorts:
    """Pick a free set of Ray ports (released immediately; prefer `PortReservation` to hold them)."""
    with PortReservation() as reservation:
        return reservation.ray_ports()
