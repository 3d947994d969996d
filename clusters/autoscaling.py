"""Carrying out the autoscaler's decisions: DB state in, targets, drains and events out.

`autoscaler.planner` decides (pure policy, no I/O); this module feeds it what the head's
agent reported (Ray's pending demand, per-node resources and idle time) and what the
database knows (groups, nodes on their way), then writes the decision: new group targets
(which the reconciler carries out), nodes to drain, and events that explain each change.
It runs on every head heartbeat that carries load (the fast path) and on each sweep.
"""

from __future__ import annotations

import logging
import re

from django.db import transaction
from django.utils import timezone

from autoscaler import planner as policy
from autoscaler.planner.text import duration
from clusters.choices import ClusterStatus as C
from clusters.choices import EventKind, EventLevel, NodeRole
from clusters.choices import NodeState as N
from clusters.models import Cluster, Node
from clusters.providers.catalog import find_instance_type
from clusters.services import cluster_stop, request_reconcile
from clusters.transitions import node_transition, record_event
from controlplane.services import Actor

logger = logging.getLogger(__name__)

LAUNCHING = (N.REQUESTED, N.PROVISIONING, N.BOOTING)
# Load older than this is not acted on: better no decision than one on stale numbers.
MAX_LOAD_AGE_S = 30.0


def node_type_resources(provider: str, instance_type: str) -> dict[str, float]:
    itype = find_instance_type(provider, instance_type)
    if itype is None:
        return {}
    resources = {"CPU": float(itype.cpus), "memory": float(int(itype.memory_gb * 2**30))}
    if itype.gpus:
        resources["GPU"] = float(itype.gpus)
    return resources


def _ray_nodes(load: dict) -> dict[str, dict]:
    return {n["node_id"]: n for n in load.get("nodes") or [] if n.get("status") != "DEAD"}


def _inputs(cluster: Cluster, nodes: list[Node], load: dict) -> dict:
    now = timezone.now()
    ray_nodes = _ray_nodes(load)
    groups = [
        policy.Group(
            name=g.name,
            node_type=policy.NodeType(g.instance_type, node_type_resources(cluster.provider, g.instance_type)),
            min_workers=g.min_workers,
            max_workers=g.max_workers,
            idle_timeout_s=cluster.idle_timeout_minutes * 60,
        )
        for g in cluster.groups.all()
    ]
    head_row = next((n for n in nodes if n.role == NodeRole.HEAD and n.state == N.READY), None)
    head_ray = ray_nodes.get(head_row.ray_node_id) if head_row else None
    head = policy.HeadNode(
        total=(head_ray or {}).get("total") or {},
        available=(head_ray or {}).get("available") or {},
        idle_s=(head_ray["idle_ms"] / 1000) if head_ray and head_ray.get("idle_ms") is not None else None,
    )
    workers = []
    for n in nodes:
        if n.role != NodeRole.WORKER or n.state not in (*LAUNCHING, N.READY, N.DRAINING):
            continue
        type_resources = node_type_resources(cluster.provider, n.instance_type)
        seen = ray_nodes.get(n.ray_node_id) if n.ray_node_id else None
        state = "launching" if n.state in LAUNCHING else ("ready" if n.state == N.READY else "draining")
        if state == "ready" and seen is None:
            state = "launching"  # joined, but not in this load report yet: count it at full capacity
        workers.append(policy.WorkerNode(
            key=str(n.key),
            name=n.name,
            group=n.group_name,
            state=state,
            total=(seen or {}).get("total") or type_resources,
            available=(seen or {}).get("available") or type_resources,
            ray_node_id=n.ray_node_id or None,
            idle_s=_idle_s(n, seen, now),
            launched_at_s=(now - (n.launched_at or n.created_at)).total_seconds(),
            ready_for_s=(now - n.ready_at).total_seconds() if n.ready_at else None,
        ))
    demand = policy.Demand(
        pending=[(dict(p["shape"]), int(p["count"])) for p in load.get("pending") or []],
        gangs=[policy.Gang(strategy=g["strategy"], bundles=[dict(b) for b in g["bundles"]], name=g.get("id", ""))
               for g in load.get("gangs") or [] if g.get("strategy") in policy.STRATEGIES],
    )
    return {"groups": groups, "head": head, "nodes": workers, "demand": demand, "quotas": policy.Quotas()}


