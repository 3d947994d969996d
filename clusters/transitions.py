"""The cluster and node state machines: allowed edges and the one way to move along them.

Every transition is a compare-and-set on the current state that writes the new state and
a typed cluster event in one transaction. A `False` return means another worker moved the
row first: not an error, the caller re-reads and carries on.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from clusters.choices import ClusterStatus as C
from clusters.choices import EventKind, EventLevel
from clusters.choices import NodeState as N
from clusters.models import Cluster, ClusterEvent, Node

CLUSTER_TRANSITIONS: dict[str, frozenset[str]] = {
    # accepted → the reconciler starts creating machines / user stops or deletes first / cannot start
    C.PENDING: frozenset({C.PROVISIONING, C.STOPPING, C.TERMINATING, C.FAILED}),
    # head machine up, its agent bootstrapping → Ray starting / user stops or deletes / head cannot be launched
    C.PROVISIONING: frozenset({C.STARTING, C.STOPPING, C.TERMINATING, C.FAILED}),
    # head + min workers ready → running / a node was lost before that (stay, or re-provision)
    C.STARTING: frozenset({C.RUNNING, C.PROVISIONING, C.STOPPING, C.TERMINATING, C.FAILED}),
    # a node lost or the spec changed → updating / user stops or deletes
    C.RUNNING: frozenset({C.UPDATING, C.STOPPING, C.TERMINATING, C.FAILED}),
    # back to the desired shape → running / the head was lost: start over
    C.UPDATING: frozenset({C.RUNNING, C.PROVISIONING, C.STOPPING, C.TERMINATING, C.FAILED}),
    # every node gone → stopped / user deletes while stopping
    C.STOPPING: frozenset({C.STOPPED, C.TERMINATING}),
    # user starts it again / user deletes it
    C.STOPPED: frozenset({C.PROVISIONING, C.TERMINATING}),
    # every node confirmed gone
    C.TERMINATING: frozenset({C.TERMINATED}),
    C.TERMINATED: frozenset(),  # terminal
    # user retries (start) / user stops or deletes
    C.FAILED: frozenset({C.PROVISIONING, C.STOPPING, C.TERMINATING}),
}

NODE_TRANSITIONS: dict[str, frozenset[str]] = {
    # provider accepted / we decided against it before or while calling the provider
    N.REQUESTED: frozenset({N.PROVISIONING, N.TERMINATING}),
    # agent registered / agent reported Ray up directly / vanished or never registered / scale down
    N.PROVISIONING: frozenset({N.BOOTING, N.READY, N.LOST, N.TERMINATING}),
    # Ray node alive / stopped heartbeating / scale down or failure
    N.BOOTING: frozenset({N.READY, N.LOST, N.TERMINATING}),
    # scale down starts with a drain / heartbeats stopped / terminated at once (cluster stop)
    N.READY: frozenset({N.DRAINING, N.LOST, N.TERMINATING}),
    # drained / drain rejected (demand came back) / died while draining
    N.DRAINING: frozenset({N.TERMINATING, N.READY, N.LOST}),
    # provider confirmed the machine is gone
    N.TERMINATING: frozenset({N.TERMINATED}),
    N.TERMINATED: frozenset(),  # terminal
    # a lost node's machine is always terminated (it may still be running and billing)
    N.LOST: frozenset({N.TERMINATING}),
}


class InvalidTransition(Exception):
    def __init__(self, what: str, pk: int, current: str, to: str) -> None:
        super().__init__(f"{what} {pk}: {current} → {to} is not allowed")
        self.current = current
        self.to = to


def cluster_can_transition(current: str, to: str) -> bool:
    return to in CLUSTER_TRANSITIONS[current]


def node_can_transition(current: str, to: str) -> bool:
    return to in NODE_TRANSITIONS[current]


def record_event(
    *, cluster: Cluster, kind: str, message: str, node: Node | None = None, level: str = EventLevel.INFO,
    data: dict | None = None,
) -> ClusterEvent:
    return ClusterEvent.objects.create(
        cluster=cluster, node=node, kind=kind, level=level, message=message[:1000], data=data or {}
    )


@transaction.atomic
def cluster_transition(*, cluster: Cluster, to: str, message: str = "", level: str = EventLevel.INFO) -> bool:
    """Move `cluster` from its current status to `to`; write the status and an event together."""
    current = cluster.status
    if to == current:
        return False
    if not cluster_can_transition(current, to):
        raise InvalidTransition("cluster", cluster.pk, current, to)
    now = timezone.now()
    fields: dict = {"status": to, "status_message": message[:500], "status_changed_at": now, "updated_at": now}
    if to == C.TERMINATED:
        fields["terminated_at"] = now
    changed = Cluster.objects.filter(pk=cluster.pk, status=current).update(**fields)
    if not changed:
        return False
    for name, value in fields.items():
        setattr(cluster, name, value)
    text = f"Cluster {current} → {to}" + (f": {message}" if message else "")
    record_event(cluster=cluster, kind=EventKind.CLUSTER_STATUS, level=level, message=text,
                 data={"from": current, "to": to})
    return True


@transaction.atomic
def node_transition(
    *, node: Node, to: str, reason: str = "", level: str = EventLevel.INFO, kind: str = EventKind.NODE_STATE,
    extra: dict | None = None,
) -> bool:
    """Move `node` to `to` if it is still in the state we read; record an event. `extra` sets more fields."""
    current = node.state
    if to == current:
        return False
    if not node_can_transition(current, to):
        raise InvalidTransition("node", node.pk, current, to)
    now = timezone.now()
    fields: dict = {"state": to, "state_changed_at": now, "state_reason": reason[:500], **(extra or {})}
    if to == N.READY and node.ready_at is None:
        fields["ready_at"] = now
    if to == N.TERMINATED:
        fields["terminated_at"] = now
    changed = Node.objects.filter(pk=node.pk, state=current).update(**fields)
    if not changed:
        return False
    for name, value in fields.items():
        setattr(node, name, value)
    text = f"Node {node.name} {current} → {to}" + (f": {reason}" if reason else "")
    record_event(cluster=node.cluster, node=node, kind=kind, level=level, message=text,
                 data={"from": current, "to": to, "node": node.name})
    return True
