"""`autoscaler.planner` on plain values: every rule a row of a table, no database, milliseconds."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from autoscaler.planner import (
    Decision,
    Demand,
    Gang,
    Group,
    HeadNode,
    NodeType,
    Quotas,
    WorkerNode,
    auto_stop_due,
    cluster_idle_s,
    decide,
)

GIB = float(1 << 30)
SMALL = NodeType("local.small", {"CPU": 1, "memory": 2 * GIB})
MEDIUM = NodeType("local.medium", {"CPU": 2, "memory": 4 * GIB})
GPU = NodeType("local.gpu", {"CPU": 1, "GPU": 1, "memory": 4 * GIB})
C1 = {"CPU": 1}


def group(name: str = "cpu", node_type: NodeType = SMALL, min_workers: int = 0, max_workers: int = 3,
          idle_timeout_s: float = 300.0) -> Group:
    return Group(name, node_type, min_workers, max_workers, idle_timeout_s)


def ready(key: str, group: str = "cpu", node_type: NodeType = SMALL, idle_s: float | None = 0.0,
          free: dict[str, float] | None = None, ready_for_s: float = 3600.0, running: int | None = None) -> WorkerNode:
    total = dict(node_type.resources)
    if free is None:  # idle nodes have everything free, busy ones nothing
        free = total if idle_s else {k: 0.0 for k in total}
    return WorkerNode(key, key, group, "ready", total, free, ray_node_id=f"ray-{key}", idle_s=idle_s,
                      launched_at_s=ready_for_s + 30, ready_for_s=ready_for_s, running_tasks=running)


def launching(key: str, group: str = "cpu", node_type: NodeType = SMALL, ago: float = 10.0) -> WorkerNode:
    return WorkerNode(key, key, group, "launching", dict(node_type.resources), dict(node_type.resources),
                      launched_at_s=ago)


def draining(key: str, group: str = "cpu") -> WorkerNode:
    return WorkerNode(key, key, group, "draining", dict(SMALL.resources), dict(SMALL.resources), idle_s=900)


def pending(*items: tuple[dict[str, float], int], gangs: tuple[Gang, ...] = ()) -> Demand:
    return Demand(pending=list(items), gangs=list(gangs))


BUSY_HEAD = HeadNode({"CPU": 1}, {"CPU": 0})


@dataclass
class Case:
    groups: list[Group]
    demand: Demand = field(default_factory=Demand)
    nodes: list[WorkerNode] = field(default_factory=list)
    targets: dict[str, int] = field(default_factory=dict)
    capped: int = 0
    infeasible: int = 0
    waiting: int = 0
    head: HeadNode | None = BUSY_HEAD
    quotas: Quotas | None = None
    reasons: dict[str, str] = field(default_factory=dict)  # group -> exact launch reason
    says: tuple[str, ...] = ()  # substrings of capped / infeasible / waiting sentences


def run(case: Case) -> Decision:
    return decide(groups=case.groups, nodes=case.nodes, demand=case.demand, head=case.head, quotas=case.quotas)


# --- scale-up ---------------------------------------------------------------------------

SCALE_UP = {
    "whole backlog in one decision, capped by max_workers": Case(
        [group(max_workers=3)], pending((C1, 4)), targets={"cpu": 3}, capped=1,
        reasons={"cpu": "cpu: 0 → 3 for 3 pending {CPU: 1}"},
        says=("1 of 4 pending {CPU: 1} not placed: cpu at max_workers 3",)),
    "two per node on the 2-CPU type": Case(
        [group(node_type=MEDIUM, max_workers=10)], pending((C1, 6)), targets={"cpu": 3},
        reasons={"cpu": "cpu: 0 → 3 for 6 pending {CPU: 1}"}),
    "10,000 tasks, one decision": Case(
        [group(max_workers=20_000)], pending((C1, 10_000)), targets={"cpu": 10_000}),
    "free capacity of a ready worker absorbs demand": Case(
        [group(node_type=MEDIUM)], pending((C1, 2)), nodes=[ready("cpu-1", node_type=MEDIUM, idle_s=30)],
        targets={"cpu": 1}),
    "free capacity of the head absorbs demand": Case(
        [group()], pending((C1, 2)), head=HeadNode({"CPU": 2}, {"CPU": 2}), targets={"cpu": 0}),
    "a node on its way absorbs demand": Case(
        [group()], pending((C1, 1)), nodes=[launching("cpu-1")], targets={"cpu": 1}),
    "nodes on their way count, only the rest is launched": Case(
        [group(max_workers=5)], pending((C1, 3)), nodes=[launching("cpu-1")], targets={"cpu": 3},
        reasons={"cpu": "cpu: 1 → 3 for 2 pending {CPU: 1}"}),
    "busy ready workers do not absorb": Case(
        [group()], pending((C1, 1)), nodes=[ready("cpu-1")], targets={"cpu": 2}),
    "GPU work only on the GPU type": Case(
        [group(), group("gpu", GPU)], pending(({"GPU": 1}, 2)), targets={"cpu": 0, "gpu": 2},
        reasons={"gpu": "gpu: 0 → 2 for 2 pending {GPU: 1}"}),
    "CPU work not on the GPU type": Case(
        [group("gpu", GPU), group()], pending((C1, 2)), targets={"cpu": 2, "gpu": 0}),
    "CPU work on the GPU type when nothing else holds it": Case(
        [group("gpu", GPU)], pending((C1, 1)), targets={"gpu": 1}),
    "a capped CPU group does not spill onto GPU nodes": Case(
        [group(max_workers=1), group("gpu", GPU)], pending((C1, 3)), targets={"cpu": 1, "gpu": 0}, capped=2,
        says=("2 of 3 pending {CPU: 1} not placed: cpu at max_workers 1; GPU group gpu is kept for GPU work",)),
    "mixed groups: CPU and GPU work each on its type": Case(
        [group(node_type=MEDIUM, max_workers=5), group("gpu", GPU, max_workers=4)],
        pending((C1, 6), ({"CPU": 1, "GPU": 1}, 2)), targets={"cpu": 3, "gpu": 2}),
    "spare CPU of a GPU node takes CPU work after GPU work": Case(
        [group(), group("gpu", GPU)], pending(({"GPU": 1}, 1), (C1, 1)), targets={"cpu": 0, "gpu": 1}),
    "least waste: one CPU goes to the 1-CPU type": Case(
        [group("big", MEDIUM), group("small", SMALL)], pending((C1, 1)), targets={"big": 0, "small": 1}),
    "two CPUs need the 2-CPU type": Case(
        [group("small", SMALL), group("big", MEDIUM)], pending(({"CPU": 2}, 1)), targets={"small": 0, "big": 1}),
    "memory-heavy work goes to the type with the memory (kuberay#3214)": Case(
        [group("small", SMALL), group("big", MEDIUM)], pending(({"CPU": 1, "memory": 3 * GIB}, 2)),
        targets={"small": 0, "big": 2}),
    "when the best group is at max_workers, the next one that fits launches": Case(
        [group("small", SMALL, max_workers=1), group("big", MEDIUM)], pending((C1, 1)),
        nodes=[ready("small-1", "small")], targets={"small": 1, "big": 1}),
    "quota max_gpus": Case(
        [group("gpu", GPU, max_workers=4)], pending(({"GPU": 1}, 3)),
        quotas=Quotas(max_gpus=2, gpus_elsewhere=1), targets={"gpu": 1}, capped=2,
        says=("2 of 3 pending {GPU: 1} not placed: workspace quota max_gpus 2 reached "
              "(1 elsewhere, 1 in this cluster; a gpu node has 1)",)),
    "quota max_workers_total counts this cluster's nodes": Case(
        [group(max_workers=10)], pending((C1, 4)), nodes=[ready("cpu-1")],
        quotas=Quotas(max_workers_total=5, workers_elsewhere=2), targets={"cpu": 3}, capped=2,
        says=("workspace quota max_workers_total 5 reached (2 elsewhere, 3 in this cluster)",)),
    "over quota already: nothing launched, nothing killed": Case(
        [group(max_workers=10)], pending((C1, 1)), nodes=[ready("cpu-1"), ready("cpu-2")],
        quotas=Quotas(max_workers_total=2, workers_elsewhere=5), targets={"cpu": 2}, capped=1),
    "infeasible {CPU: 64} launches nothing": Case(
        [group(), group("medium", MEDIUM)], pending(({"CPU": 64}, 2), (C1, 1)), targets={"cpu": 1, "medium": 0},
        infeasible=2, says=("no worker type can ever fit {CPU: 64}: largest is local.medium {CPU: 2}",)),
    "infeasible resource no type has": Case(
        [group()], pending(({"TPU": 1}, 1)), targets={"cpu": 0}, infeasible=1,
        says=("no worker type can ever fit {TPU: 1}: no type has TPU",)),
    "infeasible memory names the largest memory": Case(
        [group(), group("gpu", GPU)], pending(({"memory": 64 * GIB}, 1)), targets={"cpu": 0, "gpu": 0},
        infeasible=1, says=("no worker type can ever fit {memory: 64 GiB}: largest is local.gpu {memory: 4 GiB}",)),
    "only the head could hold it: waits, launches nothing": Case(
        [group()], pending(({"CPU": 4}, 1)), head=HeadNode({"CPU": 4}, {"CPU": 1}), targets={"cpu": 0},
        waiting=1),
    "min_workers is met first": Case(
        [group(min_workers=2)], targets={"cpu": 2}, reasons={"cpu": "cpu: 0 → 2 for min_workers 2"}),
    "min_workers nodes absorb demand": Case([group(min_workers=2)], pending((C1, 2)), targets={"cpu": 2}),
    "draining nodes count for nothing": Case(
        [group(min_workers=1)], nodes=[draining("cpu-1")], targets={"cpu": 1}),
    "nodes of a removed group are ignored": Case(
        [group()], pending((C1, 1)), nodes=[ready("old-1", group="old", idle_s=50)], targets={"cpu": 1}),
    "busy nodes hold the target up with no demand": Case(
        [group()], nodes=[ready("cpu-1"), ready("cpu-2"), ready("cpu-3")], targets={"cpu": 3}),
}


@pytest.mark.parametrize("case", SCALE_UP.values(), ids=SCALE_UP.keys())
def test_scale_up(case: Case) -> None:
    # when
    decision = run(case)
    # then
    assert decision.targets == case.targets
    assert (decision.tally.capped, decision.tally.infeasible, decision.tally.waiting) == (
        case.capped, case.infeasible, case.waiting)
    assert decision.tally.total == case.demand.units
    for name, reason in case.reasons.items():
        assert decision.launch_reasons[name] == reason
    sentences = decision.capped + decision.waiting + [reason for _, _, reason in decision.infeasible]
    for text in case.says:
        assert any(text in s for s in sentences), (text, sentences)


def test_infeasible_entries_carry_shape_and_count() -> None:
    decision = run(SCALE_UP["infeasible {CPU: 64} launches nothing"])
    assert decision.infeasible == [
        ({"CPU": 64.0}, 2, "no worker type can ever fit {CPU: 64}: largest is local.medium {CPU: 2}")]
    assert decision.launch_reasons == {"cpu": "cpu: 0 → 1 for 1 pending {CPU: 1}"}


# --- placement groups -------------------------------------------------------------------


def gang(strategy: str, n: int, bundle: dict[str, float] | None = None, name: str = "pg") -> Gang:
    return Gang(strategy, [bundle or C1] * n, name)  # type: ignore[arg-type]


GANGS = {
    "STRICT_SPREAD over 3 bundles: 3 distinct nodes": Case(
        [group(node_type=MEDIUM, max_workers=5)], pending(gangs=(gang("STRICT_SPREAD", 3),)), targets={"cpu": 3},
        reasons={"cpu": "cpu: 0 → 3 for 3 bundles of placement group pg (STRICT_SPREAD)"}),
    "STRICT_SPREAD counts an existing node with room, once": Case(
        [group(node_type=MEDIUM, max_workers=5)], pending(gangs=(gang("STRICT_SPREAD", 3),)),
        nodes=[ready("cpu-1", node_type=MEDIUM, idle_s=20)], targets={"cpu": 3}),
    "STRICT_SPREAD uses the head and a ready node": Case(
        [group(max_workers=5)], pending(gangs=(gang("STRICT_SPREAD", 3),)), head=HeadNode({"CPU": 2}, {"CPU": 2}),
        nodes=[ready("cpu-1", idle_s=20)], targets={"cpu": 2}),
    "STRICT_SPREAD beyond max_workers is all or nothing": Case(
        [group(max_workers=2)], pending(gangs=(gang("STRICT_SPREAD", 3),)), targets={"cpu": 0}, capped=3,
        says=("placement group pg (STRICT_SPREAD), 3 x {CPU: 1} not placed: needs 3 distinct nodes; "
              "cpu at max_workers 2",)),
    "STRICT_PACK sums its bundles onto one node of a type that holds them": Case(
        [group("small", SMALL), group("big", MEDIUM)], pending(gangs=(gang("STRICT_PACK", 2),)),
        targets={"small": 0, "big": 1}),
    "STRICT_PACK bigger than any type is infeasible": Case(
        [group(node_type=MEDIUM)], pending(gangs=(gang("STRICT_PACK", 3),)), targets={"cpu": 0}, infeasible=3,
        says=("placement group pg (STRICT_PACK), 3 x {CPU: 1}: no worker type can ever fit {CPU: 3}",)),
    "PACK that no node holds spreads": Case(
        [group()], pending(gangs=(gang("PACK", 3),)), targets={"cpu": 3}),
    "PACK packs onto one new node when it fits": Case(
        [group(node_type=MEDIUM)], pending(gangs=(gang("PACK", 2),)), targets={"cpu": 1}),
    "PACK onto free capacity: no launch": Case(
        [group(node_type=MEDIUM)], pending(gangs=(gang("PACK", 2),)),
        nodes=[ready("cpu-1", node_type=MEDIUM, idle_s=20)], targets={"cpu": 1}),
    "SPREAD may share existing room rather than launch": Case(
        [group(node_type=MEDIUM)], pending(gangs=(gang("SPREAD", 2),)),
        nodes=[ready("cpu-1", node_type=MEDIUM, idle_s=20)], targets={"cpu": 1}),
    "gangs and tasks together; CPU work uses the spare CPUs of GPU nodes launched anyway": Case(
        [group(max_workers=10), group("gpu", GPU)],
        pending((C1, 2), gangs=(gang("STRICT_SPREAD", 2, {"GPU": 1}), gang("STRICT_PACK", 1))),
        targets={"cpu": 1, "gpu": 2}),
    "an identical gang after a failed one fails too": Case(
        [group(max_workers=2)], pending(gangs=(gang("STRICT_SPREAD", 3, name="a"), gang("STRICT_SPREAD", 3, name="b"))),
        targets={"cpu": 0}, capped=6),
}


@pytest.mark.parametrize("case", GANGS.values(), ids=GANGS.keys())
def test_placement_groups(case: Case) -> None:
    test_scale_up(case)


# --- scale-down -------------------------------------------------------------------------


@dataclass
class Down:
    nodes: list[WorkerNode]
    drain: list[tuple[str, str]]  # (key, exact reason), in order
    keep: dict[str, str] = field(default_factory=dict)  # key -> exact reason
    target: int = 0
    min_workers: int = 0
    idle_timeout_s: float = 300.0
    demand: Demand = field(default_factory=Demand)
    max_workers: int = 5


SCALE_DOWN = {
    "idle exactly at the timeout stays": Down(
        [ready("cpu-1", idle_s=300)], [], {"cpu-1": "kept: idle 5m of 5m"}, target=1),
    "idle just over the timeout is drained": Down(
        [ready("cpu-1", idle_s=312)], [("cpu-1", "node cpu-1 idle 5m12s > 5m → draining")], target=0),
    "min_workers floor": Down(
        [ready("cpu-1", idle_s=900)], [], {"cpu-1": "kept: min_workers 1 (idle 15m)"}, target=1, min_workers=1),
    "min_workers keeps the least idle, drains the longest idle": Down(
        [ready("cpu-1", idle_s=400), ready("cpu-2", idle_s=900), ready("cpu-3", idle_s=500)],
        [("cpu-2", "node cpu-2 idle 15m > 5m → draining"), ("cpu-3", "node cpu-3 idle 8m20s > 5m → draining")],
        {"cpu-1": "kept: min_workers 1 (idle 6m40s)"}, target=1, min_workers=1),
    "pending demand keeps a node it fits on": Down(
        [ready("cpu-1", idle_s=400)], [], {"cpu-1": "kept: pending {CPU: 1} fits on it"}, target=1,
        demand=pending((C1, 1))),
    "demand lands on the least idle node; the longest idle goes": Down(
        [ready("cpu-1", idle_s=900), ready("cpu-2", idle_s=400)], [("cpu-1", "node cpu-1 idle 15m > 5m → draining")],
        {"cpu-2": "kept: pending {CPU: 1} fits on it"}, target=1, demand=pending((C1, 1))),
    "demand that does not fit does not keep a node": Down(
        [ready("cpu-1", idle_s=400)], [("cpu-1", "node cpu-1 idle 6m40s > 5m → draining")], target=0,
        demand=pending(({"CPU": 1, "GPU": 1}, 1))),
    "a new node gets a grace even with idle timeout 0": Down(
        [ready("cpu-1", idle_s=2, ready_for_s=2)], [],
        {"cpu-1": "kept: launched 2s ago for pending demand (grace 5s)"}, target=1, idle_timeout_s=0),
    "a node with no launch time is not held by the grace": Down(
        [WorkerNode("cpu-1", "cpu-1", "cpu", "ready", dict(SMALL.resources), dict(SMALL.resources), idle_s=1)],
        [("cpu-1", "node cpu-1 idle 1s > 0s → draining")], target=0, idle_timeout_s=0),
    "after the grace, idle timeout 0 drains": Down(
        [ready("cpu-1", idle_s=6, ready_for_s=6)], [("cpu-1", "node cpu-1 idle 6s > 0s → draining")], target=0,
        idle_timeout_s=0),
    "grace is at least the idle timeout": Down(
        [ready("cpu-1", idle_s=70, ready_for_s=50)], [],
        {"cpu-1": "kept: launched 50s ago for pending demand (grace 1m)"}, target=1, idle_timeout_s=60),
    "running tasks keep a node": Down(
        [ready("cpu-1", idle_s=900, running=2)], [], {"cpu-1": "kept: 2 tasks running"}, target=1),
    "a busy node says what it uses": Down(
        [ready("cpu-1", idle_s=0)], [], {"cpu-1": "kept: busy (CPU 1 of 1 in use)"}, target=1),
    "unknown idle time keeps a node": Down(
        [ready("cpu-1", idle_s=None)], [], {"cpu-1": "kept: Ray has not reported its idle time"}, target=1),
    "a launching node is kept": Down(
        [launching("cpu-1", ago=20)], [], {"cpu-1": "kept: launching (20s ago)"}, target=1),
    "a launching node with demand says so": Down(
        [launching("cpu-1")], [], {"cpu-1": "kept: launching, pending {CPU: 1} will run on it"}, target=1,
        demand=pending((C1, 1))),
    "max_workers lowered: surplus idle nodes first, longest idle first": Down(
        [ready("cpu-1"), ready("cpu-2", idle_s=100), ready("cpu-3", idle_s=200), launching("cpu-4")],
        [("cpu-3", "node cpu-3: cpu has 4 nodes, over max_workers 2 → draining"),
         ("cpu-2", "node cpu-2: cpu has 4 nodes, over max_workers 2 → draining")],
        {"cpu-1": "kept: busy (CPU 1 of 1 in use)", "cpu-4": "kept: launching (10s ago)"}, target=2, max_workers=2),
    "max_workers lowered below busy nodes: nodes still launching go before busy ones": Down(
        [ready("cpu-1"), launching("cpu-2", ago=5), launching("cpu-3", ago=50)],
        [("cpu-2", "node cpu-2: cpu has 3 nodes, over max_workers 1 → draining"),
         ("cpu-3", "node cpu-3: cpu has 3 nodes, over max_workers 1 → draining")], target=1, max_workers=1),
}


@pytest.mark.parametrize("case", SCALE_DOWN.values(), ids=SCALE_DOWN.keys())
def test_scale_down(case: Down) -> None:
    # given
    g = group(min_workers=case.min_workers, max_workers=case.max_workers, idle_timeout_s=case.idle_timeout_s)
    # when
    decision = decide(groups=[g], nodes=case.nodes, demand=case.demand, head=BUSY_HEAD)
    # then
    assert decision.drain == case.drain
    keep = dict(decision.keep)
    for key, reason in case.keep.items():
        assert keep[key] == reason
    assert decision.targets == {"cpu": case.target}
    assert not decision.launch_reasons
    assert {k for k, _ in decision.drain} | set(keep) == {n.key for n in case.nodes if n.state != "draining"}


# --- cluster idle and auto-stop ---------------------------------------------------------


@pytest.mark.parametrize(
    ("head_idle", "workers", "demand", "expected"),
    [
        (600.0, [ready("cpu-1", idle_s=400)], Demand(), 400.0),  # the least idle node decides
        (600.0, [], pending((C1, 1)), 0.0),  # pending demand: not idle
        (600.0, [ready("cpu-1", idle_s=0)], Demand(), 0.0),  # a busy node: not idle
        (600.0, [ready("cpu-1", idle_s=900, running=1)], Demand(), 0.0),  # running tasks
        (None, [], Demand(), None),  # unknown
        (600.0, [ready("cpu-1", idle_s=None)], Demand(), None),
        (600.0, [launching("cpu-1"), draining("cpu-2")], Demand(), 600.0),  # not Ray's work
    ],
    ids=["least-idle", "pending", "busy", "running-tasks", "unknown-head", "unknown-node", "launching-draining"],
)
def test_cluster_idle_s(head_idle, workers, demand, expected) -> None:
    head = HeadNode({"CPU": 1}, {"CPU": 1}, idle_s=head_idle)
    assert cluster_idle_s(head=head, nodes=workers, demand=demand) == expected


def test_cluster_idle_s_without_a_head_is_unknown() -> None:
    assert cluster_idle_s(head=None, nodes=[], demand=Demand()) is None


@pytest.mark.parametrize(
    ("idle_s", "job", "minutes", "due"),
    [
        (601.0, False, 10, True),
        (600.0, False, 10, False),  # exactly at the limit: not yet (as node idle timeouts)
        (3600.0, True, 10, False),  # a running job
        (3600.0, False, None, False),  # auto-stop off
        (None, False, 10, False),  # idle time unknown
        (0.5, False, 0, True),
    ],
    ids=["over", "exactly", "job-running", "off", "unknown", "zero-minutes"],
)
def test_auto_stop_due(idle_s, job, minutes, due) -> None:
    assert auto_stop_due(idle_s, job, minutes) is due


# --- properties, over seeded random clusters --------------------------------------------

TYPES = [SMALL, MEDIUM, GPU, NodeType("big.gpu", {"CPU": 8, "GPU": 2, "memory": 32 * GIB}),
         NodeType("big.cpu", {"CPU": 16, "memory": 64 * GIB})]
SHAPES = [C1, {"CPU": 2}, {"CPU": 0.5}, {"GPU": 1}, {"CPU": 1, "GPU": 1}, {"CPU": 4, "memory": 8 * GIB},
          {"CPU": 64}, {"CPU": 1, "memory": 3 * GIB}, {"TPU": 1}]


def random_cluster(rng: random.Random) -> tuple[list[Group], list[WorkerNode], Demand, Quotas | None]:
    groups = []
    for i in range(rng.randint(1, 3)):
        lo = rng.randint(0, 2)
        groups.append(group(f"g{i}", rng.choice(TYPES), lo, lo + rng.randint(0, 6), rng.choice([0, 60, 300])))
    nodes = []
    for j in range(rng.randint(0, 10)):
        g = rng.choice(groups)
        state = rng.choice(["ready", "ready", "launching", "draining"])
        if state == "ready":
            idle = rng.choice([None, 0.0, rng.uniform(0, 900)])
            nodes.append(ready(f"n{j}", g.name, g.node_type, idle_s=idle, ready_for_s=rng.uniform(0, 900)))
        elif state == "launching":
            nodes.append(launching(f"n{j}", g.name, g.node_type, ago=rng.uniform(0, 100)))
        else:
            nodes.append(WorkerNode(f"n{j}", f"n{j}", g.name, "draining", dict(g.node_type.resources), {}))
    demand = Demand(
        pending=[(rng.choice(SHAPES), rng.randint(1, 40)) for _ in range(rng.randint(0, 5))],
        gangs=[Gang(rng.choice(["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]),
                    [rng.choice(SHAPES[:6]) for _ in range(rng.randint(1, 4))], f"pg{k}")
               for k in range(rng.randint(0, 3))],
    )
    quotas = rng.choice([None, Quotas(max_workers_total=rng.randint(0, 15), workers_elsewhere=rng.randint(0, 5),
                                      max_gpus=rng.choice([None, 2, 4]), gpus_elsewhere=rng.randint(0, 2))])
    return groups, nodes, demand, quotas


def test_properties_over_random_clusters() -> None:
    rng = random.Random(20240603)
    for _ in range(400):
        groups, nodes, demand, quotas = random_cluster(rng)
        decision = decide(groups=groups, nodes=nodes, demand=demand, head=BUSY_HEAD, quotas=quotas)
        current = {g.name: sum(1 for n in nodes if n.group == g.name and n.state != "draining") for g in groups}
        # targets within [min, max]
        for g in groups:
            assert g.min_workers <= decision.targets[g.name] <= g.max_workers
        # quotas: exceeded only as far as existing nodes and min_workers force
        if quotas and quotas.max_workers_total is not None:
            floor = sum(max(g.min_workers, current[g.name]) for g in groups)
            room = quotas.max_workers_total - quotas.workers_elsewhere
            assert sum(decision.targets.values()) <= max(floor, room)
        if quotas and quotas.max_gpus is not None:
            gpus = {g.name: g.node_type.resources.get("GPU", 0) for g in groups}
            floor = sum(max(g.min_workers, current[g.name]) * gpus[g.name] for g in groups)
            room = quotas.max_gpus - quotas.gpus_elsewhere
            assert sum(decision.targets[g] * gpus[g] for g in gpus) <= max(floor, room) + 1e-9
        # every pending unit is placed, capped, waiting or infeasible
        assert decision.tally.total == demand.units
        # every live worker is either drained or kept, once
        live = [n.key for n in nodes if n.state != "draining" and n.group in current]
        verdicts = [k for k, _ in decision.drain] + [k for k, _ in decision.keep]
        assert sorted(verdicts) == sorted(live)


def carry_out(groups: list[Group], nodes: list[WorkerNode], decision: Decision, tag: str) -> list[WorkerNode]:
    """The nodes after a decision: drained ones gone, launched ones on their way."""
    drained = {k for k, _ in decision.drain}
    after = [n for n in nodes if n.key not in drained and n.state != "draining"]
    for g in groups:
        have = sum(1 for n in after if n.group == g.name)
        after += [launching(f"{g.name}-{tag}-{i}", g.name, g.node_type) for i in range(decision.targets[g.name] - have)]
    return after


def test_nodes_launched_by_a_decision_satisfy_the_next_ones() -> None:
    """No over-provisioning loop: once launched nodes are on their way, the same demand
    launches nothing more. Task demand is stable at once; placement groups of mixed shapes
    may take one more node on the second decision (first fit is a heuristic), never a third.
    A drain that frees quota may also let the next decision launch what was capped."""
    rng = random.Random(7)
    for _ in range(500):
        groups, nodes, demand, quotas = random_cluster(rng)
        first = decide(groups=groups, nodes=nodes, demand=demand, head=BUSY_HEAD, quotas=quotas)
        nodes = carry_out(groups, nodes, first, "a")
        second = decide(groups=groups, nodes=nodes, demand=demand, head=BUSY_HEAD, quotas=quotas)
        if not demand.gangs and not (first.drain and quotas):
            assert not second.launch_reasons, (first, second)
        third = decide(groups=groups, nodes=carry_out(groups, nodes, second, "b"), demand=demand, head=BUSY_HEAD,
                       quotas=quotas)
        assert not third.launch_reasons, (first, second, third)
