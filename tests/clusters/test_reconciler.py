"""The reconciler against an in-memory provider: convergence, idempotency, crashes, faults and races."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
from django.db import connection

from clusters import services
from clusters.choices import ClusterStatus as C
from clusters.choices import EventKind, NodeRole
from clusters.choices import NodeState as N
from clusters.models import Cluster, ClusterEvent, Node
from clusters.providers import PermanentProviderError, TransientProviderError
from clusters.reconciler import bootstrap_token_for, collect_orphans, reconcile_cluster
from controlplane.services import Actor
from tests.conftest import Api
from tests.factories import ClusterFactory, NodeFactory
from tests.fakes import FakeProvider

LIVE = [N.REQUESTED, N.PROVISIONING, N.BOOTING, N.READY, N.DRAINING]


def live_nodes(cluster: Cluster, role: str | None = None) -> list[Node]:
    qs = Node.objects.filter(cluster=cluster, state__in=LIVE).order_by("id")
    return list(qs.filter(role=role) if role else qs)


def kinds(cluster: Cluster) -> list[str]:
    return list(ClusterEvent.objects.filter(cluster=cluster).order_by("id").values_list("kind", flat=True))


class Agent:
    """Plays a node's runtime agent over the real agent API."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.client = Api()
        response = self.client.post("/api/agent/v1/register", {
            "bootstrap_token": bootstrap_token_for(node.key), "hostname": node.name, "address": "10.1.2.3",
        })
        assert response.status_code == 200, response.content
        self.body = response.json()
        self.client.client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.body['node_token']}")

    def beat(self, state: str, **ray: object) -> dict:
        response = self.client.post(f"/api/agent/v1/nodes/{self.node.key}/heartbeat", {"state": state, "ray": ray})
        assert response.status_code == 200, response.content
        return response.json()


def bring_up(cluster: Cluster) -> None:
    """Every live node registers and reports Ray up, the head first."""
    for node in sorted(live_nodes(cluster), key=lambda n: n.role != NodeRole.HEAD):
        agent = Agent(node)
        if node.role == NodeRole.HEAD:
            agent.beat("ready", node_id=f"ray-{node.name}", gcs_address="10.1.2.3:6379",
                       dashboard_url="http://10.1.2.3:8265")
        else:
            agent.beat("ready", node_id=f"ray-{node.name}")


# --- convergence ------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_new_cluster_gets_its_head_and_min_workers_once(fake_provider: FakeProvider):
    # given
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": 2, "max_workers": 5}])
    # when
    assert reconcile_cluster(cluster.pk) is True
    # then
    nodes = live_nodes(cluster)
    assert [(n.role, n.name, n.state) for n in nodes] == [
        ("head", "head-1", N.PROVISIONING), ("worker", "cpu-1", N.PROVISIONING), ("worker", "cpu-2", N.PROVISIONING)
    ]
    assert {n.instance_id for n in nodes} == {i.instance_id for i in fake_provider.list_nodes(str(cluster.uid))}
    assert sorted(fake_provider.create_calls) == sorted(str(n.key) for n in nodes)
    cluster.refresh_from_db()
    assert cluster.status == C.PROVISIONING
    assert cluster.lease_owner == ""  # released

    # when: reconciled again, and again
    reconcile_cluster(cluster.pk)
    reconcile_cluster(cluster.pk)
    # then: nothing new was created
    assert len(fake_provider.create_calls) == 3
    assert Node.objects.filter(cluster=cluster).count() == 3

    # when: the agents come up
    bring_up(cluster)
    # then
    cluster.refresh_from_db()
    assert cluster.status == C.RUNNING
    assert cluster.gcs_address == "10.1.2.3:6379"
    assert {n.state for n in live_nodes(cluster)} == {N.READY}
    assert reconcile_cluster(cluster.pk) is True
    assert len(fake_provider.create_calls) == 3


@pytest.mark.django_db
def test_a_reconcile_of_a_deleted_cluster_is_done(fake_provider: FakeProvider):
    assert reconcile_cluster(987654) is True
    assert fake_provider.create_calls == []


