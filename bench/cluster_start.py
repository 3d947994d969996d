"""How long from `POST clusters/` to RUNNING, beside bare `ray start` on the same machine.

    .venv/bin/python bench/cluster_start.py [--runs 5]

Runs, interleaved so that both sides see the same machine:
- bare: `ray start --head` until the CLI returns (the head is up), then `ray start --address`
  until it returns (the worker has joined); every port explicit, as our agent starts them;
- ours: a real control plane (gunicorn, Celery worker, beat; the embedded defaults unless
  DATABASE_URL / CELERY_BROKER_URL are set), `POST` a `local` cluster, poll until RUNNING,
  for head-only and head + 1 worker; then DELETE and wait for TERMINATED.
Prints a table and, last, `ratio cluster_start: X` = ours (head + 1 worker) / bare (head + worker).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.dev")

from clusters.providers.local import node_processes  # noqa: E402
from runtime_agent.ports import PortReservation  # noqa: E402
from runtime_agent.ray_node import RaySpec, build_start_command, build_start_env  # noqa: E402
from tests.e2e.harness import ControlPlaneHarness, wait_for  # noqa: E402

POLL_S = 0.05


def bare_node(role: str, tmp: Path, gcs: str | None = None) -> tuple[float, str, str]:
    """Start one bare Ray node (`ray start`, no --block) and time the CLI. Returns (seconds, key, gcs address)."""
    key = "bench-" + uuid.uuid4().hex[:12]
    temp_dir = f"/tmp/cumulus-ray/{key[-12:]}"  # noqa: S108 - short: unix socket paths
    with PortReservation() as reservation:
        ports = reservation.ray_ports()
        cmd = build_start_command(spec=RaySpec(role=role, num_cpus=1, memory_bytes=2 * 2**30), ports=ports,
                                  node_ip="127.0.0.1", temp_dir=temp_dir, gcs_address=gcs)
    cmd.remove("--block")
    env = build_start_env(node_key=key, ports=ports)
    started = time.monotonic()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"bare ray start failed: {result.stderr[-2000:]}")
    return took, key, gcs or f"127.0.0.1:{ports.gcs}"


def kill_bare(keys: list[str]) -> None:
    for key in keys:
        procs = node_processes(key)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
        shutil.rmtree(f"/tmp/cumulus-ray/{key[-12:]}", ignore_errors=True)  # noqa: S108


def ours(api, name: str, workers: int) -> float:
    spec = {
        "name": name,
        "head": {"instance_type": "local.small"},
        "worker_groups": [{"name": "cpu", "instance_type": "local.small", "min_workers": workers,
                           "max_workers": max(1, workers)}],
    }
    started = time.monotonic()
    api.create_cluster(spec)
    wait_for(lambda: api.cluster(name)["status"] == "RUNNING", 180, interval=POLL_S, what=f"{name} RUNNING")
    took = time.monotonic() - started
    assert api.request("DELETE", api.cluster_path(name)).status_code == 202
    wait_for(lambda: api.cluster(name)["status"] == "TERMINATED", 120, interval=0.2, what=f"{name} TERMINATED")
    return took


def row(label: str, values: list[float]) -> str:
    return (f"| {label:<44} | {statistics.median(values):6.2f} | {min(values):6.2f} | {max(values):6.2f} | "
            f"{len(values):2d} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cumulus-bench-"))
    harness = ControlPlaneHarness(tmp)
    results: dict[str, list[float]] = {k: [] for k in ("bare_head", "bare_worker", "bare_both", "ours_head",
                                                        "ours_both")}
    try:
        harness.start()
        api = harness.api()
        for run in range(args.runs):
            keys: list[str] = []
            try:
                head_s, key, gcs = bare_node("head", tmp)
                keys.append(key)
                worker_s, key, _ = bare_node("worker", tmp, gcs)
                keys.append(key)
            finally:
                kill_bare(keys)
            results["bare_head"].append(head_s)
            results["bare_worker"].append(worker_s)
            results["bare_both"].append(head_s + worker_s)
            results["ours_head"].append(ours(api, f"bench-head-{run}", 0))
            results["ours_both"].append(ours(api, f"bench-both-{run}", 1))
            print(f"run {run + 1}/{args.runs}: bare {head_s + worker_s:.2f}s, "
                  f"ours head {results['ours_head'][-1]:.2f}s, head+1 {results['ours_both'][-1]:.2f}s",
                  file=sys.stderr, flush=True)
    except BaseException:
        print(harness.logs(), file=sys.stderr)
        raise
    finally:
        harness.close()
        shutil.rmtree(tmp, ignore_errors=True)

    db = "PostgreSQL" if harness.db_name else "SQLite"
    broker = os.environ.get("CELERY_BROKER_URL", "cumulusfs://").split(":")[0]
    print(f"cluster start, {args.runs} runs, {os.cpu_count()} CPUs, Ray {__import__('ray').__version__}, "
          f"control plane on {db} + {broker} broker")
    print("| what (seconds)                               | median |    min |    max |  n |")
    print("|----------------------------------------------|--------|--------|--------|----|")
    print(row("bare `ray start --head` (CLI returns)", results["bare_head"]))
    print(row("bare `ray start --address` (CLI returns)", results["bare_worker"]))
    print(row("bare head then worker (sum)", results["bare_both"]))
    print(row("ours: POST → RUNNING, head only", results["ours_head"]))
    print(row("ours: POST → RUNNING, head + 1 worker", results["ours_both"]))
    ratio = statistics.median(results["ours_both"]) / statistics.median(results["bare_both"])
    print(f"ratio cluster_start: {ratio:.2f}")


if __name__ == "__main__":
    main()
