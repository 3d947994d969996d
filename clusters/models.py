"""Clusters, their node groups, nodes and events."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone

from clusters.choices import ClusterStatus, EventKind, EventLevel, JobStatus, NodeRole, NodeState
from controlplane.models import SLUG_PATTERN, WorkspaceOwned, slug_validator  # noqa: F401


class Cluster(WorkspaceOwned):
    """A Ray cluster: its spec (desired state), its status and the reconciler's lease."""

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=63, validators=[slug_validator])
    provider = models.CharField(max_length=32)
    # null (not "") means "the provider's default", as in the spec.
    region = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    zone = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    head_instance_type = models.CharField(max_length=64)
    runtime = models.JSONField(default=dict, blank=True)
    idle_timeout_minutes = models.FloatField(default=5)
    auto_stop_minutes = models.FloatField(null=True, blank=True)
    tags = models.JSONField(default=dict, blank=True)

    status = models.CharField(max_length=16, choices=ClusterStatus.choices, default=ClusterStatus.PENDING)
    status_message = models.CharField(max_length=500, blank=True)
    status_changed_at = models.DateTimeField(default=timezone.now)
    dashboard_url = models.CharField(max_length=300, blank=True)
    gcs_address = models.CharField(max_length=100, blank=True)
    # Ray node ids (hex) the head last reported alive, and when.
    ray_alive_node_ids = models.JSONField(default=list, blank=True)
    ray_reported_at = models.DateTimeField(null=True, blank=True)
    # The Ray cluster's load as the head last reported it (runtime_agent/load.py has the
    # shape: nodes, pending, gangs, constraints, collected_at), and when it arrived.
    ray_load = models.JSONField(null=True, blank=True)
    ray_load_at = models.DateTimeField(null=True, blank=True)
    # What the autoscaler last reported as infeasible or capped, so each is an event once, not every second.
    autoscaler_notes = models.JSONField(default=dict, blank=True)

    # Reconciler bookkeeping: a lease instead of a long transaction, and a generation
    # counter so that a trigger arriving mid-run makes the holder run once more.
    lease_until = models.DateTimeField(default=timezone.now)
    lease_owner = models.CharField(max_length=64, blank=True)
    reconcile_requested = models.PositiveBigIntegerField(default=0)
    reconciled_at = models.DateTimeField(null=True, blank=True)

    created_by = models.ForeignKey("controlplane.User", null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    terminated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=("workspace", "name"),
                condition=~models.Q(status=ClusterStatus.TERMINATED),
                name="%(app_label)s_%(class)s_unique_live_name",
            )
        ]
        indexes = [models.Index(fields=["workspace", "status"], name="cluster_ws_status")]

    def __str__(self) -> str:
        return f"{self.workspace_id}/{self.name}"


