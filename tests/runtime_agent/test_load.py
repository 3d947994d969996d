"""Fast tests of the head's load report: protobuf -> JSON contract, and the new-demand fast path.

The protobufs are built by hand in the shape a real Ray 2.60 GCS returns them (see
test_load_e2e.py for the same against a real head).
"""

from __future__ import annotations

import json

from ray.core.generated import autoscaler_pb2 as pb

from runtime_agent import load as L
from runtime_agent.agent import LOAD_CHECK_S, Agent
from runtime_agent.client import AgentClient, ProtocolError
from runtime_agent.identity import AgentConfig, Identity
from runtime_agent.ray_node import RaySpec

PG_A = "4b8e8d535d8896a4511e0754923e01000000"  # 18-byte placement group ids, as Ray prints them
PG_B = "01b47cd7f106a59c30fc6248cae301000000"


def request(resources: dict[str, float], count: int = 1) -> pb.ResourceRequestByCount:
    return pb.ResourceRequestByCount(request=pb.ResourceRequest(resources_bundle=resources), count=count)


def gang(pg_id: str, strategy: str, bundles: list[dict[str, float]], *, details: bool = True,
         selectors: bool = True) -> pb.GangResourceRequest:
    constraint = None
    if strategy == "STRICT_SPREAD":
        constraint = pb.PlacementConstraint(anti_affinity=pb.AntiAffinityConstraint(label_name=f"_PG_{pg_id}"))
    elif strategy == "STRICT_PACK":
        constraint = pb.PlacementConstraint(affinity=pb.AffinityConstraint(label_name=f"_PG_{pg_id}"))
    requests = [pb.ResourceRequest(resources_bundle=b, placement_constraints=[constraint] if constraint else [])
                for b in bundles]
    return pb.GangResourceRequest(
        requests=requests,
        details=f"{pg_id}:{strategy}|PENDING" if details else "",
        bundle_selectors=[pb.BundleSelector(resource_requests=requests)] if selectors else [],
    )


def a_state() -> pb.ClusterResourceState:
    head_total = {"CPU": 2.0, "memory": 2147483648.0, "object_store_memory": 644245094.0, "local.small": 1.0,
                  "node:192.0.2.2": 1.0, "node:__internal_head__": 1.0,
                  f"CPU_group_{PG_B}": 1.0, f"CPU_group_0_{PG_B}": 1.0, f"bundle_group_{PG_B}": 1000.0,
                  f"bundle_group_0_{PG_B}": 1000.0}
    head_available = {"memory": 2147483648.0, "object_store_memory": 644245094.0, "local.small": 1.0,
                      "node:192.0.2.2": 1.0, "node:__internal_head__": 1.0, f"bundle_group_{PG_B}": 999.999}
    return pb.ClusterResourceState(
        node_states=[
            pb.NodeState(node_id=bytes.fromhex("aa" * 28), status=pb.RUNNING, idle_duration_ms=0,
                         total_resources=head_total, available_resources=head_available,
                         labels={"ray.io/node-id": "aa" * 28, "cumulus.io/group": "head"},
                         dynamic_labels={f"_PG_{PG_B}": ""}),
            pb.NodeState(node_id=bytes.fromhex("bb" * 28), status=pb.IDLE, idle_duration_ms=4010,
                         total_resources={"CPU": 1.0}, available_resources={"CPU": 1.0}),
            pb.NodeState(node_id=bytes.fromhex("cc" * 28), status=0),  # UNSPECIFIED: left out
        ],
        pending_resource_requests=[
            request({"CPU": 1.0}, 3),
            request({"GPU": 1.0}),
            request({"CPU": 1.0, "node:__internal_head__": 0.01}),  # pinned to the head
            request({f"CPU_group_{PG_B}": 1.0, f"bundle_group_{PG_B}": 0.001}, 2),  # waits inside a placed group
            request({"CPU": 1.0, "memory": 0.0}, 2),  # a zero amount is no requirement: same shape as {CPU: 1}
        ],
        pending_gang_resource_requests=[
            gang(PG_A, "STRICT_SPREAD", [{"CPU": 1.0}, {"CPU": 1.0}]),
            gang("e72d1af8794232c028cb11e7d0f301000000", "PACK", [{"CPU": 1.0, "memory": 1073741824.0}]),
        ],
        cluster_resource_constraints=[
            pb.ClusterResourceConstraint(resource_requests=[request({"CPU": 4.0}, 2)]),
        ],
    )


