"""`plan()` and `target_status()` on plain values: every rule as a row of a table."""

from __future__ import annotations

import pytest

from clusters.choices import ClusterStatus as C
from clusters.choices import NodeRole
from clusters.choices import NodeState as N
from clusters.planner import STATUS_PATHS, ClusterView, GroupView, Launch, NodeView, plan, target_status
from clusters.transitions import CLUSTER_TRANSITIONS

H, W = NodeRole.HEAD, NodeRole.WORKER


def cluster(status: str = C.RUNNING, *groups: GroupView) -> ClusterView:
    return ClusterView(status=status, head_instance_type="local.small", groups=groups or (cpu(1, 1),))


def cpu(min_workers: int, desired: int, name: str = "cpu") -> GroupView:
    return GroupView(name, "local.medium", min_workers, desired)


def head(state: str = N.READY, id: int = 1) -> NodeView:
    return NodeView(id, f"head-{id}", H, "head", state)


def worker(id: int, state: str = N.READY, group: str = "cpu") -> NodeView:
    return NodeView(id, f"{group}-{id}", W, group, state)


# --- launches ---------------------------------------------------------------------------


def test_a_new_cluster_launches_its_head_and_min_workers():
    result = plan(cluster(C.PENDING, cpu(2, 2)), [])
    assert result.launches == [
        Launch(H, "head", "local.small"),
        Launch(W, "cpu", "local.medium"),
        Launch(W, "cpu", "local.medium"),
    ]
    assert result.terminations == []
    assert result.status == C.PROVISIONING


def test_a_converged_cluster_plans_nothing():
    result = plan(cluster(C.RUNNING, cpu(1, 2)), [head(), worker(2), worker(3)])
    assert (result.launches, result.terminations, result.status) == ([], [], None)


@pytest.mark.parametrize(
    ("workers", "desired", "launches"),
    [
        ([], 3, 3),
        ([worker(2)], 3, 2),
        ([worker(2, N.REQUESTED), worker(3, N.BOOTING)], 3, 1),  # nodes on their way count
        ([worker(2, N.DRAINING)], 1, 1),  # a draining node is leaving: it does not count
        ([worker(2, N.LOST), worker(3, N.TERMINATING)], 1, 1),  # neither do lost or terminating ones
    ],
)
def test_workers_below_desired_are_launched(workers: list[NodeView], desired: int, launches: int):
    result = plan(cluster(C.RUNNING, cpu(0, desired)), [head(), *workers])
    assert result.launches == [Launch(W, "cpu", "local.medium")] * launches
    assert result.terminations == []


def test_the_head_is_launched_when_missing_and_says_what_it_replaces():
    result = plan(cluster(C.UPDATING, cpu(0, 0)), [head(N.TERMINATED)], lost={"head": ["head-1"]})
    assert result.launches == [Launch(H, "head", "local.small", replaces="head-1")]


def test_replacement_workers_name_the_lost_ones_in_order():
    result = plan(cluster(C.UPDATING, cpu(2, 2)), [head()], lost={"cpu": ["cpu-2", "cpu-3"]})
    assert [launch.replaces for launch in result.launches] == ["cpu-2", "cpu-3"]


def test_spot_groups_launch_spot_nodes():
    spot = GroupView("gpu", "local.gpu", 1, 1, spot=True)
    result = plan(cluster(C.RUNNING, spot), [head()])
    assert result.launches == [Launch(W, "gpu", "local.gpu", True)]


# --- terminations -----------------------------------------------------------------------


def test_surplus_workers_go_least_far_along_first_then_newest():
    nodes = [head(), worker(2, N.READY), worker(3, N.READY), worker(4, N.BOOTING), worker(5, N.REQUESTED),
             worker(6, N.PROVISIONING)]
    result = plan(cluster(C.RUNNING, cpu(0, 1)), nodes)
    assert [node_id for node_id, _ in result.terminations] == [5, 6, 4, 3]
    assert all(reason == "cpu scaled to 1" for _, reason in result.terminations)
    assert result.launches == []


def test_workers_of_a_removed_group_are_terminated():
    nodes = [head(), worker(2, group="old"), worker(3, N.DRAINING, group="old"), worker(4)]
    result = plan(cluster(C.RUNNING, cpu(1, 1)), nodes)
    assert result.terminations == [(2, "worker group old removed"), (3, "worker group old removed")]


def test_head_lost_terminates_workers_that_joined_it_and_keeps_those_still_waiting():
    nodes = [head(N.TERMINATED), worker(2, N.READY), worker(3, N.DRAINING), worker(4, N.BOOTING),
             worker(5, N.PROVISIONING)]
    result = plan(cluster(C.UPDATING, cpu(0, 3)), nodes, lost={"head": ["head-1"]})
    assert {node_id for node_id, _ in result.terminations} == {2, 3}
    assert result.launches[0] == Launch(H, "head", "local.small", replaces="head-1")
    # READY node 2 is on its way out and 3 was draining: one more worker keeps the group at 3
    assert result.launches[1:] == [Launch(W, "cpu", "local.medium")]