@pytest.mark.django_db
@pytest.mark.parametrize("machine_exists", [False, True], ids=["before-the-call", "after-the-call"])
def test_a_crash_between_the_node_row_and_the_provider_call_converges_without_duplicates(
    fake_provider: FakeProvider, machine_exists: bool
):
    # given: a worker died after writing the head's row; the machine may or may not exist
    cluster = ClusterFactory(groups=[], status=C.PROVISIONING)
    head = NodeFactory(cluster=cluster, role=NodeRole.HEAD, name="head-1", state=N.REQUESTED)
    if machine_exists:
        fake_provider.plant(node_key=str(head.key), cluster_uid=str(cluster.uid))
    # when
    reconcile_cluster(cluster.pk)
    # then: the same row, one machine, under the row's key
    assert [n.pk for n in live_nodes(cluster)] == [head.pk]
    head.refresh_from_db()
    assert head.state == N.PROVISIONING
    assert [i.node_key for i in fake_provider.list_nodes(str(cluster.uid))] == [str(head.key)]
    assert head.instance_id == fake_provider.instances[str(head.key)].instance_id
    assert fake_provider.creates_for(str(head.key)) == (0 if machine_exists else 1)


# --- faults -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_vanished_worker_is_marked_lost_and_replaced(fake_provider: FakeProvider):
    # given: a running cluster
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": 1, "max_workers": 2}])
    reconcile_cluster(cluster.pk)
    bring_up(cluster)
    worker = live_nodes(cluster, NodeRole.WORKER)[0]
    # when: its machine disappears
    fake_provider.vanish(str(worker.key))
    reconcile_cluster(cluster.pk)
    # then
    worker.refresh_from_db()
    assert worker.state == N.TERMINATED
    lost = ClusterEvent.objects.get(cluster=cluster, kind=EventKind.NODE_LOST)
    assert "cpu-1" in lost.message and "gone" in lost.message
    replacement = live_nodes(cluster, NodeRole.WORKER)
    assert [n.name for n in replacement] == ["cpu-2"]
    replaced = ClusterEvent.objects.get(cluster=cluster, kind=EventKind.NODE_REPLACED)
    assert replaced.message == "Launching cpu-2 (local.small) to replace cpu-1"
    assert replaced.data["replaces"] == "cpu-1"
    cluster.refresh_from_db()
    assert cluster.status == C.UPDATING
    # when: the replacement comes up
    Agent(replacement[0]).beat("ready", node_id="ray-cpu-2")
    # then
    cluster.refresh_from_db()
    assert cluster.status == C.RUNNING
    assert len(fake_provider.list_nodes(str(cluster.uid))) == 2


@pytest.mark.django_db
def test_a_vanished_head_restarts_the_cluster_with_a_new_head_and_fresh_workers(fake_provider: FakeProvider):
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": 1, "max_workers": 1}])
    reconcile_cluster(cluster.pk)
    bring_up(cluster)
    old_worker = live_nodes(cluster, NodeRole.WORKER)[0]
    # when
    fake_provider.vanish(str(live_nodes(cluster, NodeRole.HEAD)[0].key))
    reconcile_cluster(cluster.pk)
    # then: a new head, and the worker that had joined the old Ray cluster is replaced too
    assert [n.name for n in live_nodes(cluster)] == ["head-2", "cpu-2"]
    old_worker.refresh_from_db()
    assert old_worker.state == N.TERMINATED
    assert str(old_worker.key) not in fake_provider.instances
    assert len(fake_provider.list_nodes(str(cluster.uid))) == 2
    assert ClusterEvent.objects.filter(cluster=cluster, kind=EventKind.NODE_REPLACED,
                                       message__contains="to replace head-1").exists()


@pytest.mark.django_db
def test_a_transient_provider_error_is_recorded_and_retried_with_the_same_key(fake_provider: FakeProvider):
    # given
    cluster = ClusterFactory(groups=[])
    fake_provider.fail_next(TransientProviderError("throttled"))
    # when
    with pytest.raises(TransientProviderError):
        reconcile_cluster(cluster.pk)
    # then: the node waits in REQUESTED, a person can read why, and the lease is free for the retry
    (head,) = live_nodes(cluster)
    assert head.state == N.REQUESTED
    event = ClusterEvent.objects.get(cluster=cluster, kind=EventKind.PROVIDER_ERROR)
    assert "throttled" in event.message and "retried" in event.message
    cluster.refresh_from_db()
    assert cluster.lease_owner == ""
    # when: the retry
    reconcile_cluster(cluster.pk)
    # then
    head.refresh_from_db()
    assert head.state == N.PROVISIONING
    assert fake_provider.create_calls == [str(head.key), str(head.key)]
    assert len(fake_provider.instances) == 1