def autoscale_cluster(cluster_id: int) -> policy.Decision | None:
    """Run one decision for this cluster and write it. None when there is nothing to decide on."""
    with transaction.atomic():
        cluster = Cluster.objects.select_for_update().filter(pk=cluster_id).first()
        if cluster is None or cluster.status not in (C.RUNNING, C.UPDATING, C.STARTING):
            return None
        load = cluster.ray_load or {}
        if not load or cluster.ray_load_at is None:
            return None
        if (timezone.now() - cluster.ray_load_at).total_seconds() > MAX_LOAD_AGE_S:
            return None
        nodes = list(cluster.nodes.exclude(state=N.TERMINATED))
        inputs = _inputs(cluster, nodes, load)
        decision = policy.decide(**inputs)
        changed = _write(cluster, nodes, decision)
        idle_s = policy.cluster_idle_s(head=inputs["head"], nodes=inputs["nodes"], demand=inputs["demand"])
        if cluster.status == C.RUNNING and policy.auto_stop_due(idle_s, False, cluster.auto_stop_minutes):
            # Jobs (which also keep a cluster awake) arrive with the job API; until then Ray's idleness decides.
            cluster_stop(cluster=cluster, actor=Actor.system(),
                         reason=f"idle for {duration(idle_s or 0)}: auto-stop after {cluster.auto_stop_minutes:g} min")
        elif changed:
            request_reconcile(cluster.pk)
    return decision


def _write(cluster: Cluster, nodes: list[Node], decision: policy.Decision) -> bool:
    """Targets, drains and the events that explain them; events only when something changes."""
    changed = False
    for group in cluster.groups.all():
        target = decision.targets.get(group.name)
        if target is None or target == group.target_workers:
            continue
        before = group.target_workers
        group.target_workers = target
        group.save(update_fields=["target_workers"])
        changed = True
        message = decision.launch_reasons.get(group.name) or f"{group.name}: {before} → {target}"
        record_event(cluster=cluster, kind=EventKind.AUTOSCALER, message=message,
                     data={"group": group.name, "from": before, "to": target})
    by_key = {str(n.key): n for n in nodes}
    for key, reason in decision.drain:
        node = by_key.get(key)
        if node is None:
            continue
        if node.state == N.READY:
            changed |= node_transition(node=node, to=N.DRAINING, reason=reason)
        elif node.state in LAUNCHING:  # not in Ray yet: nothing to drain, stop the launch
            changed |= node_transition(node=node, to=N.TERMINATING, reason=reason)
        Node.objects.filter(pk=node.pk).update(scale_note=reason[:300])
    for key, reason in decision.keep:
        node = by_key.get(key)
        if node is None or node.scale_note == reason[:300]:
            continue
        Node.objects.filter(pk=node.pk).update(scale_note=reason[:300])
        # The reason is on the node (API) every time; an event only when its kind changes
        # ("kept: 2 tasks running" → "kept: min_workers 1"), not when a number in it does.
        if _kind(reason) != _kind(node.scale_note):
            record_event(cluster=cluster, node=node, kind=EventKind.AUTOSCALER, message=f"node {node.name} {reason}")
    notes = {"infeasible": sorted(r for _, _, r in decision.infeasible), "capped": sorted(decision.capped)}
    previous = cluster.autoscaler_notes or {}
    if notes != {k: previous.get(k, []) for k in notes}:
        for reason in notes["infeasible"]:
            if reason not in previous.get("infeasible", []):
                record_event(cluster=cluster, kind=EventKind.INFEASIBLE, level=EventLevel.WARNING, message=reason)
        for reason in notes["capped"]:
            if reason not in previous.get("capped", []):
                record_event(cluster=cluster, kind=EventKind.AUTOSCALER, level=EventLevel.WARNING, message=reason)
        Cluster.objects.filter(pk=cluster.pk).update(autoscaler_notes=notes)
    return changed


def _kind(reason: str) -> str:
    return re.sub(r"\d[\d.]*[a-z]*", "#", reason or "")


def _idle_s(node: Node, seen: dict | None, now) -> float | None:
    """Our continuous idle time when we have one (Node.idle_since), else what Ray reports."""
    if node.idle_since is not None:
        return (now - node.idle_since).total_seconds()
    if seen is not None and seen.get("idle_ms") is not None:
        return 0.0 if seen["idle_ms"] == 0 else seen["idle_ms"] / 1000
    return None
