"""End to end: the autoscaler grows a real cluster for waiting Ray work and shrinks it when idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.e2e.harness import ControlPlaneHarness, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

    @ray.remote(num_cpus=1)
    def work(seconds):
        start = time.time()
        time.sleep(seconds)
        return ray.get_runtime_context().get_node_id(), start

    refs = [work.remote(20) for _ in range(4)]
    print(json.dumps(ray.get(refs)), flush=True)
    """
)


def test_waiting_tasks_grow_the_cluster_in_one_decision_and_idle_workers_go(control_plane: ControlPlaneHarness):
    api = control_plane.api()
    # given a cluster of one 1-CPU head and no workers (up to 3), idle timeout 6 s
    api.create_cluster({
        "name": "elastic",
        "head": {"instance_type": "local.small"},
        "worker_groups": [{"name": "cpu", "instance_type": "local.small", "min_workers": 0, "max_workers": 3}],
        "idle_timeout_minutes": 0.1,
    })
    cluster = api.wait_status("elastic", "RUNNING", timeout=120)
    assert [n["role"] for n in api.nodes("elastic")] == ["head"]

    # when 4 one-CPU tasks of 20 s are submitted (the head runs one; three wait)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, cluster["ray_address"]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        # then three workers are launched in one decision and join
        wait_for(lambda: sum(n["role"] == "worker" for n in api.nodes("elastic")) == 3, 60,
                 what="three workers launched")
        out, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, err[-3000:]
    results = json.loads(out.strip().splitlines()[-1])
    worker_ray_ids = {n["ray_node_id"] for n in api.nodes("elastic", all=True) if n["role"] == "worker"}
    assert len({node for node, _ in results}) == 4, "each task ran on its own node"
    assert len({node for node, _ in results} & worker_ray_ids) == 3

    # and once the work is done and the idle timeout passes, the workers are drained and gone
    wait_for(lambda: [n["role"] for n in api.nodes("elastic")] == ["head"], 90, what="idle workers removed")
    events = api.events("elastic")
    scale_ups = [e for e in events if e.startswith("cpu: 0 → 3")]
    assert scale_ups == ["cpu: 0 → 3 for 3 pending {CPU: 1}"], events
    assert sum("READY → DRAINING" in e and "idle" in e for e in events) == 3, events
    assert sum("DRAINING → TERMINATING: drained" in e for e in events) == 3, events
    assert api.cluster("elastic")["status"] == "RUNNING"
    assert len(control_plane.machines(cluster["id"])) == 1
    assert api.request("DELETE", api.cluster_path("elastic")).status_code == 202
    api.wait_status("elastic", "TERMINATED", timeout=60)


SHAPES_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray
    from ray.util.placement_group import placement_group
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

    @ray.remote
    def where():
        return ray.get_runtime_context().get_node_id()

    # one task needs a GPU, one can never fit anywhere, and three bundles must land on distinct nodes
    gpu = where.options(num_gpus=1, num_cpus=0).remote()
    never = where.options(num_cpus=64).remote()
    pg = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    ready, _ = ray.wait([pg.ready()], timeout=150)
    spread = []
    if ready:
        spread = ray.get([where.options(num_cpus=1, scheduling_strategy=ray.util.scheduling_strategies
                                        .PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
                          .remote() for i in range(3)])
    print(json.dumps({"gpu": ray.get(gpu, timeout=150), "spread": spread, "pg_ready": bool(ready)}), flush=True)
    ray.cancel(never, force=True)
    """
)


def test_gpu_work_gets_the_gpu_type_infeasible_work_gets_an_event_and_spread_gets_distinct_nodes(
    control_plane: ControlPlaneHarness,
):
    api = control_plane.api()
    api.create_cluster({
        "name": "shapes",
        "head": {"instance_type": "local.small"},
        "worker_groups": [
            {"name": "cpu", "instance_type": "local.small", "min_workers": 0, "max_workers": 3},
            {"name": "gpu", "instance_type": "local.gpu", "min_workers": 0, "max_workers": 1},
        ],
        "idle_timeout_minutes": 5,
    })
    cluster = api.wait_status("shapes", "RUNNING", timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run([sys.executable, "-c", SHAPES_DRIVER, cluster["ray_address"]], capture_output=True,
                            text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    nodes = api.nodes("shapes")
    by_ray_id = {n["ray_node_id"]: n for n in nodes}
    # the GPU task ran on the GPU-advertising type, which was launched for it
    assert by_ray_id[out["gpu"]]["instance_type"] == "local.gpu"
    # the placement group got three distinct nodes
    assert out["pg_ready"] and len(set(out["spread"])) == 3
    events = api.events("shapes")
    assert any(e.startswith("gpu: 0 → 1") for e in events), events
    # the impossible task was reported, and nothing was launched for it
    infeasible = [e for e in events if "{CPU: 64}" in e]
    assert infeasible and "no worker type can ever fit" in infeasible[0], events
    assert sum(n["group"] == "cpu" for n in nodes) <= 3
    assert api.request("DELETE", api.cluster_path("shapes")).status_code == 202
    api.wait_status("shapes", "TERMINATED", timeout=90)
