"""Run the whole control plane on one machine: web (gunicorn), Celery worker and beat.

Used by `make run` (through `manage.py run`), by the end-to-end tests and by the
benchmarks, so all three start the control plane exactly the same way. Local cluster
nodes are not children of these processes: they keep running when this stops, as cloud
machines would.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("web", "worker", "beat")


def _python() -> str:
    return sys.executable


def commands(port: int, queue: str, web_workers: int = 2, worker_threads: int = 8) -> dict[str, list[str]]:
    py = _python()
    return {
        "web": [py, "-m", "gunicorn", "controlplane.wsgi:application", "--bind", f"127.0.0.1:{port}",
                "--workers", str(web_workers), "--threads", "4", "--timeout", "60", "--graceful-timeout", "5",
                "--access-logfile", "-", "--log-level", "warning"],
        # Threads, not prefork: provisioning is I/O-bound, and one process is one PID to stop.
        "worker": [py, "-m", "celery", "-A", "controlplane", "worker", "--pool=threads",
                   f"--concurrency={worker_threads}", "--loglevel=INFO", "--without-gossip", "--without-mingle",
                   "-Q", queue],
        "beat": [py, "-m", "celery", "-A", "controlplane", "beat", "--loglevel=WARNING"],
    }


@dataclass
class ControlPlane:
    """The three processes of the control plane, started from `cwd` with `env`."""

    cwd: Path
    env: dict[str, str]
    port: int
    log_dir: Path | None = None  # None: inherit stdout/stderr
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, roles: tuple[str, ...] = ROLES) -> None:
        cmds = commands(self.port, queue=self.env.get("CUMULUS_QUEUE", "cumulus"))
        for role in roles:
            if role in self.procs and self.procs[role].poll() is None:
                continue
            out = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{role}.log", "ab")  # noqa: SIM115 - handed to the child
            self.procs[role] = subprocess.Popen(
                cmds[role], cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None,
            )
            if out is not None:
                out.close()

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:  # noqa: S310 - loopback
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the control plane did not answer on {self.url} within {timeout:.0f}s")

    def check_alive(self) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"the {role} process exited with code {proc.returncode}")

    def pid(self, role: str) -> int:
        return self.procs[role].pid

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        """Kill one role abruptly (fault injection)."""
        proc = self.procs.get(role)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def stop(self, roles: tuple[str, ...] = ROLES, timeout: float = 15.0) -> None:
        """Graceful stop: SIGTERM, then SIGKILL whatever is left after `timeout`."""
        running = [self.procs[r] for r in roles if r in self.procs and self.procs[r].poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