@pytest.mark.django_db
def test_a_permanent_head_error_fails_the_cluster_with_the_reason(fake_provider: FakeProvider):
    # given
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": 1, "max_workers": 1}])
    fake_provider.fail_next(PermanentProviderError("quota exceeded for local.small"), role="head")
    # when
    reconcile_cluster(cluster.pk)
    # then
    cluster.refresh_from_db()
    assert cluster.status == C.FAILED
    assert "quota exceeded" in cluster.status_message
    head = Node.objects.get(cluster=cluster, role=NodeRole.HEAD)
    assert head.state == N.TERMINATED
    assert ClusterEvent.objects.filter(cluster=cluster, kind=EventKind.NODE_LAUNCH_FAILED,
                                       message__contains="quota exceeded").exists()
    # when: reconciled again, nothing is retried and nothing keeps running
    reconcile_cluster(cluster.pk)
    assert fake_provider.instances == {}
    assert live_nodes(cluster) == []
    assert fake_provider.creates_for(str(head.key)) == 1


# --- stop, start, delete ----------------------------------------------------------------


@pytest.mark.django_db
def test_stop_start_and_delete_leave_no_machine_behind(fake_provider: FakeProvider):
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": 2, "max_workers": 2}])
    reconcile_cluster(cluster.pk)
    bring_up(cluster)
    actor = Actor.system()
    # when: stopped
    services.cluster_stop(cluster=cluster, actor=actor)
    reconcile_cluster(cluster.pk)
    # then
    cluster.refresh_from_db()
    assert cluster.status == C.STOPPED
    assert fake_provider.instances == {}
    assert live_nodes(cluster) == []
    # when: started again
    services.cluster_start(cluster=cluster, actor=actor)
    reconcile_cluster(cluster.pk)
    # then
    assert len(live_nodes(cluster)) == 3
    assert len(fake_provider.instances) == 3
    # when: deleted
    services.cluster_delete(cluster=cluster, actor=actor)
    reconcile_cluster(cluster.pk)
    # then
    cluster.refresh_from_db()
    assert cluster.status == C.TERMINATED
    assert cluster.terminated_at is not None
    assert fake_provider.instances == {}
    assert set(Node.objects.filter(cluster=cluster).values_list("state", flat=True)) == {N.TERMINATED}
    assert len(fake_provider.terminated) == 6


# --- orphans ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_orphan_collection_terminates_tagged_machines_without_a_live_row(fake_provider: FakeProvider, settings):
    settings.CUMULUS_ORPHAN_GRACE_S = 60
    cluster = ClusterFactory(groups=[], status=C.RUNNING)
    live = NodeFactory(cluster=cluster, role=NodeRole.HEAD, state=N.READY)
    gone = NodeFactory(cluster=cluster, state=N.TERMINATED)
    keep_live = fake_provider.plant(node_key=str(live.key), cluster_uid=str(cluster.uid), age_s=3600)
    leaked_row = fake_provider.plant(node_key=str(gone.key), cluster_uid=str(cluster.uid), age_s=3600)
    unknown = fake_provider.plant(node_key=str(uuid.uuid4()), cluster_uid=str(cluster.uid), age_s=3600)
    young = fake_provider.plant(node_key=str(uuid.uuid4()), cluster_uid=str(cluster.uid), age_s=5)
    # when
    count = collect_orphans(["local"])
    # then
    assert count == 2
    assert sorted(fake_provider.terminated) == sorted([leaked_row.instance_id, unknown.instance_id])
    assert {i.instance_id for i in fake_provider.list_nodes()} == {keep_live.instance_id, young.instance_id}
    messages = list(ClusterEvent.objects.filter(cluster=cluster, kind=EventKind.ORPHAN_TERMINATED)
                    .values_list("message", flat=True))
    assert len(messages) == 2
    assert all("no live node" in m for m in messages)
    # and: a second sweep finds nothing more to do
    assert collect_orphans(["local"]) == 0


# --- two reconciles at once -------------------------------------------------------------


