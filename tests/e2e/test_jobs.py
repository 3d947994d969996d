"""End to end: `cloudctl up`, then `cloudctl run` of a real project on a real local cluster (head + 1 worker).

The project has a gitignored data folder and a local module; output must stream back while the
script runs, the exit status must be the script's, and a project above Ray's 100 MiB upload cap
must run with remote tasks on the worker importing the project's own modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.harness import ROOT, ControlPlaneHarness, wait_for, with_default_sigint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CLOUDCTL = ROOT / ".venv" / "bin" / "cloudctl"
NAME = "laptop"

MAIN = """\
import sys, time
from lib.greeting import greet

print(greet("cluster"), flush=True)
print("data folder synced:", __import__("os").path.exists("data"), flush=True)
time.sleep(4)
print("done after the pause", flush=True)
print("to stderr", file=sys.stderr, flush=True)
"""

FAIL = """\
def inner():
    raise ValueError("the model diverged")

inner()
"""

REMOTE = """\
import os
import ray

ray.init()
head = ray.get_runtime_context().get_node_id()
workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]
assert workers, "no worker node in the cluster"

@ray.remote
def where():
    from lib.greeting import greet  # the project's own module, on the worker
    return greet("worker"), ray.get_runtime_context().get_node_id(), os.path.getsize("big.bin")

strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(workers[0], soft=False)
text, node, size = ray.get(where.options(scheduling_strategy=strategy).remote())
print(text, "on a worker:", node != head, "big.bin bytes:", size, flush=True)
"""


class Cli:
    def __init__(self, cwd: Path, xdg: Path) -> None:
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDCTL_")}
        self.env.update({"XDG_CONFIG_HOME": str(xdg), "XDG_CACHE_HOME": str(xdg / "cache"), "COLUMNS": "120",
                         "NO_COLOR": "1"})

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([str(CLOUDCTL), *args], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        print(f"$ cloudctl {' '.join(args)}  -> {result.returncode}\n{result.stdout}{result.stderr}")
        assert "Traceback (most recent call last)" not in result.stderr.split("\n", 1)[0]
        return result

    def timed(self, *args: str, timeout: float = 300) -> tuple[int, list[tuple[float, str]], str]:
        """Run and stamp each stdout line with the time it arrived: proves output streams live."""
        proc = subprocess.Popen([str(CLOUDCTL), *args], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        lines: list[tuple[float, str]] = []
        errors: list[str] = []
        reader = threading.Thread(target=lambda: errors.extend(proc.stderr))  # type: ignore[arg-type]
        reader.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
        code = proc.wait(timeout=timeout)
        reader.join()
        print(f"$ cloudctl {' '.join(args)}  -> {code}\n" + "\n".join(t for _, t in lines) + "\n" + "".join(errors))
        return code, lines, "".join(errors)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("laptop") / "proj"
    (root / "lib").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "cloud.yaml").write_text(yaml.safe_dump({
        "cluster": {"name": NAME, "provider": "local", "head": {"instance_type": "local.small"},
                    "worker_groups": [{"name": "cpu", "instance_type": "local.small", "min_workers": 1,
                                       "max_workers": 1}]},
        "job": {"env": {"STAGE": "e2e"}},
    }))
    (root / ".gitignore").write_text("data/\n__pycache__/\n")
    (root / "data" / "huge.csv").write_bytes(os.urandom(1024 * 1024))  # ignored: never uploaded
    (root / "lib" / "__init__.py").write_text("")
    (root / "lib" / "greeting.py").write_text("def greet(who):\n    return f'hello from the {who}'\n")
    (root / "main.py").write_text(MAIN)
    (root / "fail.py").write_text(FAIL)
    (root / "remote.py").write_text(REMOTE)
    return root


@pytest.fixture(scope="module")
def cli(project: Path, control_plane: ControlPlaneHarness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    cli = Cli(project, tmp_path_factory.mktemp("xdg"))
    login = cli("login", "--url", control_plane.plane.url, "--token", control_plane.token)
    assert login.returncode == 0, login.stderr
    up = cli("up")
    assert up.returncode == 0, up.stderr
    yield cli
    api = control_plane.api()
    api.request("DELETE", api.cluster_path(NAME))
    api.wait_status(NAME, "TERMINATED", timeout=120)


def test_run_streams_output_live_and_exits_with_the_scripts_status(cli: Cli, control_plane: ControlPlaneHarness):
    # when
    code, lines, errors = cli.timed("run", "--", "python", "main.py")
    # then: the remote output, live: the first line arrived well before the last (the script sleeps 4 s)
    assert code == 0, errors
    texts = [t for _, t in lines]
    assert "hello from the cluster" in texts
    assert "data folder synced: False" in texts  # gitignored: not part of the snapshot
    assert "done after the pause" in texts and "to stderr" in texts
    first = next(t for t, text in lines if text == "hello from the cluster")
    last = next(t for t, text in lines if text == "done after the pause")
    assert last - first >= 3.0, "the output arrived all at once, not as the script ran"
    assert "submitted to laptop" in errors

    # and: a script that raises exits non-zero and shows its traceback
    failed = cli("run", "--", "python", "fail.py")
    assert failed.returncode == 1
    assert "Traceback (most recent call last)" in failed.stdout
    assert "ValueError: the model diverged" in failed.stdout
    assert "FAILED with exit code 1" in failed.stderr

    # and: the exit status is the script's own
    code3 = cli("run", "--", "python", "-c", "import sys; print('bye'); sys.exit(3)")
    assert code3.returncode == 3 and "bye" in code3.stdout

    # and: `logs` replays a finished job; `logs -f` of a running one follows it to the end
    jobs = json.loads(cli("jobs", "list", "--json").stdout)
    first_job = next(j for j in jobs if j["entrypoint"] == "python main.py")
    replay = cli("logs", first_job["id"])
    assert replay.returncode == 0
    assert "hello from the cluster" in replay.stdout and "done after the pause" in replay.stdout
    detached = cli("run", "--detach", "--", "python", "main.py")
    assert detached.returncode == 0
    job_id = detached.stdout.strip()
    followed = cli("logs", job_id[:8], "-f")
    assert followed.returncode == 0
    assert followed.stdout.count("hello from the cluster") == 1 and "done after the pause" in followed.stdout
    assert control_plane.api().request("GET", f"/workspaces/e2e/jobs/{job_id}/").json()["status"] == \
        "SUCCEEDED"


def test_a_project_above_rays_upload_cap_runs_and_workers_import_its_modules(
    cli: Cli, project: Path, control_plane: ControlPlaneHarness,
):
    # given: 300 MB of project files (Ray's own working_dir upload stops at 100 MiB)
    big = project / "big.bin"
    with big.open("wb") as fh:
        for _ in range(300):
            fh.write(os.urandom(1_000_000))
    try:
        # when
        result = cli("run", "--", "python", "remote.py", timeout=600)
        # then
        assert result.returncode == 0, result.stderr
        assert "hello from the worker on a worker: True big.bin bytes: 300000000" in result.stdout
    finally:
        big.unlink()


def test_a_detached_job_is_stopped_with_jobs_stop(cli: Cli, control_plane: ControlPlaneHarness):
    detached = cli("run", "-d", "--", "python", "-c", "import time; print('working', flush=True); time.sleep(600)")
    job_id = detached.stdout.strip()
    api = control_plane.api()
    wait_for(lambda: api.request("GET", f"/workspaces/e2e/jobs/{job_id}/").json()["status"] == "RUNNING",
             timeout=60, what="the job to run")
    stopped = cli("jobs", "stop", job_id)
    assert stopped.returncode == 0
    final = wait_for(lambda: (j := api.request("GET", f"/workspaces/e2e/jobs/{job_id}/").json())["status"]
                     in ("STOPPED", "FAILED", "SUCCEEDED") and j, timeout=60, what="the job to stop")
    assert final["status"] == "STOPPED"
    followed = cli("logs", job_id, "-f")
    assert followed.returncode == 0 and "working" in followed.stdout


def test_ctrl_c_offers_to_stop_the_job(cli: Cli, control_plane: ControlPlaneHarness):
    import pty
    import select
    import signal

    # given: `cloudctl run` at a terminal, its job printing and then waiting
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [str(CLOUDCTL), "run", "--", "python", "-c", "import time; print('looping', flush=True); time.sleep(600)"],
        cwd=cli.cwd, env=cli.env, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
        preexec_fn=with_default_sigint)
    os.close(terminal)
    seen = b""

    def read_until(text: bytes, timeout: float) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, f"no {text!r} in {seen.decode(errors='replace')!r}"
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(controller, 4096)
                except OSError:
                    break

    try:
        read_until(b"looping", timeout=120)
        # when: Ctrl-C, and yes to the offer
        os.killpg(proc.pid, signal.SIGINT)
        read_until(b"Stop job", timeout=30)
        os.write(controller, b"y\n")
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    # then: the job is stopped on the cluster
    api = control_plane.api()
    jobs = api.request("GET", "/workspaces/e2e/jobs/").json()["results"]
    job = next(j for j in jobs if "looping" in j["entrypoint"])
    final = wait_for(lambda: (j := api.request("GET", f"/workspaces/e2e/jobs/{job['id']}/").json())["status"]
                     in ("STOPPED", "FAILED", "SUCCEEDED") and j, timeout=60, what="the job to stop")
    assert final["status"] == "STOPPED"