def test_the_state_becomes_the_json_contract() -> None:
    load = L.load_from_state(a_state(), collected_at=1700000000.1234, kv_requests=b'[{"GPU": 1}, {"CPU": 4}]')
    assert json.loads(json.dumps(load)) == load  # plain JSON
    assert load == {
        "nodes": [
            {"node_id": "aa" * 28, "status": "RUNNING", "idle_ms": 0,
             "total": {"CPU": 2.0, "memory": 2147483648.0, "object_store_memory": 644245094.0, "local.small": 1.0},
             "available": {"memory": 2147483648.0, "object_store_memory": 644245094.0, "local.small": 1.0},
             "labels": {"ray.io/node-id": "aa" * 28, "cumulus.io/group": "head"}},
            {"node_id": "bb" * 28, "status": "IDLE", "idle_ms": 4010, "total": {"CPU": 1.0},
             "available": {"CPU": 1.0}, "labels": {}},
        ],
        "pending": [{"shape": {"CPU": 1.0}, "count": 5}, {"shape": {"GPU": 1.0}, "count": 1}],
        "gangs": [
            {"id": PG_A, "strategy": "STRICT_SPREAD", "bundles": [{"CPU": 1.0}, {"CPU": 1.0}]},
            {"id": "e72d1af8794232c028cb11e7d0f301000000", "strategy": "PACK",
             "bundles": [{"CPU": 1.0, "memory": 1073741824.0}]},
        ],
        "constraints": [{"shape": {"CPU": 4.0}, "count": 3}, {"shape": {"GPU": 1.0}, "count": 1}],
        "collected_at": 1700000000.123,
    }


def test_a_gang_without_details_takes_strategy_and_id_from_its_constraints() -> None:
    state = pb.ClusterResourceState(pending_gang_resource_requests=[
        gang(PG_A, "STRICT_SPREAD", [{"CPU": 1.0}] * 3, details=False, selectors=False),
        gang(PG_B, "STRICT_PACK", [{"GPU": 1.0}], details=False),
        gang(PG_B, "SPREAD", [{"CPU": 2.0}]),
    ])
    gangs = L.load_from_state(state, collected_at=0)["gangs"]
    assert [(g["id"], g["strategy"], len(g["bundles"])) for g in gangs] == [
        (PG_A, "STRICT_SPREAD", 3), (PG_B, "STRICT_PACK", 1), (PG_B, "SPREAD", 1),
    ]


def test_implicit_resources_are_recognised() -> None:
    assert L.is_implicit("node:10.0.0.1") and L.is_implicit("node:__internal_head__")
    assert L.is_implicit(f"CPU_group_{PG_A}") and L.is_implicit(f"GPU_group_3_{PG_A}")
    assert L.is_implicit(f"bundle_group_{PG_A}")
    assert not any(map(L.is_implicit, ["CPU", "GPU", "memory", "object_store_memory", "my_group_resource",
                                       "accelerator_type:A100"]))


def test_the_kv_form_of_request_resources_is_read_and_garbage_ignored() -> None:
    raw = json.dumps([{"CPU": 1}, {"CPU": 1}, {"resources": {"GPU": 2}, "label_selector": {}}, "x", {"CPU": "a"},
                      {"node:1.2.3.4": 1}]).encode()
    assert L.kv_constraints(raw) == [{"shape": {"CPU": 1.0}, "count": 2}, {"shape": {"GPU": 2.0}, "count": 1}]
    assert L.kv_constraints(b"not json") == [] and L.kv_constraints(None) == []