def run_concurrently(target: Callable[[], object], n: int = 2) -> list[object]:
    """Start `n` threads together; return their results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = target()
        except BaseException as error:
            results[i] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.fixture
def slow_provider() -> FakeProvider:
    from clusters.providers import register_provider

    fake = FakeProvider(delay_s=0.3)
    register_provider("local", fake)
    yield fake
    register_provider("local", None)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("lease_expired", [False, True], ids=["lease-held", "lease-forcibly-expired"])
def test_two_reconciles_at_once_create_no_duplicate_node(slow_provider: FakeProvider, settings, lease_expired: bool):
    # given
    if lease_expired:
        # Each claim expires the moment it is taken, so both workers get in: only the row
        # lock and the database constraints stand between them and a second head.
        settings.CUMULUS_RECONCILE_LEASE_S = -60
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": 2, "max_workers": 4}])
    # when
    results = run_concurrently(lambda: reconcile_cluster(cluster.pk))
    # then
    assert not [r for r in results if isinstance(r, BaseException)], results
    if lease_expired:
        assert results == [True, True]  # both really ran
    else:
        assert sorted(results) == [False, True]  # one ran, the other found the lease taken
    assert len(live_nodes(cluster, NodeRole.HEAD)) == 1
    assert len(live_nodes(cluster, NodeRole.WORKER)) == 2
    assert Node.objects.filter(cluster=cluster).count() == 3
    assert len(slow_provider.list_nodes(str(cluster.uid))) == 3
    assert sorted(i.node_key for i in slow_provider.list_nodes()) == sorted(
        str(k) for k in Node.objects.filter(cluster=cluster).values_list("key", flat=True)
    )


# --- the agent's side -------------------------------------------------------------------


@pytest.mark.django_db
def test_workers_are_told_to_join_once_the_head_is_ready(fake_provider: FakeProvider):
    # given
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": 1, "max_workers": 1}])
    reconcile_cluster(cluster.pk)
    head, worker = live_nodes(cluster)
    head_agent, worker_agent = Agent(head), Agent(worker)
    assert worker_agent.body["role"] == "worker"
    assert worker_agent.body["ray"]["num_cpus"] == 1
    # when: the worker waits before the head is up
    early = worker_agent.beat("waiting_for_head")
    # then: no join yet
    assert early["commands"] == []
    head.refresh_from_db()
    assert head.state == N.BOOTING
    # when: the head is up
    head_agent.beat("ready", node_id="ray-head", gcs_address="10.1.2.3:6379")
    head.refresh_from_db()
    assert head.state == N.READY
    cluster.refresh_from_db()
    assert cluster.status == C.STARTING  # the worker is not ready yet
    # then: the worker's next heartbeat carries the join
    assert worker_agent.beat("waiting_for_head")["commands"] == [{"type": "join", "gcs_address": "10.1.2.3:6379"}]
    # when: the worker is up
    worker_agent.beat("ready", node_id="ray-worker")
    # then
    cluster.refresh_from_db()
    assert cluster.status == C.RUNNING
    assert cluster.status_message == "2 nodes ready"
    assert [
        e.data["to"] for e in ClusterEvent.objects.filter(cluster=cluster, kind=EventKind.CLUSTER_STATUS).order_by("id")
    ] == [C.PROVISIONING, C.STARTING, C.RUNNING]


@pytest.mark.django_db
def test_a_bootstrap_token_works_once(fake_provider: FakeProvider):
    cluster = ClusterFactory(groups=[])
    reconcile_cluster(cluster.pk)
    (head,) = live_nodes(cluster)
    Agent(head)
    again = Api().post("/api/agent/v1/register", {"bootstrap_token": bootstrap_token_for(head.key)})
    assert again.status_code == 401
    assert again.json()["error"]["code"] == "not_authenticated"
    forged = bootstrap_token_for(head.key)[:-4] + "AAAA"
    assert Api().post("/api/agent/v1/register", {"bootstrap_token": forged}).status_code == 401


@pytest.mark.django_db
def test_a_stopping_cluster_tells_its_nodes_to_stop(fake_provider: FakeProvider):
    cluster = ClusterFactory(groups=[])
    reconcile_cluster(cluster.pk)
    agent = Agent(live_nodes(cluster)[0])
    agent.beat("ready", node_id="ray-head", gcs_address="10.1.2.3:6379")
    services.cluster_delete(cluster=cluster, actor=Actor.system())
    reconcile_cluster(cluster.pk)
    assert agent.beat("ready")["commands"] == [{"type": "stop", "reason": "node is terminated"}]


# --- silence and scale-down -------------------------------------------------------------


def _running_cluster(fake_provider: FakeProvider, workers: int = 1) -> Cluster:
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": workers, "max_workers": 3}])
    reconcile_cluster(cluster.pk)
    bring_up(cluster)
    reconcile_cluster(cluster.pk)
    cluster.refresh_from_db()
    assert cluster.status == C.RUNNING
    return cluster


def _age_heartbeats(nodes: list[Node], seconds: float) -> None:
    from datetime import timedelta

    from django.utils import timezone

    Node.objects.filter(pk__in=[n.pk for n in nodes]).update(
        last_heartbeat_at=timezone.now() - timedelta(seconds=seconds))


@pytest.mark.django_db
def test_a_silent_node_is_lost_and_replaced_while_others_still_heartbeat(fake_provider: FakeProvider, settings):
    # given a running cluster whose worker stopped heartbeating long ago, while its head still does
    settings.CUMULUS_NODE_LOST_AFTER_S = 30
    cluster = _running_cluster(fake_provider)
    worker = live_nodes(cluster, NodeRole.WORKER)[0]
    _age_heartbeats([worker], 120)
    # when the reconciler looks
    reconcile_cluster(cluster.pk)
    # then the silent worker is LOST, its machine terminated, and a replacement launched
    worker.refresh_from_db()
    assert worker.state == N.TERMINATED
    assert ClusterEvent.objects.filter(cluster=cluster, kind=EventKind.NODE_LOST,
                                       message__contains="no heartbeat for").exists()
    assert [n.name for n in live_nodes(cluster, NodeRole.WORKER)] == ["cpu-2"]


@pytest.mark.django_db
def test_when_no_node_anywhere_reaches_us_nobody_is_declared_lost(fake_provider: FakeProvider, settings):
    # given a running cluster, and a control-plane outage: no heartbeat from anyone for minutes
    settings.CUMULUS_NODE_LOST_AFTER_S = 30
    cluster = _running_cluster(fake_provider)
    nodes = live_nodes(cluster)
    _age_heartbeats(nodes, 300)
    # when the reconciler looks (the machines are all still there)
    reconcile_cluster(cluster.pk)
    # then the silence is blamed on us, not on the nodes: nothing is lost or replaced
    assert [(n.name, n.state) for n in live_nodes(cluster)] == [(n.name, N.READY) for n in nodes]
    assert not ClusterEvent.objects.filter(cluster=cluster, kind=EventKind.NODE_LOST).exists()


@pytest.mark.django_db
def test_a_drained_node_is_terminated_and_not_replaced(fake_provider: FakeProvider):
    from clusters.transitions import node_transition

    # given a running cluster whose autoscaler lowered the target and asked a worker to drain
    cluster = _running_cluster(fake_provider, workers=1)
    group = cluster.groups.get()
    group.min_workers = group.target_workers = 0
    group.save()
    worker = live_nodes(cluster, NodeRole.WORKER)[0]
    node_transition(node=worker, to=N.DRAINING, reason="idle 6s > 5s")
    # when its agent reports it has let go of Ray, and the reconciler runs
    Node.objects.filter(pk=worker.pk).update(agent_state="stopping")
    reconcile_cluster(cluster.pk)
    # then its machine is terminated and nothing replaces it
    worker.refresh_from_db()
    assert worker.state == N.TERMINATED
    assert worker.state_reason == "machine terminated"
    assert live_nodes(cluster, NodeRole.WORKER) == []
    assert fake_provider.list_nodes(str(cluster.uid))[0].node_key == str(live_nodes(cluster, NodeRole.HEAD)[0].key)


@pytest.mark.django_db
def test_a_drain_that_never_finishes_is_cut_short(fake_provider: FakeProvider, settings):
    from datetime import timedelta

    from django.utils import timezone

    from clusters.transitions import node_transition

    settings.CUMULUS_DRAIN_TIMEOUT_S = 60
    cluster = _running_cluster(fake_provider, workers=1)
    group = cluster.groups.get()
    group.min_workers = group.target_workers = 0
    group.save()
    worker = live_nodes(cluster, NodeRole.WORKER)[0]
    node_transition(node=worker, to=N.DRAINING, reason="idle")
    Node.objects.filter(pk=worker.pk).update(state_changed_at=timezone.now() - timedelta(seconds=61))

    reconcile_cluster(cluster.pk)

    worker.refresh_from_db()
    assert worker.state == N.TERMINATED
    assert ClusterEvent.objects.filter(cluster=cluster, node=worker,
                                       message__contains="still draining after").exists()
