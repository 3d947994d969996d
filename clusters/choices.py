from django.db import models


class ClusterStatus(models.TextChoices):
    PENDING = "PENDING"  # accepted, not yet reconciled
    PROVISIONING = "PROVISIONING"  # machines being created
    STARTING = "STARTING"  # machines up, Ray coming up on the head and min workers
    RUNNING = "RUNNING"  # head and min_workers READY and alive in Ray
    UPDATING = "UPDATING"  # running, but replacing or resizing nodes
    STOPPING = "STOPPING"  # terminating every node, keeping the cluster
    STOPPED = "STOPPED"  # no nodes; can be started again
    TERMINATING = "TERMINATING"  # terminating every node, then gone
    TERMINATED = "TERMINATED"  # terminal
    FAILED = "FAILED"  # cannot make progress without a person; see status_message


LIVE_CLUSTER_STATUSES = frozenset(
    {
        ClusterStatus.PENDING,
        ClusterStatus.PROVISIONING,
        ClusterStatus.STARTING,
        ClusterStatus.RUNNING,
        ClusterStatus.UPDATING,
    }
)
# Statuses in which the reconciler wants the cluster's nodes to exist.
WANT_NODES_STATUSES = LIVE_CLUSTER_STATUSES


class NodeState(models.TextChoices):
    REQUESTED = "REQUESTED"  # row written with its idempotency key; provider not yet called
    PROVISIONING = "PROVISIONING"  # provider accepted; machine booting
    BOOTING = "BOOTING"  # agent registered; Ray starting or waiting for the head
    READY = "READY"  # Ray node alive
    DRAINING = "DRAINING"  # asked to leave; no new work
    TERMINATING = "TERMINATING"  # provider asked to terminate; not yet confirmed gone
    TERMINATED = "TERMINATED"  # provider confirmed gone; terminal
    LOST = "LOST"  # heartbeats stopped or the machine vanished; will be terminated and replaced


LIVE_NODE_STATES = frozenset(
    {NodeState.REQUESTED, NodeState.PROVISIONING, NodeState.BOOTING, NodeState.READY, NodeState.DRAINING}
)


class NodeRole(models.TextChoices):
    HEAD = "head"
    WORKER = "worker"


class EventLevel(models.TextChoices):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class EventKind(models.TextChoices):
    """Typed events: what a person reads in the cluster's timeline."""

    CLUSTER_CREATED = "cluster.created"
    CLUSTER_UPDATED = "cluster.updated"
    CLUSTER_STATUS = "cluster.status"
    NODE_STATE = "node.state"
    NODE_LAUNCH_FAILED = "node.launch_failed"
    NODE_LOST = "node.lost"
    NODE_REPLACED = "node.replaced"
    ORPHAN_TERMINATED = "orphan.terminated"
    PROVIDER_ERROR = "provider.error"
    AUTOSCALER = "autoscaler"  # a scaling decision and why: "cpu: 0 → 3 for 3 pending {CPU: 1}"
    INFEASIBLE = "autoscaler.infeasible"  # demand no node type can ever hold
    JOB_SUBMITTED = "job.submitted"
    JOB_STATUS = "job.status"


class JobStatus(models.TextChoices):
    PENDING = "PENDING"  # accepted; waiting for the head, being staged, or Ray is setting up its environment
    RUNNING = "RUNNING"  # the entrypoint is running on the cluster
    SUCCEEDED = "SUCCEEDED"  # exited 0
    FAILED = "FAILED"  # exited non-zero, could not start, or the cluster went away under it
    STOPPED = "STOPPED"  # stopped on request


TERMINAL_JOB_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED})
