"""`make run` as a newcomer meets it: `manage.py run` on a fresh data directory."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.e2e.harness import ROOT, free_port, with_default_sigint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def read_until(proc: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    """Lines of `proc`'s output up to the first that starts with `marker` (read in a thread: no busy wait)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line.startswith(marker):
            return seen
    raise AssertionError(f"no {marker!r} line within {timeout:.0f}s; output:\n" + "\n".join(seen))


def test_run_prints_a_working_token_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUMULUS_", "DJANGO_", "PYTEST_"))}
    env.pop("DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    env.update({"PORT": str(port), "CUMULUS_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen([sys.executable, "manage.py", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, preexec_fn=with_default_sigint)
    try:
        # given a fresh checkout's data directory, when `run` starts
        lines = read_until(proc, "API token: ", 90)
        token = lines[-1].split("API token: ", 1)[1].strip()
        children = psutil.Process(proc.pid).children(recursive=True)

        # then it printed the console URL and sign-in, and the token works against the API
        text = "\n".join(lines)
        assert f"http://127.0.0.1:{port}/" in text
        assert "Sign in:" in text and "admin@localhost" in text
        response = requests.get(f"http://127.0.0.1:{port}/api/v1/workspaces/",
                                headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code == 200
        assert [w["slug"] for w in response.json()["results"]] == ["default"]
        cmdlines = [" ".join(c.cmdline()) for c in children]
        assert any("gunicorn" in c for c in cmdlines), cmdlines
        assert any("celery" in c and " worker " in c for c in cmdlines), cmdlines
        assert any("celery" in c and " beat " in c for c in cmdlines), cmdlines

        # when Ctrl-C is pressed, then it exits and takes web, worker and beat with it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0
        _gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, [c.cmdline() for c in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
