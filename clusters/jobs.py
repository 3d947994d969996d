"""Jobs: submit, stop, hand to the head's agent, record what it reports, store logs by byte offset.

How a job travels::

    POST jobs ──> PENDING (no node) ──heartbeat of the READY head──> PENDING (node = head)
        the agent stages the snapshot and submits it to Ray's job API, reporting as it goes
    ──> RUNNING ──> SUCCEEDED | FAILED | STOPPED

Hand-over is level-triggered: every heartbeat reply of the head lists the cluster's unfinished
jobs, so a lost reply or an agent restart costs nothing. Logs arrive as chunks at a byte
offset; a chunk is appended only where the stored log ends, so a retried chunk is not stored
twice and a gap is never written (the reply says where to resume).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from clusters.choices import LIVE_CLUSTER_STATUSES, TERMINAL_JOB_STATUSES, EventKind, EventLevel, NodeRole
from clusters.choices import ClusterStatus as C
from clusters.choices import JobStatus as J
from clusters.choices import NodeState as N
from clusters.models import Cluster, Job, JobLogChunk, Node
from clusters.transitions import record_event
from controlplane.errors import Conflict, ValidationFailed
from controlplane.models import User
from controlplane.services import Actor, audit_record
from projects.models import Snapshot

JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    # Ray started the entrypoint / it ended before we saw it run / could not stage or submit,
    # or the cluster went away / stopped before it ran
    J.PENDING: frozenset({J.RUNNING, J.SUCCEEDED, J.FAILED, J.STOPPED}),
    # the entrypoint exited 0 / non-zero, or the head was lost / stopped on request
    J.RUNNING: frozenset({J.SUCCEEDED, J.FAILED, J.STOPPED}),
    J.SUCCEEDED: frozenset(),  # terminal
    J.FAILED: frozenset(),  # terminal
    J.STOPPED: frozenset(),  # terminal
}

# A job may be submitted while its cluster is coming up: it waits for the head.
SUBMITTABLE_CLUSTER_STATUSES = LIVE_CLUSTER_STATUSES
LOG_READ_LIMIT = 1024 * 1024  # bytes per GET .../logs


@transaction.atomic
def job_transition(*, job: Job, to: str, message: str | None = None, exit_code: int | None = None) -> bool:
    """Compare-and-set `job` from its status to `to`, with a cluster event. False: someone else moved it."""
    current = job.status
    if to == current or to not in JOB_TRANSITIONS[current]:
        return False
    now = timezone.now()
    fields: dict = {"status": to}
    if message is not None:
        fields["message"] = message[:4000]
    if exit_code is not None:
        fields["exit_code"] = exit_code
    if to == J.RUNNING or (to in TERMINAL_JOB_STATUSES and job.started_at is None and current == J.RUNNING):
        fields["started_at"] = now
    if to in TERMINAL_JOB_STATUSES:
        fields["finished_at"] = now
    if not Job.objects.filter(pk=job.pk, status=current).update(**fields):
        return False
    for name, value in fields.items():
        setattr(job, name, value)
    text = f"Job {str(job.pk)[:8]} {current} → {to}"
    if exit_code is not None:
        text += f" (exit code {exit_code})"
    if message:
        text += f": {message.splitlines()[0][:300]}"
    level = EventLevel.ERROR if to == J.FAILED else EventLevel.INFO
    record_event(cluster=job.cluster, kind=EventKind.JOB_STATUS, level=level, message=text,
                 data={"job": str(job.pk), "from": current, "to": to, "exit_code": exit_code})
    return True


# --- what users do -----------------------------------------------------------------------------


@transaction.atomic
def job_submit(*, cluster: Cluster, snapshot_id: str, entrypoint: str, env: dict[str, str], pip: list[str],
               actor: Actor) -> Job:
    """Queue `entrypoint` to run on `cluster` in the snapshot's tree. 409 unless the cluster is live."""
    cluster = Cluster.objects.select_for_update().get(pk=cluster.pk)
    if cluster.status not in SUBMITTABLE_CLUSTER_STATUSES:
        hint = " Start it first (`cloudctl up`)." if cluster.status in (C.STOPPED, C.STOPPING, C.FAILED) else ""
        raise Conflict(f"Cluster {cluster.name} is {cluster.status}; jobs run only on a live cluster.{hint}")
    snapshot = Snapshot.objects.for_workspace(cluster.workspace).filter(pk=snapshot_id).first()
    if snapshot is None:
        raise ValidationFailed({"snapshot": ["No such snapshot in this workspace; run `cloudctl sync` first."]})
    job = Job.objects.create(
        workspace=cluster.workspace, cluster=cluster, snapshot=snapshot, entrypoint=entrypoint, env=env, pip=pip,
        created_by=actor.user if isinstance(actor.user, User) else None, message="waiting for the cluster's head",
    )
    record_event(cluster=cluster, kind=EventKind.JOB_SUBMITTED,
                 message=f"Job {str(job.pk)[:8]} submitted by {_who(actor)}: {entrypoint[:200]}",
                 data={"job": str(job.pk), "snapshot": str(snapshot.pk)})
    audit_record(actor=actor, action="job.submit", target_type="job", target_id=job.pk, workspace=cluster.workspace,
                 data={"cluster": cluster.name, "snapshot": str(snapshot.pk), "entrypoint": entrypoint[:500]})
    return job