def test_the_report_is_trimmed_to_the_control_planes_bounds() -> None:
    many = L.MAX_RESOURCES + 10
    huge = pb.ClusterResourceState(
        pending_resource_requests=[request({f"r{i}": 1.0}) for i in range(L.MAX_SHAPES + 50)],
        pending_gang_resource_requests=[gang(f"{i:036x}", "PACK", [{"CPU": 1.0}] * 900) for i in range(15)],
        node_states=[pb.NodeState(node_id=bytes([i % 256, i // 256]), status=pb.IDLE,
                                  total_resources={f"res{j}": 1.0 for j in range(many if i == 0 else 2)})
                     for i in range(L.MAX_NODES + 5)],
    )
    load = L.load_from_state(huge, collected_at=0)
    assert len(load["pending"]) == L.MAX_SHAPES
    assert len(load["nodes"]) == L.MAX_NODES and len(load["nodes"][0]["total"]) == L.MAX_RESOURCES
    assert sum(len(g["bundles"]) for g in load["gangs"]) <= L.MAX_BUNDLES_TOTAL


# --- the agent: load in the head's heartbeat, and the fast path ---------------------------------------------------


class FakeGcs:
    """Answers like `ray._raylet.GcsClient` for the two calls the reader makes."""

    def __init__(self) -> None:
        self.state = pb.ClusterResourceState()
        self.calls = 0

    def get_cluster_resource_state(self, timeout_s: float | None = None) -> bytes:
        self.calls += 1
        return pb.GetClusterResourceStateReply(cluster_resource_state=self.state).SerializeToString()

    def internal_kv_get(self, key: bytes, namespace: object = None, timeout: float | None = None) -> bytes | None:
        return None


class FakeProbe:
    def __init__(self, gcs: FakeGcs) -> None:
        self.client = gcs

    def alive_nodes(self, timeout_s: float = 2.0) -> list[dict]:
        return [{"node_id": "aa" * 28}]


def head_agent(tmp_path, gcs: FakeGcs, client: AgentClient | None = None) -> Agent:
    config = AgentConfig(control_plane_url="http://127.0.0.1:9", bootstrap_token="b", node_key="k",
                         state_dir=str(tmp_path), address="127.0.0.1")
    agent = Agent(config, client=client)
    agent.spec = RaySpec(role="head", num_cpus=1)
    agent.identity = Identity("n1", "tok", {})
    agent._probe = FakeProbe(gcs)  # type: ignore[assignment]
    agent.set_state("ready")
    return agent


def test_only_a_ready_head_reports_load(tmp_path) -> None:
    gcs = FakeGcs()
    gcs.state = pb.ClusterResourceState(pending_resource_requests=[request({"CPU": 1.0}, 2)])
    agent = head_agent(tmp_path, gcs)
    assert agent.heartbeat_body()["ray"]["load"]["pending"] == [{"shape": {"CPU": 1.0}, "count": 2}]
    agent.spec = RaySpec(role="worker", num_cpus=1)
    assert agent.heartbeat_body()["ray"]["load"] is None


def test_new_demand_wakes_the_heartbeat_once(tmp_path) -> None:
    gcs = FakeGcs()
    agent = head_agent(tmp_path, gcs)
    agent.heartbeat_body()  # the last heartbeat: nothing waiting
    assert agent.check_new_demand() is False
    # when: work starts waiting
    gcs.state = pb.ClusterResourceState(pending_resource_requests=[request({"CPU": 1.0}, 3)])
    # then: the next check says "heartbeat now", and only once
    assert agent.check_new_demand() is True
    assert agent.check_new_demand() is False
    # a count change of a shape already seen is no new demand; a new shape or a new group is
    gcs.state = pb.ClusterResourceState(pending_resource_requests=[request({"CPU": 1.0}, 9)])
    assert agent.check_new_demand() is False
    gcs.state.pending_gang_resource_requests.append(gang(PG_A, "STRICT_SPREAD", [{"CPU": 1.0}] * 2))
    assert agent.check_new_demand() is True
    # a heartbeat that already carried the demand: nothing new when the check runs after it
    gcs.state.pending_resource_requests.append(request({"GPU": 1.0}))
    agent.heartbeat_body()
    assert agent.check_new_demand() is False
    # demand pinned to an existing node or to a placed group never wakes anyone
    gcs.state.pending_resource_requests.append(request({"CPU": 1.0, "node:__internal_head__": 0.01}))
    assert agent.check_new_demand() is False


def test_the_loop_check_wakes_the_loop_and_is_rate_limited(tmp_path) -> None:
    gcs = FakeGcs()
    agent = head_agent(tmp_path, gcs)
    agent._wake.clear()
    gcs.state = pb.ClusterResourceState(pending_resource_requests=[request({"CPU": 1.0})])
    agent._maybe_fast_heartbeat(100.0)
    assert agent._wake.is_set() and gcs.calls == 1
    agent._maybe_fast_heartbeat(100.1)  # within LOAD_CHECK_S: no GCS call
    assert gcs.calls == 1
    agent._maybe_fast_heartbeat(100.0 + LOAD_CHECK_S)
    assert gcs.calls == 2


def test_a_refused_load_is_dropped_and_the_heartbeat_still_goes_out(tmp_path) -> None:
    sent: list[dict] = []

    class Picky(AgentClient):
        def heartbeat(self, node_id, node_token, body, timeout_s=None):  # type: ignore[no-untyped-def]
            sent.append(json.loads(json.dumps(body)))
            if body["ray"]["load"] is not None:
                raise ProtocolError("HTTP 400: bad load")
            return {"commands": [], "heartbeat_interval_s": 1.0}

    gcs = FakeGcs()
    agent = head_agent(tmp_path, gcs, client=Picky("http://127.0.0.1:9"))
    assert agent.send_heartbeat() == {"commands": [], "heartbeat_interval_s": 1.0}
    assert [b["ray"]["load"] is None for b in sent] == [False, True]
