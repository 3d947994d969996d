"""A real Ray head with real pending work: what its agent's heartbeats report as the cluster's load."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from clusters.agent_api.views import RayLoad
from clusters.providers.local import LocalProvider
from tests.e2e.harness import wait_for
from tests.runtime_agent.conftest import FakeControlPlane, FakeNode
from tests.runtime_agent.test_protocol_e2e import launch

pytestmark = pytest.mark.e2e

# Submits work the 1-CPU head cannot run, prints when done, then holds it until killed.
DRIVER = """
import sys, time
import ray
from ray.util.placement_group import placement_group

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=1)
def sleeper(seconds):
    time.sleep(seconds)

running = sleeper.remote(60)
waiting = [sleeper.remote(60) for _ in range(3)]
gpu = sleeper.options(num_cpus=0, num_gpus=1).remote(1)
pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
print("SUBMITTED", time.time(), pg.id.hex(), flush=True)
time.sleep(600)
"""


def loads_since(node: FakeNode, since: float) -> list[tuple[float, dict[str, Any]]]:
    return [(t, b["ray"]["load"]) for t, b in list(node.heartbeats) if t >= since and b["ray"].get("load")]


def accepted(load: dict[str, Any]) -> bool:
    """The control plane's validator takes the report as it is."""
    serializer = RayLoad(data=load)
    assert serializer.is_valid(), serializer.errors
    return True


def has_demand(load: dict[str, Any]) -> bool:
    pending = {tuple(sorted(p["shape"].items())): p["count"] for p in load["pending"]}
    return pending.get((("CPU", 1.0),)) == 3 and (("GPU", 1.0),) in pending and len(load["gangs"]) == 1


def test_the_heads_load_reports_pending_tasks_groups_and_idle_time(
    control_plane: FakeControlPlane, node_provider: LocalProvider,
) -> None:
    # given: a ready 1-CPU head whose regular heartbeat is far away (30 s): only the fast path can be quick
    control_plane.heartbeat_interval_s = 30.0
    token = control_plane.add_token("head")
    launch(node_provider, control_plane.url, token, "head")
    wait_for(lambda: (n := control_plane.node(token)) and n.last and n.last["state"] == "ready", 90, what="head ready")
    head = control_plane.node(token)
    wait_for(lambda: head.last["ray"]["load"] is not None, 10, what="a heartbeat with load")
    idle = head.last["ray"]["load"]
    assert idle["pending"] == [] and idle["gangs"] == [] and idle["constraints"] == []
    ray_id = head.last["ray"]["node_id"]

    # when: a driver submits 1 running + 3 waiting {CPU: 1} tasks, an infeasible {GPU: 1} one and a
    # STRICT_SPREAD group of 2 x {CPU: 1} that one node can never hold
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, head.last["ray"]["gcs_address"]],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        line = driver.stdout.readline().split()  # type: ignore[union-attr]
        assert line and line[0] == "SUBMITTED", "the driver did not submit"
        submitted, pg_id = float(line[1]), line[2]
        control_plane.heartbeat_interval_s = 0.5  # from the next response on (the one the fast path brings)

        # then: a heartbeat carries all of it, long before the 30 s interval (GCS ~1 s + a 0.25 s check)
        found = wait_for(lambda: next(((t, ld) for t, ld in loads_since(head, submitted) if has_demand(ld)), None),
                         15, interval=0.05, what="the demand in a heartbeat")
        seen_at, load = found  # type: ignore[misc]
        first_demand = min(t for t, ld in loads_since(head, submitted) if ld["pending"] or ld["gangs"])
        print(f"\nsubmitted -> first demand in a heartbeat {first_demand - submitted:.2f} s, "
              f"-> all of it {seen_at - submitted:.2f} s")
        assert first_demand - submitted < 5.0
        assert load["pending"] == [{"shape": {"CPU": 1.0}, "count": 3}, {"shape": {"GPU": 1.0}, "count": 1}]
        assert load["gangs"] == [{"id": pg_id, "strategy": "STRICT_SPREAD", "bundles": [{"CPU": 1.0}, {"CPU": 1.0}]}]
        assert load["constraints"] == []
        assert accepted(load)
        [node] = load["nodes"]
        assert node["node_id"] == ray_id and node["status"] == "RUNNING" and node["idle_ms"] == 0
        assert node["total"]["CPU"] == 1.0 and node["total"]["memory"] == 1024**3
        assert node["total"]["local.small"] == 1.0 and "object_store_memory" in node["total"]
        assert not any(k.startswith("node:") for k in node["total"])
        assert "CPU" not in node["available"] and node["available"]["memory"] == 1024**3
        assert node["labels"]["cumulus-group"] == "head"
        assert abs(load["collected_at"] - seen_at) < 2.0

        # when: the work is cancelled (the driver goes, and Ray ends its tasks and groups)
        driver.kill()
        driver.wait(timeout=10)
        cancelled = time.time()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)

    # then: nothing waits, the head turns IDLE and its idle time grows
    def idle_reports() -> list[dict[str, Any]]:
        return [ld for _, ld in loads_since(head, cancelled)
                if not ld["pending"] and not ld["gangs"] and ld["nodes"][0]["status"] == "IDLE"]

    wait_for(lambda: any(r["nodes"][0]["idle_ms"] >= 2000 for r in idle_reports()), 20, what="idle_ms >= 2 s")
    reports = idle_reports()
    idle_ms = [r["nodes"][0]["idle_ms"] for r in reports]
    assert idle_ms == sorted(idle_ms) and idle_ms[-1] > idle_ms[0]
    assert reports[-1]["nodes"][0]["available"]["CPU"] == 1.0
    assert accepted(reports[-1])