@transaction.atomic
def job_stop(*, job: Job, actor: Actor) -> Job:
    """Stop a job: at once if no head has it yet, otherwise the head's agent stops it in Ray."""
    job = Job.objects.select_for_update().select_related("cluster").get(pk=job.pk)
    if job.status in TERMINAL_JOB_STATUSES:
        raise Conflict(f"Job {job.pk} has already finished ({job.status}).")
    if job.node_id is None:
        job_transition(job=job, to=J.STOPPED, message=f"stopped by {_who(actor)} before it started")
    elif job.stop_requested_at is None:
        job.stop_requested_at = timezone.now()
        Job.objects.filter(pk=job.pk).update(stop_requested_at=job.stop_requested_at)
    audit_record(actor=actor, action="job.stop", target_type="job", target_id=job.pk, workspace=job.workspace)
    return job


def _who(actor: Actor) -> str:
    return actor.user.email if isinstance(actor.user, User) else "system"


# --- logs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogSlice:
    data: bytes
    offset: int
    next_offset: int
    size: int
    status: str

    @property
    def complete(self) -> bool:
        """The job has finished and this slice reaches the end of its log."""
        return self.status in TERMINAL_JOB_STATUSES and self.next_offset >= self.size


def job_log_read(job: Job, offset: int, limit: int = LOG_READ_LIMIT) -> LogSlice:
    """The stored log from byte `offset`, at most `limit` bytes, cut at a UTF-8 character boundary
    (unless one character is longer than the slice) so that a client never sees half a character."""
    # Status and size from one row read: the agent sends its last log chunk before the final status,
    # so a finished status read together with the size means the size is the whole log.
    status, size = Job.objects.filter(pk=job.pk).values_list("status", "log_size").first() or (job.status, 0)
    offset = min(max(offset, 0), size)
    end = min(size, offset + limit)
    if end <= offset:
        return LogSlice(b"", offset, offset, size, status)
    chunks = (JobLogChunk.objects.filter(job=job, offset__lt=end)
              .filter(Q(offset__gte=offset) | Q(pk__in=JobLogChunk.objects.filter(job=job, offset__lte=offset)
                                                 .order_by("-offset").values("pk")[:1]))
              .order_by("offset").values_list("offset", "data"))
    buf = bytearray()
    for chunk_offset, data in chunks:
        data = bytes(data)
        lo = max(offset, chunk_offset) - chunk_offset
        hi = min(end, chunk_offset + len(data)) - chunk_offset
        if hi > lo:
            buf += data[lo:hi]
    data = bytes(buf)
    if end < size:
        data = _utf8_prefix(data)
    return LogSlice(data, offset, offset + len(data), size, status)


