"""Cluster services: the one place that creates, changes, starts, stops and deletes clusters.

The API and the console call these; they validate, write in one transaction with an audit
row and an event, and enqueue a reconcile once the transaction commits.
"""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.db.models import F

from clusters.choices import LIVE_CLUSTER_STATUSES, ClusterStatus, EventKind
from clusters.models import Cluster, NodeGroup
from clusters.transitions import cluster_can_transition, cluster_transition, record_event
from controlplane.errors import Conflict, ValidationFailed
from controlplane.models import User, Workspace
from controlplane.services import Actor, audit_record


def request_reconcile(cluster_id: int) -> None:
    """Ask for a reconcile of this cluster once the current transaction commits.

    Bumping `reconcile_requested` makes a reconcile that is already running go round once
    more, so a trigger is never lost to the lease.
    """
    from clusters.tasks import reconcile_cluster as reconcile_cluster_task

    Cluster.objects.filter(pk=cluster_id).update(reconcile_requested=F("reconcile_requested") + 1)
    transaction.on_commit(lambda: reconcile_cluster_task.delay(cluster_id))


def _create_groups(cluster: Cluster, groups: list[dict]) -> None:
    NodeGroup.objects.bulk_create(
        NodeGroup(
            cluster=cluster,
            name=g["name"],
            instance_type=g["instance_type"],
            min_workers=g["min_workers"],
            max_workers=g["max_workers"],
            spot=g["spot"],
            target_workers=g["min_workers"],
            position=i,
        )
        for i, g in enumerate(groups)
    )


@transaction.atomic
def cluster_create(*, workspace: Workspace, spec: dict, actor: Actor) -> Cluster:
    """Create a cluster from a validated spec (see clusters.spec.ClusterSpec)."""
    if Cluster.objects.for_workspace(workspace).filter(name=spec["name"]).exclude(
        status=ClusterStatus.TERMINATED
    ).exists():
        raise ValidationFailed({"name": ["A live cluster with this name already exists in this workspace."]})
    try:
        with transaction.atomic():
            cluster = Cluster.objects.create(
                workspace=workspace,
                name=spec["name"],
                provider=spec["provider"],
                region=spec.get("region"),
                zone=spec.get("zone"),
                head_instance_type=spec["head"]["instance_type"],
                runtime=spec["runtime"],
                idle_timeout_minutes=spec["idle_timeout_minutes"],
                auto_stop_minutes=spec.get("auto_stop_minutes"),
                tags=spec.get("tags") or {},
                created_by=actor.user if isinstance(actor.user, User) else None,
            )
    except IntegrityError:  # a concurrent create with the same name won the race
        raise ValidationFailed({"name": ["A live cluster with this name already exists in this workspace."]}) from None
    _create_groups(cluster, spec.get("worker_groups", []))
    record_event(cluster=cluster, kind=EventKind.CLUSTER_CREATED, message=f"Cluster {cluster.name} created",
                 data={"by": actor.user.email if actor.user else "system"})
    audit_record(actor=actor, action="cluster.create", target_type="cluster", target_id=cluster.name,
                 workspace=workspace, data={"uid": str(cluster.uid)})
    request_reconcile(cluster.pk)
    return cluster


@transaction.atomic
def cluster_update(*, cluster: Cluster, changes: dict, actor: Actor) -> Cluster:
    """Apply a validated ClusterPatch: sizes, worker groups, timeouts, tags."""
    cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
    if cluster.status in (ClusterStatus.TERMINATING, ClusterStatus.TERMINATED):
        raise Conflict(f"Cluster {cluster.name} is {cluster.status}; it cannot be changed.")
    for field in ("idle_timeout_minutes", "auto_stop_minutes", "tags"):
        if field in changes:
            setattr(cluster, field, changes[field])
    cluster.save()
    if "worker_groups" in changes:
        wanted = {g["name"]: g for g in changes["worker_groups"]}
        for group in cluster.groups.all():
            if group.name not in wanted:
                group.delete()  # its nodes keep group_name; the reconciler terminates them
                continue
            spec = wanted.pop(group.name)
            group.min_workers, group.max_workers, group.spot = spec["min_workers"], spec["max_workers"], spec["spot"]
            group.target_workers = max(group.min_workers, min(group.target_workers, group.max_workers))
            group.save()
        position = cluster.groups.count()
        _create_groups(cluster, list(wanted.values()))
        for i, group in enumerate(cluster.groups.filter(name__in=wanted)):
            group.position = position + i
            group.save(update_fields=["position"])
    record_event(cluster=cluster, kind=EventKind.CLUSTER_UPDATED, message="Cluster spec updated",
                 data={"fields": sorted(changes)})
    audit_record(actor=actor, action="cluster.update", target_type="cluster", target_id=cluster.name,
                 workspace=cluster.workspace, data={"fields": sorted(changes)})
    request_reconcile(cluster.pk)
    return cluster


def _verb(cluster: Cluster, to: str, verb: str, actor: Actor, message: str) -> Cluster:
    cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
    if not cluster_can_transition(cluster.status, to):
        raise Conflict(f"Cannot {verb} cluster {cluster.name} while it is {cluster.status}.")
    cluster_transition(cluster=cluster, to=to, message=message)
    audit_record(actor=actor, action=f"cluster.{verb}", target_type="cluster", target_id=cluster.name,
                 workspace=cluster.workspace)
    request_reconcile(cluster.pk)
    return cluster


@transaction.atomic
def cluster_start(*, cluster: Cluster, actor: Actor) -> Cluster:
    return _verb(cluster, ClusterStatus.PROVISIONING, "start", actor, "started by " + _who(actor))


@transaction.atomic
def cluster_stop(*, cluster: Cluster, actor: Actor, reason: str = "") -> Cluster:
    return _verb(cluster, ClusterStatus.STOPPING, "stop", actor, reason or "stopped by " + _who(actor))


@transaction.atomic
def cluster_delete(*, cluster: Cluster, actor: Actor) -> Cluster:
    cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
    if cluster.status in (ClusterStatus.TERMINATING, ClusterStatus.TERMINATED):
        return cluster  # deleting twice is not an error
    return _verb(cluster, ClusterStatus.TERMINATING, "delete", actor, "deleted by " + _who(actor))


def _who(actor: Actor) -> str:
    return actor.user.email if actor.user else "system"


def live_clusters():
    # Crosses workspaces on purpose: the sweep reconciles every live cluster of the install.
    return Cluster.objects.exclude(status__in=[ClusterStatus.TERMINATED, ClusterStatus.STOPPED])


__all__ = [
    "LIVE_CLUSTER_STATUSES",
    "cluster_create",
    "cluster_delete",
    "cluster_start",
    "cluster_stop",
    "cluster_update",
    "live_clusters",
    "request_reconcile",
]
