"""End to end: real web server, Celery worker and beat, real agents, real Ray nodes.

Each test drives the public API the way a user does and checks what a user would notice:
statuses, nodes, events, a working Ray cluster, and that no process is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.harness import ControlPlaneHarness, node_pids, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def spec(name: str, min_workers: int = 1) -> dict:
    return {
        "name": name,
        "provider": "local",
        "head": {"instance_type": "local.small"},
        "worker_groups": [
            # max = min: these tests assert exact node sets, so the autoscaler must not add a worker
            # for the probe's tasks (autoscaling has its own tests).
            {"name": "cpu", "instance_type": "local.small", "min_workers": min_workers, "max_workers": min_workers}
        ],
        "idle_timeout_minutes": 5,
    }


RAY_PROBE = textwrap.dedent(
    """
    import json, sys
    import ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    nodes = sorted(set(ray.get([where.remote() for _ in range(4)])))
    print(json.dumps({"alive": alive, "task_nodes": nodes, "answer": ray.get(ray.remote(lambda: 6 * 7).remote())}))
    """
)


def ray_probe(address: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run([sys.executable, "-c", RAY_PROBE, address], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def cluster_pids(nodes: list[dict]) -> dict[str, set[int]]:
    return {n["name"]: node_pids(n["id"]) for n in nodes}


def test_create_run_task_and_delete_leaves_nothing(control_plane: ControlPlaneHarness) -> None:
    api = control_plane.api()
    # given a head + 1 worker cluster, created with one REST call
    created = api.create_cluster(spec("life"))
    assert created["status"] == "PENDING"

    # when it comes up
    cluster = api.wait_status("life", "RUNNING", timeout=120)

    # then Ray sees both nodes alive and runs tasks on them
    nodes = api.nodes("life")
    assert sorted(n["name"] for n in nodes) == ["cpu-1", "head-1"]
    assert all(n["state"] == "READY" for n in nodes)
    probe = ray_probe(cluster["ray_address"])
    assert probe["answer"] == 42
    assert sorted(probe["alive"]) == sorted(n["ray_node_id"] for n in nodes)
    pids = cluster_pids(nodes)
    assert all(pids.values()), pids
    assert cluster["dashboard_url"].startswith("http://")
    assert len(control_plane.machines(cluster["id"])) == 2

    # when it is deleted
    response = api.request("DELETE", api.cluster_path("life"))
    assert response.status_code == 202
    api.wait_status("life", "TERMINATED", timeout=60)

    # then every node is TERMINATED and no process of the cluster remains
    assert {n["state"] for n in api.nodes("life", all=True)} == {"TERMINATED"}
    assert control_plane.machines(cluster["id"]) == []
    leftover = {name: {p for p in group if _alive(p)} for name, group in pids.items()}
    assert not any(leftover.values()), f"processes left behind: {leftover}"
    events = api.events("life")
    assert any("RUNNING" in e for e in events) and events[-1].endswith("TERMINATING → TERMINATED")


def test_sigkilled_worker_is_lost_replaced_and_cluster_recovers(control_plane: ControlPlaneHarness) -> None:
    api = control_plane.api()
    api.create_cluster(spec("heal"))
    api.wait_status("heal", "RUNNING", timeout=120)
    worker = next(n for n in api.nodes("heal") if n["role"] == "worker")

    # when the worker's whole process tree is killed with SIGKILL
    victims = node_pids(worker["id"])
    assert victims
    for pid in victims:
        _kill(pid)

    # then it is marked LOST, a replacement is launched, and the cluster is RUNNING again
    def replaced() -> bool:
        nodes = api.nodes("heal", all=True)
        old = next(n for n in nodes if n["id"] == worker["id"])
        new = [n for n in nodes if n["role"] == "worker" and n["id"] != worker["id"] and n["state"] == "READY"]
        return old["state"] == "TERMINATED" and len(new) == 1

    wait_for(replaced, 120, what="the lost worker to be replaced")
    cluster = api.wait_status("heal", "RUNNING", timeout=60)
    events = "\n".join(api.events("heal"))
    assert f"Node {worker['name']} READY → LOST" in events
    assert f"to replace {worker['name']}" in events
    assert "Cluster RUNNING → UPDATING" in events and "Cluster UPDATING → RUNNING" in events
    assert len(control_plane.machines(cluster["id"])) == 2
    assert len(ray_probe(cluster["ray_address"])["task_nodes"]) >= 1
    _delete_and_wait(api, "heal")


def test_worker_killed_during_provisioning_converges_without_leaks(control_plane: ControlPlaneHarness) -> None:
    api = control_plane.api()
    plane = control_plane.plane
    # given a cluster whose provisioning has just begun
    created = api.create_cluster(spec("crash"))
    wait_for(lambda: api.nodes("crash"), 30, interval=0.02, what="the first node rows")

    # when the Celery worker is killed outright, mid-provisioning, and started again
    plane.kill("worker", signal.SIGKILL)
    plane.start(("worker",))

    # then the cluster reaches RUNNING with exactly the desired nodes, and nothing leaked
    api.wait_status("crash", "RUNNING", timeout=150)
    live = [n for n in api.nodes("crash") if n["state"] != "TERMINATED"]
    assert sorted(n["name"] for n in live) == ["cpu-1", "head-1"], "\n".join(api.events("crash"))
    machines = control_plane.machines(created["id"])
    assert sorted(m.node_key for m in machines) == sorted(n["id"] for n in live)
    _delete_and_wait(api, "crash")


def test_control_plane_restart_adopts_running_nodes(control_plane: ControlPlaneHarness) -> None:
    api = control_plane.api()
    plane = control_plane.plane
    api.create_cluster(spec("adopt"))
    api.wait_status("adopt", "RUNNING", timeout=120)
    before = api.nodes("adopt", all=True)
    pids = cluster_pids(before)

    # when web, worker and beat all stop and start again
    plane.stop()
    plane.start()
    plane.wait_healthy()

    # then the same nodes are READY and heartbeating, the same processes run, nothing was replaced
    restarted_at = datetime.now(UTC)
    # Two sweep periods after the restart, so the reconciler has looked at the cluster.
    settled_at = restarted_at + timedelta(seconds=2 * float(control_plane.env["CUMULUS_SWEEP_INTERVAL_S"]) + 1)

    def heartbeats_after(moment: datetime) -> bool:
        nodes = api.nodes("adopt", all=True)
        return all(datetime.fromisoformat(n["last_heartbeat_at"]) > moment for n in nodes)

    wait_for(lambda: heartbeats_after(restarted_at), 30, what="heartbeats after the restart")
    wait_for(lambda: heartbeats_after(settled_at), 30, what="heartbeats after two sweeps")
    after = api.nodes("adopt", all=True)
    assert [(n["id"], n["state"]) for n in after] == [(n["id"], "READY") for n in before]
    assert api.cluster("adopt")["status"] == "RUNNING"
    assert cluster_pids(after) == pids
    _delete_and_wait(api, "adopt")


def _delete_and_wait(api, name: str) -> None:
    assert api.request("DELETE", api.cluster_path(name)).status_code == 202
    api.wait_status(name, "TERMINATED", timeout=60)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
