"""What the control plane does with a node agent's registration and heartbeats.

The agent only reports; the control plane decides. Each heartbeat records the node's
health and Ray identity, moves the node along its state table, and answers with the
commands the node should obey (join the head, stop, drain).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from clusters.choices import LIVE_NODE_STATES, EventLevel, NodeRole
from clusters.choices import ClusterStatus as C
from clusters.choices import NodeState as N
from clusters.jobs import jobs_for_head
from clusters.models import Cluster, Node
from clusters.providers.catalog import find_instance_type
from clusters.reconciler import refresh_status
from clusters.services import request_reconcile
from clusters.transitions import node_transition
from controlplane.models import hash_token

logger = logging.getLogger(__name__)

NODE_TOKEN_PREFIX = "cun_"
DRAIN_REJECTED = "drain rejected"  # how an agent says Ray refused to let its node go
AGENT_STATES = ("waiting_for_head", "starting_ray", "ready", "failed", "stopping")


class RegistrationRefused(Exception):
    pass


@dataclass
class HeartbeatReply:
    commands: list[dict] = field(default_factory=list)
    heartbeat_interval_s: float = 5.0


def _interval(cluster: Cluster, node: Node) -> float:
    if node.state != N.READY or cluster.status != C.RUNNING:
        return settings.CUMULUS_HEARTBEAT_FAST_INTERVAL_S
    if node.role == NodeRole.HEAD:
        return settings.CUMULUS_HEAD_HEARTBEAT_INTERVAL_S  # it carries the Ray load
    return settings.CUMULUS_HEARTBEAT_INTERVAL_S


def store_ray_load(cluster: Cluster, load: dict, now: datetime) -> None:
    """Keep the head's load report on the cluster, and each Ray node's idle time and free resources on its Node.

    Nodes are matched by `Node.ray_node_id`; a live node the report does not mention
    (not joined yet, or gone from Ray) has its Ray figures cleared.
    """
    Cluster.objects.filter(pk=cluster.pk).update(ray_load=load, ray_load_at=now)
    cluster.ray_load, cluster.ray_load_at = load, now
    by_ray_id = {n["node_id"]: n for n in load["nodes"]}
    changed = []
    for row in cluster.nodes.filter(state__in=LIVE_NODE_STATES).only("id", "ray_node_id", "ray_idle_ms",
                                                                     "ray_available", "idle_since"):
        reported = by_ray_id.get(row.ray_node_id) if row.ray_node_id else None
        idle_ms, available = (reported["idle_ms"], reported["available"]) if reported else (None, None)
        idle_since = next_idle_since(row.idle_since, reported, now)
        if (row.ray_idle_ms, row.ray_available, row.idle_since) != (idle_ms, available, idle_since):
            row.ray_idle_ms, row.ray_available, row.idle_since = idle_ms, available, idle_since
            changed.append(row)
    if changed:
        Node.objects.bulk_update(changed, ["ray_idle_ms", "ray_available", "idle_since"])


# Resources whose use means work is running; memory figures move without tasks.
_NOT_WORK = ("memory", "object_store_memory")


def in_use(reported: dict) -> bool:
    total, available = reported.get("total") or {}, reported.get("available") or {}
    return any(amount - available.get(name, 0.0) > 1e-9 for name, amount in total.items() if name not in _NOT_WORK)


def next_idle_since(idle_since: datetime | None, reported: dict | None, now: datetime) -> datetime | None:
    """Our idle clock for one node, from one load report (see Node.idle_since)."""
    if reported is None or reported.get("status") == "DEAD" or in_use(reported):
        return None
    idle_ms = reported.get("idle_ms") or 0
    if idle_ms > 0:
        ray_since = now - timedelta(milliseconds=idle_ms)
        return min(idle_since, ray_since) if idle_since else ray_since
    return idle_since  # nothing running, but Ray's timer restarted: keep counting


def ray_params(cluster: Cluster, node: Node) -> dict:
    itype = find_instance_type(cluster.provider, node.instance_type)
    cpus, gpus, memory_gb = (itype.cpus, itype.gpus, itype.memory_gb) if itype else (1, 0, 1)
    return {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "memory_bytes": int(memory_gb * 2**30),
        "resources": {},
        "labels": {"cumulus.io/group": node.group_name, "cumulus.io/node": node.name},
    }


@transaction.atomic
def node_register(*, node: Node, address: str, hostname: str) -> tuple[Node, str]:
    """Exchange the node's one-time bootstrap token for a node token. Refused if already used or too late."""
    node = Node.objects.select_for_update().select_related("cluster").get(pk=node.pk)
    if node.bootstrap_token_used_at is not None:
        raise RegistrationRefused("this bootstrap token has already been used")
    if node.state not in (N.REQUESTED, N.PROVISIONING):
        raise RegistrationRefused(f"node {node.name} is {node.state}")
    raw = NODE_TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = timezone.now()
    extra = {"bootstrap_token_used_at": now, "node_token_hash": hash_token(raw), "last_heartbeat_at": now,
             "private_ip": address[:64] if address else node.private_ip, "agent_state": "registered"}
    if node.state == N.REQUESTED:  # the agent beat the provider call's return: the machine evidently exists
        node_transition(node=node, to=N.PROVISIONING, reason="agent registered before the launch call returned",
                        extra={"launched_at": now})
    node_transition(node=node, to=N.BOOTING, reason=f"agent registered from {hostname or address}", extra=extra)
    return node, raw


