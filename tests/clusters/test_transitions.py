"""The cluster and node state tables, edge by edge (after Ray's test_instance_util.py).

A status added to the choices without a row in its table fails here until someone decides its edges.
"""

from __future__ import annotations

import itertools

import pytest

from clusters.choices import ClusterStatus, EventKind, NodeRole, NodeState
from clusters.models import Cluster, ClusterEvent, Node
from clusters.transitions import (
    CLUSTER_TRANSITIONS,
    NODE_TRANSITIONS,
    InvalidTransition,
    cluster_transition,
    node_transition,
)
from tests.factories import ClusterFactory, NodeFactory

pytestmark = pytest.mark.django_db

CLUSTER_PAIRS = [(a, b) for a, b in itertools.product(ClusterStatus.values, repeat=2) if a != b]
NODE_PAIRS = [(a, b) for a, b in itertools.product(NodeState.values, repeat=2) if a != b]


def test_every_cluster_status_has_a_row_and_only_known_targets():
    assert set(CLUSTER_TRANSITIONS) == set(ClusterStatus.values)
    for targets in CLUSTER_TRANSITIONS.values():
        assert set(targets) <= set(ClusterStatus.values)


def test_every_node_state_has_a_row_and_only_known_targets():
    assert set(NODE_TRANSITIONS) == set(NodeState.values)
    for targets in NODE_TRANSITIONS.values():
        assert set(targets) <= set(NodeState.values)


def test_terminal_states_have_no_way_out_and_every_state_can_reach_terminal():
    assert CLUSTER_TRANSITIONS[ClusterStatus.TERMINATED] == frozenset()
    assert NODE_TRANSITIONS[NodeState.TERMINATED] == frozenset()

    def reaches(table: dict, start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            state = todo.pop()
            if state == goal:
                return True
            seen.add(state)
            todo += [s for s in table[state] if s not in seen]
        return False

    # Nothing can get stuck for good: a cluster can always be deleted, a machine always terminated.
    assert all(reaches(CLUSTER_TRANSITIONS, s, ClusterStatus.TERMINATED) for s in ClusterStatus.values)
    assert all(reaches(NODE_TRANSITIONS, s, NodeState.TERMINATED) for s in NodeState.values)


@pytest.mark.parametrize(("current", "to"), CLUSTER_PAIRS, ids=[f"{a}->{b}" for a, b in CLUSTER_PAIRS])
def test_cluster_transition_edge(current: str, to: str):
    # given
    cluster = ClusterFactory(status=current, groups=[])
    events_before = ClusterEvent.objects.filter(cluster=cluster).count()
    # when / then
    if to in CLUSTER_TRANSITIONS[current]:
        assert cluster_transition(cluster=cluster, to=to, message="because") is True
        cluster.refresh_from_db()
        assert cluster.status == to
        assert cluster.status_message == "because"
        assert (cluster.terminated_at is not None) == (to == ClusterStatus.TERMINATED)
        event = ClusterEvent.objects.filter(cluster=cluster).order_by("-id").first()
        assert ClusterEvent.objects.filter(cluster=cluster).count() == events_before + 1
        assert event.kind == EventKind.CLUSTER_STATUS
        assert event.data == {"from": current, "to": to}
    else:
        with pytest.raises(InvalidTransition):
            cluster_transition(cluster=cluster, to=to)
        cluster.refresh_from_db()
        assert cluster.status == current
        assert ClusterEvent.objects.filter(cluster=cluster).count() == events_before


@pytest.mark.parametrize(("current", "to"), NODE_PAIRS, ids=[f"{a}->{b}" for a, b in NODE_PAIRS])
def test_node_transition_edge(current: str, to: str):
    # given
    node = NodeFactory(state=current, role=NodeRole.WORKER)
    # when / then
    if to in NODE_TRANSITIONS[current]:
        assert node_transition(node=node, to=to, reason="because") is True
        node.refresh_from_db()
        assert node.state == to
        assert node.state_reason == "because"
        assert (node.terminated_at is not None) == (to == NodeState.TERMINATED)
        assert (node.ready_at is not None) == (to == NodeState.READY)
        event = ClusterEvent.objects.get(node=node)
        assert event.kind == EventKind.NODE_STATE
        assert event.data == {"from": current, "to": to, "node": node.name}
    else:
        with pytest.raises(InvalidTransition):
            node_transition(node=node, to=to)
        node.refresh_from_db()
        assert node.state == current
        assert not ClusterEvent.objects.filter(node=node).exists()


@pytest.mark.parametrize("status", ClusterStatus.values)
def test_cluster_transition_to_the_same_status_is_a_no_op(status: str):
    cluster = ClusterFactory(status=status, groups=[])
    assert cluster_transition(cluster=cluster, to=status) is False
    assert not ClusterEvent.objects.filter(cluster=cluster).exists()


@pytest.mark.parametrize("state", NodeState.values)
def test_node_transition_to_the_same_state_is_a_no_op(state: str):
    node = NodeFactory(state=state)
    assert node_transition(node=node, to=state) is False
    assert not ClusterEvent.objects.filter(node=node).exists()


def test_cluster_compare_and_set_loses_when_the_row_moved_underneath():
    # given: two workers read the cluster while it was PENDING
    cluster = ClusterFactory(status=ClusterStatus.PENDING, groups=[])
    stale = Cluster.objects.get(pk=cluster.pk)
    assert cluster_transition(cluster=cluster, to=ClusterStatus.PROVISIONING) is True
    # when: the second one acts on what it read
    moved = cluster_transition(cluster=stale, to=ClusterStatus.TERMINATING)
    # then: it does nothing and records nothing
    assert moved is False
    assert Cluster.objects.get(pk=cluster.pk).status == ClusterStatus.PROVISIONING
    assert ClusterEvent.objects.filter(cluster=cluster, kind=EventKind.CLUSTER_STATUS).count() == 1


def test_node_compare_and_set_loses_when_the_row_moved_underneath():
    node = NodeFactory(state=NodeState.PROVISIONING)
    stale = Node.objects.get(pk=node.pk)
    assert node_transition(node=node, to=NodeState.BOOTING) is True
    assert node_transition(node=stale, to=NodeState.LOST) is False
    assert Node.objects.get(pk=node.pk).state == NodeState.BOOTING
    assert ClusterEvent.objects.filter(node=node).count() == 1