class NodeGroup(models.Model):
    """A worker group of a cluster: one instance type, min/max and the current target."""

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="groups")
    name = models.CharField(max_length=63, validators=[slug_validator])
    instance_type = models.CharField(max_length=64)
    min_workers = models.PositiveIntegerField(default=0)
    max_workers = models.PositiveIntegerField(default=0)
    spot = models.BooleanField(default=False)
    # What the autoscaler wants, always clamped to [min_workers, max_workers].
    target_workers = models.PositiveIntegerField(default=0)
    position = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["position", "id"]
        constraints = [
            models.UniqueConstraint(fields=("cluster", "name"), name="%(app_label)s_%(class)s_unique_cluster_name"),
            models.CheckConstraint(
                condition=models.Q(min_workers__lte=models.F("max_workers")), name="%(app_label)s_%(class)s_min_le_max"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.cluster}:{self.name}"

    @property
    def desired_workers(self) -> int:
        return max(self.min_workers, min(self.target_workers, self.max_workers))


class Node(models.Model):
    """One machine of a cluster, from the moment we decide to create it until it is gone."""

    key = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)  # idempotency key + tag
    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="nodes")
    group = models.ForeignKey(NodeGroup, null=True, blank=True, on_delete=models.SET_NULL, related_name="nodes")
    group_name = models.CharField(max_length=63)  # "head" for the head
    role = models.CharField(max_length=8, choices=NodeRole.choices)
    name = models.CharField(max_length=80)  # "head-1", "cpu-3": readable, unique in the cluster
    instance_type = models.CharField(max_length=64)
    market = models.CharField(max_length=16, default="on-demand")  # "on-demand" or "spot"
    state = models.CharField(max_length=16, choices=NodeState.choices, default=NodeState.REQUESTED)
    state_changed_at = models.DateTimeField(default=timezone.now)
    state_reason = models.CharField(max_length=500, blank=True)

    instance_id = models.CharField(max_length=128, blank=True)
    private_ip = models.CharField(max_length=64, blank=True)
    public_ip = models.CharField(max_length=64, blank=True)
    ray_node_id = models.CharField(max_length=64, blank=True)
    # From the head's last load report: how long Ray has seen this node idle (0 while busy)
    # and its available resources. Null until the head reports the node.
    ray_idle_ms = models.BigIntegerField(null=True, blank=True)
    # Since when the node has been idle by our count: from Ray's first idle report, reset only
    # when the node's resources are in use or Ray refuses to drain it. Ray's own idle timer
    # also restarts on unrelated events (ray#60546), which would keep idle nodes for ever.
    idle_since = models.DateTimeField(null=True, blank=True)
    scale_note = models.CharField(max_length=300, blank=True)  # the autoscaler's latest word on this node
    ray_available = models.JSONField(null=True, blank=True)

    bootstrap_token_used_at = models.DateTimeField(null=True, blank=True)
    node_token_hash = models.CharField(max_length=64, blank=True, db_index=True)
    agent_state = models.CharField(max_length=32, blank=True)
    agent_message = models.CharField(max_length=500, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    launched_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    terminated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=("cluster", "name"), name="%(app_label)s_%(class)s_unique_cluster_name"),
            # At most one live head per cluster, enforced by the database.
            models.UniqueConstraint(
                fields=("cluster",),
                condition=models.Q(role=NodeRole.HEAD)
                & models.Q(state__in=["REQUESTED", "PROVISIONING", "BOOTING", "READY", "DRAINING"]),
                name="%(app_label)s_%(class)s_one_live_head",
            ),
        ]
        indexes = [models.Index(fields=["cluster", "state"], name="node_cluster_state")]

    def __str__(self) -> str:
        return f"{self.cluster}:{self.name}"


class ClusterEvent(models.Model):
    """One line of a cluster's timeline, written in the same transaction as the change it describes."""

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="events")
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="events")
    kind = models.CharField(max_length=32, choices=EventKind.choices)
    level = models.CharField(max_length=8, choices=EventLevel.choices, default=EventLevel.INFO)
    message = models.CharField(max_length=1000)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["cluster", "-created_at"], name="event_cluster_created")]

    def __str__(self) -> str:
        return self.message


class Job(WorkspaceOwned):
    """A command run on a cluster's head through Ray's job API, in the working directory of a snapshot.

    The head's agent picks it up from its heartbeat reply, stages the snapshot, submits it to Ray
    and reports status and log chunks back (clusters/jobs.py). Logs are stored append-only by byte
    offset in `JobLogChunk`; `log_size` is the next offset.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="jobs")
    snapshot = models.ForeignKey("projects.Snapshot", on_delete=models.PROTECT, related_name="jobs")
    entrypoint = models.TextField()
    env = models.JSONField(default=dict, blank=True)
    pip = models.JSONField(default=list, blank=True)

    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.PENDING)
    message = models.TextField(blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    # The head node that took the job; a job outlives neither its head nor its Ray cluster.
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    ray_submission_id = models.CharField(max_length=100, blank=True)
    stop_requested_at = models.DateTimeField(null=True, blank=True)
    log_size = models.BigIntegerField(default=0)
    log_truncated = models.BooleanField(default=False)

    created_by = models.ForeignKey("controlplane.User", null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["cluster", "status"], name="job_cluster_status")]

    def __str__(self) -> str:
        return str(self.id)


class JobLogChunk(models.Model):
    """Bytes [offset, offset + len(data)) of a job's log. Chunks are only ever appended."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="log_chunks")
    offset = models.BigIntegerField()
    data = models.BinaryField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "offset"], name="job_log_chunk_offset")]

    def __str__(self) -> str:
        return f"{self.job_id}@{self.offset}"