def _utf8_prefix(data: bytes) -> bytes:
    """`data` without a trailing incomplete UTF-8 sequence (at most 3 bytes are dropped)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0b1100_0000 != 0b1000_0000:  # a lead byte or ASCII: how long should its sequence be?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return data if need <= back or len(data) == back else data[:-back]
    return data


def _append_log(job: Job, offset: int, data: bytes) -> int:
    """Append the part of `data` (which starts at `offset`) that the log does not have yet. Returns the
    offset the sender should continue from. `job` is locked by the caller."""
    if not data or offset > job.log_size:
        return job.log_size  # a gap: the sender resends from where we are
    new = data[job.log_size - offset:]
    if not new:
        return job.log_size
    limit = settings.CUMULUS_JOB_LOG_MAX_BYTES
    if job.log_size + len(new) > limit:
        if not job.log_truncated:
            note = f"\n[cumulus: the log passed {limit} bytes; the rest is not kept]\n".encode()
            keep = max(0, limit - job.log_size)
            JobLogChunk.objects.create(job=job, offset=job.log_size, data=new[:keep] + note)
            job.log_size += keep + len(note)
            job.log_truncated = True
            Job.objects.filter(pk=job.pk).update(log_size=job.log_size, log_truncated=True)
        return offset + len(data)  # accepted and dropped: the sender moves on
    JobLogChunk.objects.create(job=job, offset=job.log_size, data=new)
    job.log_size += len(new)
    Job.objects.filter(pk=job.pk).update(log_size=job.log_size)
    return job.log_size


# --- what the head's agent does ------------------------------------------------------------------


def job_command(job: Job) -> dict:
    """The run_job command: the cluster's runtime (pip, env) with the job's own on top."""
    runtime = job.cluster.runtime or {}
    env = {**(runtime.get("env") or {}), **job.env}
    pip = list(dict.fromkeys([*(runtime.get("pip") or []), *job.pip]))
    return {
        "type": "run_job",
        "job": {
            "id": str(job.pk),
            "snapshot_id": str(job.snapshot_id),
            "entrypoint": job.entrypoint,
            "env": env,
            "pip": pip,
            "status": job.status,
            "log_offset": job.log_size,
            "stop": job.stop_requested_at is not None,
        },
    }


def jobs_for_head(node: Node) -> list[dict]:
    """The heartbeat reply's job commands for a READY head: every unfinished job of its cluster.
    A job nobody has taken yet is assigned to this head here."""
    if node.role != NodeRole.HEAD or node.state != N.READY:
        return []
    Job.objects.filter(cluster_id=node.cluster_id, node__isnull=True, status=J.PENDING).update(
        node=node, message="handed to the head's agent")
    jobs = (Job.objects.filter(cluster_id=node.cluster_id, node=node).exclude(status__in=TERMINAL_JOB_STATUSES)
            .select_related("cluster"))
    return [job_command(job) for job in jobs.order_by("created_at")]


@dataclass(frozen=True)
class ReportReply:
    log_offset: int
    stop: bool
    status: str


@transaction.atomic
def job_report(*, node: Node, job: Job, status: str | None, message: str | None, exit_code: int | None,
               ray_submission_id: str | None, log_offset: int | None, log_data: bytes) -> ReportReply:
    """Record what the head's agent says about a job it runs: status, exit code and a log chunk."""
    job = Job.objects.select_for_update().select_related("cluster").get(pk=job.pk)
    next_offset = _append_log(job, log_offset, log_data) if log_offset is not None else job.log_size
    if ray_submission_id and not job.ray_submission_id:
        job.ray_submission_id = ray_submission_id[:100]
        Job.objects.filter(pk=job.pk).update(ray_submission_id=job.ray_submission_id)
    if status and status != job.status:
        job_transition(job=job, to=status, message=message, exit_code=exit_code)
    elif message is not None and message != job.message and job.status not in TERMINAL_JOB_STATUSES:
        job.message = message[:4000]
        Job.objects.filter(pk=job.pk).update(message=job.message)
    stop = job.status in TERMINAL_JOB_STATUSES or job.stop_requested_at is not None
    return ReportReply(log_offset=next_offset, stop=stop, status=job.status)


def settle_jobs(cluster: Cluster) -> int:
    """End the unfinished jobs that can no longer finish: their cluster is going or gone, or the head
    that ran them is. Returns how many were ended. Called by every reconcile."""
    ended = 0
    unfinished = list(Job.objects.filter(cluster=cluster).exclude(status__in=TERMINAL_JOB_STATUSES)
                      .select_related("node"))
    if not unfinished:
        return 0
    cluster_gone = cluster.status not in LIVE_CLUSTER_STATUSES
    for job in unfinished:
        if cluster_gone:
            stopped = cluster.status in (C.STOPPING, C.STOPPED, C.TERMINATING, C.TERMINATED)
            ended += job_transition(job=job, to=J.STOPPED if stopped else J.FAILED,
                                    message=f"the cluster is {cluster.status}")
        elif job.node is not None and job.node.state not in (N.READY, N.DRAINING):
            ended += job_transition(job=job, to=J.FAILED,
                                    message=f"the head node {job.node.name} is {job.node.state}; the job went with it")
    return ended
