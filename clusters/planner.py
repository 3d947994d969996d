"""The reconciler's pure half: from desired and recorded state to actions. No I/O here.

`plan()` takes plain values and returns what to launch, what to terminate and which
status the cluster should reach, so every rule is testable as a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clusters.choices import ClusterStatus as C
from clusters.choices import NodeRole
from clusters.choices import NodeState as N

# Nodes the plan counts towards a group's size (DRAINING nodes are on their way out).
ACTIVE = frozenset({N.REQUESTED, N.PROVISIONING, N.BOOTING, N.READY})
LIVE = ACTIVE | {N.DRAINING}
# Which surplus node to give up first: the least far along, then the newest.
SURPLUS_ORDER = {N.REQUESTED: 0, N.PROVISIONING: 1, N.BOOTING: 2, N.READY: 3}


@dataclass(frozen=True)
class GroupView:
    name: str
    instance_type: str
    min_workers: int
    desired_workers: int
    spot: bool = False


@dataclass(frozen=True)
class NodeView:
    id: int
    name: str
    role: str
    group_name: str
    state: str


@dataclass(frozen=True)
class ClusterView:
    status: str
    head_instance_type: str
    groups: tuple[GroupView, ...]


@dataclass(frozen=True)
class Launch:
    role: str
    group_name: str
    instance_type: str
    spot: bool = False
    replaces: str = ""  # the lost node this one replaces, for the event


@dataclass
class Plan:
    launches: list[Launch] = field(default_factory=list)
    terminations: list[tuple[int, str]] = field(default_factory=list)  # (node id, reason)
    status: str | None = None  # the status to reach, or None to stay


def healthy(cluster: ClusterView, nodes: list[NodeView]) -> bool:
    """The head and every group's min_workers are READY."""
    if not any(n.role == NodeRole.HEAD and n.state == N.READY for n in nodes):
        return False
    for group in cluster.groups:
        ready = sum(1 for n in nodes if n.role == NodeRole.WORKER and n.group_name == group.name and n.state == N.READY)
        if ready < group.min_workers:
            return False
    return True


def target_status(cluster: ClusterView, nodes: list[NodeView]) -> str | None:
    """Where a cluster that wants its nodes should be, given its nodes; None to stay."""
    status = cluster.status
    if status not in (C.PENDING, C.PROVISIONING, C.STARTING, C.RUNNING, C.UPDATING):
        return None
    if healthy(cluster, nodes):
        return C.RUNNING if status != C.RUNNING else None
    if status in (C.RUNNING, C.UPDATING):
        return C.UPDATING if status == C.RUNNING else None
    # STARTING once the head machine is up and its agent bootstrapping Ray (not merely requested).
    head_up = any(n.role == NodeRole.HEAD and n.state in (N.BOOTING, N.READY) for n in nodes)
    if head_up:
        return C.STARTING if status != C.STARTING else None
    return C.PROVISIONING if status == C.PENDING else None


def plan(cluster: ClusterView, nodes: list[NodeView], lost: dict[str, list[str]] | None = None) -> Plan:
    """Decide launches, terminations and the target status.

    `lost` maps a group name ("head" for the head) to the names of nodes lost in this pass,
    so replacement launches can say what they replace.
    """
    lost = lost or {}
    result = Plan()
    live = [n for n in nodes if n.state in LIVE]

    if cluster.status in (C.STOPPING, C.TERMINATING):
        reason = "cluster stopping" if cluster.status == C.STOPPING else "cluster deleted"
        result.terminations = [(n.id, reason) for n in live]
        if all(n.state == N.TERMINATED for n in nodes):
            result.status = C.STOPPED if cluster.status == C.STOPPING else C.TERMINATED
        return result
    if cluster.status not in (C.PENDING, C.PROVISIONING, C.STARTING, C.RUNNING, C.UPDATING):
        # STOPPED, TERMINATED, FAILED: no node should be alive.
        result.terminations = [(n.id, f"cluster {cluster.status.lower()}") for n in live]
        return result

    heads = [n for n in live if n.role == NodeRole.HEAD]
    if not heads:
        replaces = lost.get("head", [""])[0]
        result.launches.append(Launch(NodeRole.HEAD, "head", cluster.head_instance_type, replaces=replaces))
        # Workers that joined the old head's Ray cluster cannot move to a new one; workers
        # still waiting for a head simply join the new one.
        for n in live:
            if n.role == NodeRole.WORKER and n.state in (N.READY, N.DRAINING):
                result.terminations.append((n.id, "its head was lost; the cluster restarts Ray"))
    else:
        for extra in sorted(heads, key=lambda n: n.id)[1:]:  # cannot happen (unique constraint); belt and braces
            result.terminations.append((extra.id, "duplicate head"))

    groups = {g.name: g for g in cluster.groups}
    doomed = {node_id for node_id, _ in result.terminations}  # workers of a lost head do not count
    for group in cluster.groups:
        active = [n for n in live if n.role == NodeRole.WORKER and n.group_name == group.name and n.state in ACTIVE
                  and n.id not in doomed]
        missing = group.desired_workers - len(active)
        replaced = list(lost.get(group.name, []))
        for _ in range(max(0, missing)):
            result.launches.append(
                Launch(NodeRole.WORKER, group.name, group.instance_type, group.spot,
                       replaces=replaced.pop(0) if replaced else "")
            )
        if missing < 0:
            surplus = sorted(active, key=lambda n: (SURPLUS_ORDER[n.state], -n.id))[: -missing]
            result.terminations += [(n.id, f"{group.name} scaled to {group.desired_workers}") for n in surplus]
    for n in live:
        if n.role == NodeRole.WORKER and n.group_name not in groups:
            result.terminations.append((n.id, f"worker group {n.group_name} removed"))

    terminated = {node_id for node_id, _ in result.terminations}
    after = [n for n in nodes if n.id not in terminated]
    result.status = target_status(cluster, after)
    return result


# The path from one status to a target through allowed edges, for statuses the plan sets.
STATUS_PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    (C.PENDING, C.PROVISIONING): (C.PROVISIONING,),
    (C.PENDING, C.STARTING): (C.PROVISIONING, C.STARTING),
    (C.PENDING, C.RUNNING): (C.PROVISIONING, C.STARTING, C.RUNNING),
    (C.PROVISIONING, C.STARTING): (C.STARTING,),
    (C.PROVISIONING, C.RUNNING): (C.STARTING, C.RUNNING),
    (C.STARTING, C.RUNNING): (C.RUNNING,),
    (C.RUNNING, C.UPDATING): (C.UPDATING,),
    (C.UPDATING, C.RUNNING): (C.RUNNING,),
    (C.STOPPING, C.STOPPED): (C.STOPPED,),
    (C.TERMINATING, C.TERMINATED): (C.TERMINATED,),
}
