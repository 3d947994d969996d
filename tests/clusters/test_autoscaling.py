"""The autoscaler wired in: head heartbeats carry Ray's load, decisions become targets, drains and events."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from django.test import TestCase
from django.utils import timezone

from clusters.choices import ClusterStatus as C
from clusters.choices import EventKind, NodeRole
from clusters.choices import NodeState as N
from clusters.models import Cluster, ClusterEvent, Node
from clusters.reconciler import reconcile_cluster
from tests.clusters.test_reconciler import Agent, live_nodes
from tests.factories import ClusterFactory
from tests.fakes import FakeProvider

pytestmark = pytest.mark.django_db

ONE_CPU = {"CPU": 1.0, "memory": float(2 * 2**30)}


def rid(name: str) -> str:
    """A Ray node id (28 bytes, hex) for one of our node names."""
    return hashlib.sha256(name.encode()).hexdigest()[:56]


def ray_node(node_id: str, available: dict | None = None, idle_ms: int = 0) -> dict:
    return {"node_id": node_id, "status": "IDLE" if idle_ms else "RUNNING", "total": ONE_CPU,
            "available": ONE_CPU if available is None else available, "idle_ms": idle_ms, "labels": {}}


class Running:
    """A RUNNING cluster whose agents are played over the real agent API."""

    def __init__(self, fake: FakeProvider, min_workers: int = 0, max_workers: int = 3, **cluster: object) -> None:
        self.fake = fake
        self.cluster = ClusterFactory(groups=[{"name": "cpu", "instance_type": "local.small",
                                               "min_workers": min_workers, "max_workers": max_workers}],
                                      idle_timeout_minutes=1, **cluster)
        self.agents: dict[str, Agent] = {}
        self.reconcile()
        self.cluster.refresh_from_db()
        assert self.cluster.status == C.RUNNING

    def reconcile(self) -> None:
        reconcile_cluster(self.cluster.pk)
        for node in live_nodes(self.cluster):
            if node.name not in self.agents:
                agent = self.agents[node.name] = Agent(node)
                if node.role == NodeRole.HEAD:
                    agent.beat("ready", node_id=rid("head"), gcs_address="10.1.2.3:6379")
                else:
                    agent.beat("ready", node_id=rid(node.name))
        reconcile_cluster(self.cluster.pk)

    def head_reports(self, nodes: list[dict], pending: list | None = None, gangs: list | None = None) -> dict:
        load = {"nodes": nodes, "pending": pending or [], "gangs": gangs or [], "constraints": [],
                "collected_at": timezone.now().timestamp()}
        # The decision runs once the heartbeat's transaction commits; run those callbacks here.
        with TestCase.captureOnCommitCallbacks(execute=True):
            return self.agents["head-1"].beat("ready", node_id=rid("head"), gcs_address="10.1.2.3:6379", load=load)

    def messages(self, kind: str = EventKind.AUTOSCALER) -> list[str]:
        return list(ClusterEvent.objects.filter(cluster=self.cluster, kind=kind).order_by("id")
                    .values_list("message", flat=True))

    def workers(self) -> list[Node]:
        return live_nodes(self.cluster, NodeRole.WORKER)


def test_pending_work_launches_the_whole_backlog_in_one_decision(fake_provider: FakeProvider) -> None:
    # given a running head-only cluster whose head is busy
    c = Running(fake_provider)
    # when the head reports 4 waiting one-CPU tasks
    c.head_reports([ray_node(rid("head"), available={})], pending=[{"shape": {"CPU": 1.0}, "count": 4}])
    # then the group is sized at once to its max, the decision explains itself, and the reconciler launches 3
    group = c.cluster.groups.get()
    assert group.target_workers == 3
    assert c.messages()[0] == "cpu: 0 → 3 for 3 pending {CPU: 1}"  # the 4th waits: max_workers
    assert any("not placed" in m and "max_workers 3" in m for m in c.messages())
    c.reconcile()
    assert [n.name for n in c.workers()] == ["cpu-1", "cpu-2", "cpu-3"]


def test_infeasible_demand_is_reported_once_and_launches_nothing(fake_provider: FakeProvider) -> None:
    c = Running(fake_provider)
    for _ in range(3):  # the same report, three heartbeats in a row
        c.head_reports([ray_node(rid("head"))], pending=[{"shape": {"CPU": 64.0}, "count": 1}])
    assert c.cluster.groups.get().target_workers == 0
    assert len(c.messages(EventKind.INFEASIBLE)) == 1
    assert "{CPU: 64}" in c.messages(EventKind.INFEASIBLE)[0]
    c.reconcile()
    assert c.workers() == []


def test_an_idle_worker_is_drained_then_terminated_and_not_replaced(fake_provider: FakeProvider) -> None:
    # given a worker that Ray has seen idle for longer than the 1-minute timeout, ready long enough
    c = Running(fake_provider, min_workers=0)
    c.head_reports([ray_node(rid("head"), available={})], pending=[{"shape": {"CPU": 1.0}, "count": 1}])
    c.reconcile()
    (worker,) = c.workers()
    Node.objects.filter(pk=worker.pk).update(ready_at=timezone.now() - timedelta(minutes=10))
    # when the head reports it idle past the timeout
    c.head_reports([ray_node(rid("head")), ray_node(rid(worker.name), idle_ms=90_000)])
    # then it is asked to drain, with the reason on the node and in its events
    worker.refresh_from_db()
    assert worker.state == N.DRAINING
    assert "idle 1m30s > 1m" in worker.state_reason
    reply = c.agents[worker.name].beat("ready", node_id=rid(worker.name))
    assert {"type": "drain", "reason": worker.state_reason} in reply["commands"]
    # when its agent has drained and stops, then the machine goes and nothing replaces it
    c.agents[worker.name].beat("stopping", node_id=rid(worker.name))
    reconcile_cluster(c.cluster.pk)
    worker.refresh_from_db()
    assert worker.state == N.TERMINATED
    assert c.workers() == []
    assert c.cluster.groups.get().target_workers == 0


def test_a_drain_ray_rejects_puts_the_node_back_in_service(fake_provider: FakeProvider) -> None:
    c = Running(fake_provider, min_workers=0)
    c.head_reports([ray_node(rid("head"), available={})], pending=[{"shape": {"CPU": 1.0}, "count": 1}])
    c.reconcile()
    (worker,) = c.workers()
    Node.objects.filter(pk=worker.pk).update(ready_at=timezone.now() - timedelta(minutes=10))
    c.head_reports([ray_node(rid("head")), ray_node(rid(worker.name), idle_ms=90_000)])

    agent = c.agents[worker.name]
    response = agent.client.post(f"/api/agent/v1/nodes/{worker.key}/heartbeat",
                                 {"state": "ready", "message": "drain rejected: node has running tasks"})
    assert response.status_code == 200

    worker.refresh_from_db()
    assert worker.state == N.READY
    assert worker.state_reason == "drain rejected: node has running tasks"


def test_a_busy_worker_is_kept_and_says_why(fake_provider: FakeProvider) -> None:
    c = Running(fake_provider, min_workers=1)
    (worker,) = c.workers()
    c.head_reports([ray_node(rid("head")), ray_node(rid(worker.name), available={}, idle_ms=0)])
    worker.refresh_from_db()
    assert worker.state == N.READY
    assert worker.scale_note.startswith("kept:")


def test_an_idle_cluster_auto_stops(fake_provider: FakeProvider) -> None:
    c = Running(fake_provider, min_workers=0, auto_stop_minutes=1)
    c.head_reports([ray_node(rid("head"), idle_ms=61_000)])
    cluster = Cluster.objects.get(pk=c.cluster.pk)
    assert cluster.status == C.STOPPING
    assert "auto-stop after 1 min" in cluster.status_message


def test_the_idle_clock_survives_rays_timer_restarting_but_not_work(fake_provider: FakeProvider) -> None:
    from clusters.agent_service import next_idle_since

    now = timezone.now()
    idle = {"status": "IDLE", "total": ONE_CPU, "available": ONE_CPU, "idle_ms": 10_000}
    since = next_idle_since(None, idle, now)
    assert since == now - timedelta(seconds=10)
    # Ray's idle timer restarts (ray#60546) while nothing runs: our clock keeps counting
    restarted = {**idle, "status": "RUNNING", "idle_ms": 0}
    assert next_idle_since(since, restarted, now + timedelta(seconds=5)) == since
    assert next_idle_since(since, {**idle, "idle_ms": 1_000}, now + timedelta(seconds=6)) == since
    # a task takes the CPU: the clock stops
    busy = {**idle, "status": "RUNNING", "available": {"memory": ONE_CPU["memory"]}, "idle_ms": 0}
    assert next_idle_since(since, busy, now + timedelta(seconds=7)) is None
    # and a node Ray no longer reports has no clock
    assert next_idle_since(since, None, now) is None


def test_a_rejected_drain_restarts_the_idle_clock(fake_provider: FakeProvider) -> None:
    c = Running(fake_provider, min_workers=0)
    c.head_reports([ray_node(rid("head"), available={})], pending=[{"shape": {"CPU": 1.0}, "count": 1}])
    c.reconcile()
    (worker,) = c.workers()
    Node.objects.filter(pk=worker.pk).update(ready_at=timezone.now() - timedelta(minutes=10))
    c.head_reports([ray_node(rid("head")), ray_node(rid(worker.name), idle_ms=90_000)])
    worker.refresh_from_db()
    assert worker.state == N.DRAINING

    response = c.agents[worker.name].client.post(f"/api/agent/v1/nodes/{worker.key}/heartbeat",
                                                 {"state": "ready", "message": "drain rejected: holds objects"})
    assert response.status_code == 200
    # Ray still calls it idle for a moment, but the node is not asked to drain again at once
    c.head_reports([ray_node(rid("head")), ray_node(rid(worker.name), idle_ms=1_000)])
    worker.refresh_from_db()
    assert worker.state == N.READY
    assert worker.scale_note.startswith("kept: idle")
