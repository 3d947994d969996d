"""A real head + worker Ray pair driven through the agent protocol by a fake control plane."""

from __future__ import annotations

import time
import uuid

import pytest

from clusters.providers import catalog
from clusters.providers.base import Bootstrap, LaunchRequest
from clusters.providers.local import LocalProvider, node_processes
from tests.e2e.harness import wait_for

pytestmark = pytest.mark.e2e


def launch(provider: LocalProvider, url: str, token: str, role: str) -> tuple[str, float]:
    key = str(uuid.uuid4())
    request = LaunchRequest(
        node_key=key, cluster_uid="c1", cluster_name="c1", workspace="ws", role=role,  # type: ignore[arg-type]
        group="head" if role == "head" else "cpu", instance_type=catalog.LOCAL_TYPES[0],
        bootstrap=Bootstrap(control_plane_url=url, bootstrap_token=token),
    )
    started = time.time()
    provider.create_node(request)
    return key, started


def test_head_and_worker_register_join_report_ready_and_stop(control_plane, node_provider: LocalProvider) -> None:
    # given: a head and a worker node launched against the fake control plane
    head_token = control_plane.add_token("head")
    worker_token = control_plane.add_token("worker")
    head_key, head_launched = launch(node_provider, control_plane.url, head_token, "head")
    worker_key, worker_launched = launch(node_provider, control_plane.url, worker_token, "worker")

    # when: both come up
    def ready(token: str) -> bool:
        node = control_plane.node(token)
        return bool(node and node.last and node.last["state"] == "ready")

    wait_for(lambda: ready(head_token), 90, what="head ready")
    wait_for(lambda: ready(worker_token), 90, what="worker ready")
    head, worker = control_plane.node(head_token), control_plane.node(worker_token)

    # then: each reports its Ray identity, and the head sees the worker ALIVE
    assert head.last["ray"]["gcs_address"] and head.last["ray"]["dashboard_url"].startswith("http://127.0.0.1:")
    assert worker.last["ray"]["node_id"] and worker.last["ray"]["gcs_address"] == head.last["ray"]["gcs_address"]
    assert any(body["state"] == "waiting_for_head" for _, body in worker.heartbeats)
    wait_for(lambda: worker.last["ray"]["node_id"] in (head.last["ray"]["alive_node_ids"] or []), 10,
             what="worker in the head's alive_node_ids")
    assert head.last["ray"]["node_id"] in head.last["ray"]["alive_node_ids"]
    head_ready, worker_ready = head.first_time_in("ready"), worker.first_time_in("ready")
    print(f"\nhead: launch -> ready {head_ready - head_launched:.2f} s "
          f"(register -> ready {head_ready - head.registered_at:.2f} s); "
          f"worker: starting_ray -> ready {worker_ready - worker.first_time_in('starting_ray'):.2f} s, "
          f"launch -> ready {worker_ready - worker_launched:.2f} s")

    # when: the control plane stops both
    control_plane.stop_node(worker_token)
    control_plane.stop_node(head_token)

    # then: every process of both nodes is gone and each said "stopping" last
    wait_for(lambda: not node_processes(worker_key) and not node_processes(head_key), 30,
             what="all node processes gone")
    assert worker.last["state"] == "stopping" and head.last["state"] == "stopping"
    assert node_provider.list_nodes() == []


def test_used_bootstrap_token_makes_the_agent_exit(control_plane, node_provider: LocalProvider) -> None:
    # given: a token already used by someone else
    token = control_plane.add_token("worker")
    control_plane.register({"bootstrap_token": token})

    # when
    key, _ = launch(node_provider, control_plane.url, token, "worker")

    # then: the agent gives up (nothing to become), and the node is not listed
    wait_for(lambda: not node_processes(key), 20, what="agent exit")
    assert node_provider.list_nodes() == []


def test_terminate_stops_a_running_ray_head_completely(control_plane, node_provider: LocalProvider) -> None:
    # given: a ready head
    token = control_plane.add_token("head")
    key, _ = launch(node_provider, control_plane.url, token, "head")
    wait_for(lambda: (n := control_plane.node(token)) and n.last and n.last["state"] == "ready", 90, what="head ready")
    assert len(node_processes(key)) > 5  # agent, ray start, gcs, raylet, dashboard, ...

    # when: the provider terminates it (SIGTERM to the agent, which stops Ray)
    started = time.monotonic()
    node_provider.terminate_nodes([node_provider.list_nodes()[0].instance_id])

    # then: nothing of the node is left, within the grace period, and it said goodbye
    assert not node_processes(key)
    assert time.monotonic() - started < 12
    assert control_plane.node(token).last["state"] == "stopping"
    assert node_provider.list_nodes() == []
