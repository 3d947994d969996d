"""The head's Ray load over the real agent API: stored on the cluster and per node, validated strictly."""

from __future__ import annotations

import copy

import pytest

from clusters.choices import ClusterStatus as C
from clusters.choices import NodeRole
from clusters.choices import NodeState as N
from clusters.models import Cluster, Node
from clusters.reconciler import bootstrap_token_for, reconcile_cluster, refresh_status
from runtime_agent import load as limits
from tests.conftest import Api
from tests.factories import ClusterFactory
from tests.fakes import FakeProvider

HEAD_RAY_ID = "aa" * 28
WORKER_RAY_ID = "bb" * 28
PG = "4b8e8d535d8896a4511e0754923e01000000"

LOAD = {
    "nodes": [
        {"node_id": HEAD_RAY_ID, "status": "RUNNING", "idle_ms": 0,
         "total": {"CPU": 1.0, "memory": 1073741824.0, "object_store_memory": 322122547.0},
         "available": {"memory": 1073741824.0, "object_store_memory": 322122547.0},
         "labels": {"ray.io/node-id": HEAD_RAY_ID, "cumulus.io/group": "head"}},
        {"node_id": WORKER_RAY_ID, "status": "IDLE", "idle_ms": 65432, "total": {"CPU": 1.0},
         "available": {"CPU": 1.0}, "labels": {}},
        {"node_id": "cc" * 28, "status": "DEAD", "idle_ms": 0, "total": {}, "available": {}, "labels": {}},
    ],
    "pending": [{"shape": {"CPU": 1.0}, "count": 3}, {"shape": {"GPU": 1.0}, "count": 1}],
    "gangs": [{"id": PG, "strategy": "STRICT_SPREAD", "bundles": [{"CPU": 1.0}, {"CPU": 1.0}]}],
    "constraints": [],
    "collected_at": 1764090000.5,
}