def test_a_second_live_head_is_terminated():
    result = plan(cluster(C.RUNNING, cpu(0, 0)), [head(id=1), head(N.BOOTING, id=2)])
    assert result.terminations == [(2, "duplicate head")]


@pytest.mark.parametrize(
    ("status", "reason", "done"),
    [(C.STOPPING, "cluster stopping", C.STOPPED), (C.TERMINATING, "cluster deleted", C.TERMINATED)],
)
def test_stopping_and_terminating_terminate_every_live_node(status: str, reason: str, done: str):
    nodes = [head(), worker(2, N.REQUESTED), worker(3, N.DRAINING), worker(4, N.TERMINATING)]
    result = plan(cluster(status), nodes)
    assert result.terminations == [(1, reason), (2, reason), (3, reason)]
    assert result.launches == []
    assert result.status is None  # not before the provider confirms every machine gone
    finished = plan(cluster(status), [head(N.TERMINATED), worker(2, N.TERMINATED)])
    assert (finished.terminations, finished.status) == ([], done)
    assert plan(cluster(status), []).status == done


@pytest.mark.parametrize("status", [C.STOPPED, C.FAILED, C.TERMINATED])
def test_a_cluster_at_rest_launches_nothing_and_terminates_stragglers(status: str):
    result = plan(cluster(status, cpu(2, 2)), [head(), worker(2, N.BOOTING), worker(3, N.TERMINATED)])
    assert result.launches == []
    assert [node_id for node_id, _ in result.terminations] == [1, 2]
    assert result.status is None


# --- status -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "nodes", "expected"),
    [
        (C.PENDING, [], C.PROVISIONING),
        (C.PENDING, [head(N.REQUESTED)], C.PROVISIONING),
        (C.PENDING, [head(N.PROVISIONING)], C.PROVISIONING),  # created, not yet booted
        (C.PROVISIONING, [head(N.PROVISIONING)], None),
        (C.PENDING, [head(N.BOOTING)], C.STARTING),
        (C.PROVISIONING, [head(N.REQUESTED)], None),
        (C.PROVISIONING, [head(N.BOOTING)], C.STARTING),
        (C.STARTING, [head(N.READY)], None),  # min_workers not ready yet
        (C.STARTING, [head(N.READY), worker(2, N.BOOTING)], None),
        (C.STARTING, [head(N.READY), worker(2, N.READY)], C.RUNNING),
        (C.PENDING, [head(N.READY), worker(2, N.READY)], C.RUNNING),
        (C.RUNNING, [head(N.READY), worker(2, N.READY)], None),
        (C.RUNNING, [head(N.READY), worker(2, N.LOST)], C.UPDATING),
        (C.RUNNING, [head(N.TERMINATED)], C.UPDATING),
        (C.UPDATING, [head(N.READY)], None),
        (C.UPDATING, [head(N.READY), worker(2, N.READY)], C.RUNNING),
        (C.STARTING, [], None),
        (C.STOPPING, [head()], None),
        (C.STOPPED, [], None),
        (C.FAILED, [head(), worker(2)], None),
        (C.TERMINATED, [], None),
    ],
)
def test_target_status(status: str, nodes: list[NodeView], expected: str | None):
    assert target_status(cluster(status, cpu(1, 1)), nodes) == expected


def test_ready_workers_of_another_group_do_not_make_a_cluster_healthy():
    view = cluster(C.STARTING, cpu(1, 1), cpu(1, 1, name="gpu"))
    assert target_status(view, [head(), worker(2), worker(3)]) is None
    assert target_status(view, [head(), worker(2), worker(3, group="gpu")]) == C.RUNNING


def test_status_paths_walk_only_allowed_edges_and_end_at_their_target():
    for (start, goal), steps in STATUS_PATHS.items():
        assert steps[-1] == goal
        for here, there in zip((start, *steps), steps, strict=False):
            assert there in CLUSTER_TRANSITIONS[here], f"{start}→{goal}: {here}→{there} is not an edge"


def test_every_status_the_planner_targets_has_a_path():
    """Whatever target_status() returns from a status, walk_status() can get there."""
    shapes = [[], [head(N.REQUESTED)], [head(N.PROVISIONING)], [head()], [head(), worker(2)], [head(N.LOST)]]
    for status in C.values:
        for nodes in shapes:
            goal = target_status(cluster(status, cpu(1, 1)), nodes)
            if goal is not None:
                assert (status, goal) in STATUS_PATHS, (status, goal)