def node_for_token(raw: str) -> Node | None:
    if not raw.startswith(NODE_TOKEN_PREFIX):
        return None
    return Node.objects.select_related("cluster").filter(node_token_hash=hash_token(raw)).first()


def autoscale_after_heartbeat(cluster_id: int) -> None:
    from clusters.autoscaling import autoscale_cluster

    try:
        autoscale_cluster(cluster_id)
    except Exception:  # the periodic tick decides again; the node's heartbeat must not fail for it
        logger.exception("autoscale.heartbeat_failed", extra={"cluster_id": cluster_id})


def node_heartbeat(*, node: Node, state: str, message: str, ray: dict) -> HeartbeatReply:
    """Record one heartbeat and answer with commands."""
    now = timezone.now()
    cluster = node.cluster
    reply = HeartbeatReply()
    changed = False
    with transaction.atomic():
        node = Node.objects.select_for_update().select_related("cluster").get(pk=node.pk)
        cluster = node.cluster
        if node.state in (N.TERMINATING, N.TERMINATED, N.LOST):
            reply.commands.append({"type": "stop", "reason": f"node is {node.state.lower()}"})
            reply.heartbeat_interval_s = settings.CUMULUS_HEARTBEAT_INTERVAL_S
            return reply
        fields = {"last_heartbeat_at": now, "agent_state": state, "agent_message": (message or "")[:500]}
        ray_node_id = ray.get("node_id") or ""
        if ray_node_id:
            fields["ray_node_id"] = ray_node_id[:64]
        Node.objects.filter(pk=node.pk).update(**fields)
        for name, value in fields.items():
            setattr(node, name, value)

        if state == "ready" and node.state in (N.PROVISIONING, N.BOOTING):
            if node.state == N.PROVISIONING:
                node_transition(node=node, to=N.BOOTING, reason="agent reported")
            node_transition(node=node, to=N.READY, reason="Ray node alive" + (f" ({ray_node_id[:12]})" if ray_node_id
                                                                               else ""))
            changed = True
        elif state == "failed" and node.state in (N.PROVISIONING, N.BOOTING, N.READY, N.DRAINING):
            node_transition(node=node, to=N.LOST, reason=f"agent reported failure: {message}"[:500],
                            level=EventLevel.ERROR)
            changed = True
        elif state == "stopping" and node.state in (N.READY, N.BOOTING, N.PROVISIONING, N.DRAINING):
            changed = True  # leaving (drained, or on its own): the reconciler terminates the machine
        elif state == "ready" and node.state == N.DRAINING and message.startswith(DRAIN_REJECTED):
            # Ray refused to let the node go (work arrived): it stays in service.
            node_transition(node=node, to=N.READY, reason=message, extra={"idle_since": None})

        if node.role == NodeRole.HEAD and node.state == N.READY:
            head_fields: dict = {"ray_reported_at": now}
            if ray.get("gcs_address"):
                head_fields["gcs_address"] = str(ray["gcs_address"])[:100]
            if ray.get("dashboard_url"):
                head_fields["dashboard_url"] = str(ray["dashboard_url"])[:300]
            alive = ray.get("alive_node_ids")
            if isinstance(alive, list):
                head_fields["ray_alive_node_ids"] = [str(a)[:64] for a in alive][:10000]
            Cluster.objects.filter(pk=cluster.pk).update(**head_fields)
            for name, value in head_fields.items():
                setattr(cluster, name, value)
            if ray.get("load") is not None:  # only the head's report is the cluster's load
                store_ray_load(cluster, ray["load"], now)
                # The autoscaler's fast path: decide on this load as soon as it is committed.
                transaction.on_commit(lambda: autoscale_after_heartbeat(cluster.pk))

        if node.role == NodeRole.WORKER and node.state in (N.PROVISIONING, N.BOOTING) and state == "waiting_for_head":
            head = cluster.nodes.filter(role=NodeRole.HEAD, state=N.READY).first()
            if head is not None and cluster.gcs_address:
                reply.commands.append({"type": "join", "gcs_address": cluster.gcs_address})
        if node.state == N.DRAINING:
            reply.commands.append({"type": "drain", "reason": node.state_reason or "scale down"})
        reply.commands.extend(jobs_for_head(node))

        if changed:
            refresh_status(cluster)
            request_reconcile(cluster.pk)
    reply.heartbeat_interval_s = _interval(cluster, node)
    return reply