class Agent:
    """Plays one node's runtime agent over the agent API."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.client = Api()
        response = self.client.post("/api/agent/v1/register", {"bootstrap_token": bootstrap_token_for(node.key)})
        assert response.status_code == 200, response.content
        self.client.client.credentials(HTTP_AUTHORIZATION=f"Bearer {response.json()['node_token']}")

    def beat(self, state: str = "ready", **ray: object):
        return self.client.post(f"/api/agent/v1/nodes/{self.node.key}/heartbeat", {"state": state, "ray": ray})


@pytest.fixture
def running(fake_provider: FakeProvider) -> tuple[Cluster, Agent, Agent]:
    """A RUNNING cluster: a READY head and one READY worker, both known to Ray."""
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": 1, "max_workers": 2}])
    reconcile_cluster(cluster.pk)
    head_node = Node.objects.get(cluster=cluster, role=NodeRole.HEAD)
    worker_node = Node.objects.get(cluster=cluster, role=NodeRole.WORKER)
    head, worker = Agent(head_node), Agent(worker_node)
    assert head.beat(node_id=HEAD_RAY_ID, gcs_address="10.0.0.1:6379").status_code == 200
    assert worker.beat(node_id=WORKER_RAY_ID).status_code == 200
    refresh_status(Cluster.objects.get(pk=cluster.pk))
    cluster.refresh_from_db()
    assert cluster.status == C.RUNNING
    return cluster, head, worker


@pytest.mark.django_db
def test_the_heads_load_is_stored_on_the_cluster_and_per_node(running, settings):
    cluster, head, worker = running
    settings.CUMULUS_HEAD_HEARTBEAT_INTERVAL_S = 1.0
    # when
    response = head.beat(node_id=HEAD_RAY_ID, gcs_address="10.0.0.1:6379", alive_node_ids=[HEAD_RAY_ID], load=LOAD)
    # then: the whole report on the cluster, each Ray node's idle time and free resources on its row
    assert response.status_code == 200, response.content
    assert response.json()["heartbeat_interval_s"] == 1.0  # the head beats at the load cadence
    cluster.refresh_from_db()
    assert cluster.ray_load == LOAD and cluster.ray_load_at is not None
    head.node.refresh_from_db()
    worker.node.refresh_from_db()
    assert (head.node.ray_idle_ms, head.node.ray_available) == (0, LOAD["nodes"][0]["available"])
    assert (worker.node.ray_idle_ms, worker.node.ray_available) == (65432, {"CPU": 1.0})
    # and: the worker keeps the ordinary interval
    assert worker.beat(node_id=WORKER_RAY_ID).json()["heartbeat_interval_s"] == settings.CUMULUS_HEARTBEAT_INTERVAL_S


@pytest.mark.django_db
def test_the_api_shows_a_nodes_idle_time(running, api: Api, workspace):
    cluster, head, _ = running
    Cluster.objects.filter(pk=cluster.pk).update(workspace=workspace)
    head.beat(node_id=HEAD_RAY_ID, load=LOAD)
    nodes = api.get(f"workspaces/{workspace.slug}/clusters/{cluster.name}/nodes/").json()
    rows = nodes["results"] if isinstance(nodes, dict) else nodes
    idle = {n["role"]: n["idle_seconds"] for n in rows}
    # a live clock since the report (Node.idle_since): 65.4 s then, a little more by now
    assert idle["head"] == 0.0 and 65.4 <= idle["worker"] < 65.4 + 5


@pytest.mark.django_db
def test_a_node_the_report_no_longer_mentions_loses_its_figures(running):
    cluster, head, worker = running
    head.beat(node_id=HEAD_RAY_ID, load=LOAD)
    # when: the next report has only the head
    later = {**LOAD, "nodes": LOAD["nodes"][:1]}
    assert head.beat(node_id=HEAD_RAY_ID, load=later).status_code == 200
    # then
    worker.node.refresh_from_db()
    assert worker.node.ray_idle_ms is None and worker.node.ray_available is None
    # and: a heartbeat without load (the GCS did not answer) keeps the last report
    assert head.beat(node_id=HEAD_RAY_ID, load=None).status_code == 200
    cluster.refresh_from_db()
    assert cluster.ray_load == later


@pytest.mark.django_db
def test_a_workers_heartbeat_cannot_set_the_clusters_load(running):
    cluster, _, worker = running
    assert worker.beat(node_id=WORKER_RAY_ID, load=LOAD).status_code == 200
    cluster.refresh_from_db()
    worker.node.refresh_from_db()
    assert cluster.ray_load is None and cluster.ray_load_at is None
    assert worker.node.ray_idle_ms is None


def bad(path: tuple, value: object) -> dict:
    """LOAD with the value at `path` replaced (or, for a list path ending in "append", one item added)."""
    load = copy.deepcopy(LOAD)
    target = load
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return load


BAD_LOADS = {
    "not an object": "load",
    "a list": [LOAD],
    "negative available": bad(("nodes", 0, "available", "CPU"), -1.0),
    "negative total": bad(("nodes", 1, "total", "CPU"), -0.5),
    "resource as string": bad(("pending", 0, "shape", "CPU"), "1"),
    "resource as bool": bad(("pending", 0, "shape", "CPU"), True),
    "count zero": bad(("pending", 0, "count"), 0),
    "count float": bad(("pending", 0, "count"), 1.5),
    "empty shape": bad(("pending", 0, "shape"), {}),
    "too many nodes": bad(("nodes",), [LOAD["nodes"][1]] * (limits.MAX_NODES + 1)),
    "too many shapes": bad(("pending",), [{"shape": {"CPU": 1.0}, "count": 1}] * (limits.MAX_SHAPES + 1)),
    "too many bundles": bad(("gangs", 0, "bundles"), [{"CPU": 1.0}] * (limits.MAX_BUNDLES_PER_GANG + 1)),
    "too many bundles in all": bad(("gangs",), [{"id": PG, "strategy": "PACK", "bundles": [{"CPU": 1.0}] * 1000}]
                                   * (limits.MAX_BUNDLES_TOTAL // 1000 + 1)),
    "too many resources": bad(("nodes", 0, "total"), {f"r{i}": 1.0 for i in range(limits.MAX_RESOURCES + 1)}),
    "long resource name": bad(("nodes", 0, "total"), {"x" * 129: 1.0}),
    "long label key": bad(("nodes", 0, "labels"), {"k" * 129: "v"}),
    "label value not a string": bad(("nodes", 0, "labels"), {"k": 1}),
    "unknown status": bad(("nodes", 0, "status"), "ALIVE"),
    "node id not hex": bad(("nodes", 0, "node_id"), "not-hex"),
    "negative idle": bad(("nodes", 1, "idle_ms"), -5),
    "unknown strategy": bad(("gangs", 0, "strategy"), "STRICTER"),
    "gang without bundles": bad(("gangs", 0, "bundles"), []),
    "unknown key": {**LOAD, "extra": 1},
    "missing key": {k: v for k, v in LOAD.items() if k != "pending"},
    "nodes not a list": bad(("nodes",), {"a": 1}),
    "collected_at as string": bad(("collected_at",), "now"),
}


@pytest.mark.django_db
@pytest.mark.parametrize("case", sorted(BAD_LOADS))
def test_a_malformed_load_is_400_and_nothing_is_stored(running, case: str):
    cluster, head, _ = running
    head.node.refresh_from_db()
    before = head.node.last_heartbeat_at
    # when
    response = head.beat(node_id=HEAD_RAY_ID, load=BAD_LOADS[case])
    # then
    assert response.status_code == 400, response.content
    assert "load" in response.json()["error"]["fields"]["ray"]
    cluster.refresh_from_db()
    head.node.refresh_from_db()
    assert cluster.ray_load is None and head.node.ray_idle_ms is None
    assert head.node.last_heartbeat_at == before


@pytest.mark.django_db
def test_non_finite_numbers_are_refused(running):
    _, head, _ = running
    raw = ('{"state": "ready", "ray": {"load": {"nodes": [], "pending": [{"shape": {"CPU": NaN}, "count": 1}], '
           '"gangs": [], "constraints": [], "collected_at": 1}}}')
    response = head.client.request("POST", f"/api/agent/v1/nodes/{head.node.key}/heartbeat", raw=raw)
    assert response.status_code == 400


@pytest.mark.django_db
def test_a_booting_head_gets_the_fast_interval_and_a_running_one_the_head_interval(fake_provider, settings):
    settings.CUMULUS_HEAD_HEARTBEAT_INTERVAL_S = 0.75
    cluster = ClusterFactory(groups=[{"name": "cpu", "min_workers": 0, "max_workers": 2}])
    reconcile_cluster(cluster.pk)
    head = Agent(Node.objects.get(cluster=cluster, role=NodeRole.HEAD))
    assert head.beat("starting_ray").json()["heartbeat_interval_s"] == settings.CUMULUS_HEARTBEAT_FAST_INTERVAL_S
    head.beat(node_id=HEAD_RAY_ID, gcs_address="10.0.0.1:6379")
    refresh_status(Cluster.objects.get(pk=cluster.pk))
    assert Cluster.objects.get(pk=cluster.pk).status == C.RUNNING
    assert Node.objects.get(pk=head.node.pk).state == N.READY
    assert head.beat(node_id=HEAD_RAY_ID).json()["heartbeat_interval_s"] == 0.75
