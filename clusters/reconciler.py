"""`reconcile_cluster`: make a cluster's machines match its spec, whatever happened before.

Level-triggered and idempotent: it compares what the database wants with what the
provider reports (instances tagged with the cluster uid) and heartbeats, and creates or
terminates the difference. Safe to run twice at once (a lease on the cluster row), after
any crash (every node row gets its idempotency key before the provider is called) and
with a provider that is eventually consistent (a new machine gets a grace period).

    observe → sync_from_observed → plan (pure, clusters.planner) → apply
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from clusters import planner
from clusters.choices import ClusterStatus as C
from clusters.choices import EventKind, EventLevel, NodeRole
from clusters.choices import NodeState as N
from clusters.jobs import settle_jobs
from clusters.models import Cluster, Node, NodeGroup
from clusters.providers import (
    Bootstrap,
    Instance,
    LaunchRequest,
    NodeProvider,
    PermanentProviderError,
    TransientProviderError,
    get_provider,
)
from clusters.providers.catalog import find_instance_type
from clusters.transitions import cluster_transition, node_transition, record_event

logger = logging.getLogger(__name__)

# A machine the provider does not list yet is not lost until this long after its launch
# (clouds list new instances with a delay; EC2 describe is eventually consistent).
LIST_GRACE_S = 15.0
MAX_PASSES = 5


# --- tokens ---------------------------------------------------------------------------

BOOTSTRAP_PREFIX = "cub_"


def bootstrap_token_for(node_key: uuid.UUID) -> str:
    """The node's one-time bootstrap token, derived (not stored) so a retried launch gets the same one."""
    mac = hmac.new(settings.SECRET_KEY.encode(), b"bootstrap:" + node_key.bytes, hashlib.sha256).digest()
    return f"{BOOTSTRAP_PREFIX}{node_key.hex}_{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def node_for_bootstrap_token(token: str) -> Node | None:
    if not isinstance(token, str) or not token.startswith(BOOTSTRAP_PREFIX) or token.count("_") < 2:
        return None
    try:
        key = uuid.UUID(hex=token[len(BOOTSTRAP_PREFIX):].split("_", 1)[0])
    except ValueError:
        return None
    if not hmac.compare_digest(token, bootstrap_token_for(key)):
        return None
    return Node.objects.select_related("cluster").filter(key=key).first()


# --- the lease ------------------------------------------------------------------------


def _claim(cluster_id: int, owner: str) -> bool:
    now = timezone.now()
    until = now + timedelta(seconds=settings.CUMULUS_RECONCILE_LEASE_S)
    return bool(
        Cluster.objects.filter(pk=cluster_id, lease_until__lt=now).update(lease_until=until, lease_owner=owner)
    )


def _renew(cluster_id: int, owner: str) -> None:
    until = timezone.now() + timedelta(seconds=settings.CUMULUS_RECONCILE_LEASE_S)
    Cluster.objects.filter(pk=cluster_id, lease_owner=owner).update(lease_until=until)


def _release(cluster_id: int, owner: str) -> None:
    Cluster.objects.filter(pk=cluster_id, lease_owner=owner).update(
        lease_until=timezone.now(), lease_owner="", reconciled_at=timezone.now()
    )


def reconcile_cluster(cluster_id: int) -> bool:
    """Reconcile one cluster. Returns False when another worker holds its lease (it will go round again)."""
    owner = uuid.uuid4().hex
    if not Cluster.objects.filter(pk=cluster_id).exists():
        return True  # deleted: nothing to do
    if not _claim(cluster_id, owner):
        logger.debug("reconcile.busy", extra={"cluster_id": cluster_id})
        return False
    try:
        for _ in range(MAX_PASSES):
            cluster = Cluster.objects.select_related("workspace").get(pk=cluster_id)
            generation = cluster.reconcile_requested
            _reconcile_once(cluster, owner)
            if Cluster.objects.filter(pk=cluster_id, reconcile_requested=generation).exists():
                break
    finally:
        _release(cluster_id, owner)
    return True


def _reconcile_once(cluster: Cluster, owner: str) -> None:
    provider = get_provider(cluster.provider)
    observed = {inst.node_key: inst for inst in provider.list_nodes(cluster_uid=str(cluster.uid))}
    lost = sync_from_observed(cluster, provider, observed)
    nodes = list(cluster.nodes.exclude(state=N.TERMINATED).order_by("id"))
    view = _view(cluster)
    node_views = [planner.NodeView(n.pk, n.name, n.role, n.group_name, n.state) for n in nodes]
    actions = planner.plan(view, node_views, lost)
    _renew(cluster.pk, owner)
    apply(cluster, provider, actions)
    settle_jobs(cluster)  # after apply: a stopped cluster or a lost head ends the jobs it held


# --- observe and record ---------------------------------------------------------------


def agent_api_reachable(now=None) -> bool:
    """Whether agents are evidently reaching us. If no node anywhere has heartbeated lately,
    the silence is ours (the web was down), not the nodes': nobody is declared lost for it."""
    now = now or timezone.now()
    # Crosses workspaces on purpose: this is a health signal of the install as a whole.
    latest = Node.objects.filter(state__in=planner.LIVE).aggregate(latest=Max("last_heartbeat_at"))["latest"]
    return latest is not None and (now - latest).total_seconds() < settings.CUMULUS_NODE_LOST_AFTER_S / 2


def sync_from_observed(cluster: Cluster, provider: NodeProvider, observed: dict[str, Instance]) -> dict[str, list[str]]:
    """Record what already happened: adopt machines, mark the vanished and silent LOST, confirm terminations.

    Returns the names of nodes lost in this pass, by group, for the replacements' events.
    """
    now = timezone.now()
    reachable: bool | None = None
    lost: dict[str, list[str]] = {}
    to_terminate: list[Node] = []
    for node in cluster.nodes.exclude(state=N.TERMINATED).order_by("id"):
        inst = observed.get(str(node.key))
        if node.state == N.REQUESTED:
            if inst is not None:  # created before a crash: adopt it
                node_transition(node=node, to=N.PROVISIONING, reason="machine found", extra=_instance_fields(inst))
            continue
        if node.state == N.DRAINING:
            # Scale-down: the agent drains through Ray, stops Ray and says "stopping"; then the
            # machine goes. A drain that never finishes is cut short rather than billed forever.
            draining_for = (now - node.state_changed_at).total_seconds()
            if node.agent_state == "stopping" or inst is None:
                node_transition(node=node, to=N.TERMINATING, reason="drained")
            elif draining_for > settings.CUMULUS_DRAIN_TIMEOUT_S:
                node_transition(node=node, to=N.TERMINATING, level=EventLevel.WARNING,
                                reason=f"still draining after {draining_for:.0f}s; terminating")
        if node.state in (N.PROVISIONING, N.BOOTING, N.READY):
            why = ""
            started = node.launched_at or node.created_at
            if inst is None:
                if (now - started).total_seconds() > LIST_GRACE_S or node.last_heartbeat_at is not None:
                    why = "its machine is gone"
            else:
                last = node.last_heartbeat_at or started
                silent = (now - last).total_seconds()
                if node.state in (N.PROVISIONING, N.BOOTING) and (now - started).total_seconds() > (
                    settings.CUMULUS_NODE_BOOT_TIMEOUT_S
                ):
                    why = f"not ready {settings.CUMULUS_NODE_BOOT_TIMEOUT_S:.0f}s after launch"
                elif silent > settings.CUMULUS_NODE_LOST_AFTER_S:
                    if reachable is None:
                        reachable = agent_api_reachable(now)
                    if reachable:
                        why = f"no heartbeat for {silent:.0f}s"
                elif node.state == N.READY and _ray_reports_dead(cluster, node):
                    why = "Ray reports the node dead"
            if why:
                node_transition(node=node, to=N.LOST, reason=why, level=EventLevel.WARNING, kind=EventKind.NODE_LOST)
                lost.setdefault(node.group_name, []).append(node.name)
        if node.state == N.LOST:
            node_transition(node=node, to=N.TERMINATING, reason="terminating the lost node's machine")
        if node.state == N.TERMINATING:
            to_terminate.append(node)
    _terminate(cluster, provider, to_terminate, observed)
    if cluster.gcs_address and not cluster.nodes.filter(role=NodeRole.HEAD, state=N.READY).exists():
        # The head is gone: its addresses must not be handed to workers or shown to users.
        Cluster.objects.filter(pk=cluster.pk).update(gcs_address="", dashboard_url="", ray_alive_node_ids=[],
                                                     ray_reported_at=None)
        cluster.gcs_address = cluster.dashboard_url = ""
    return lost


def _ray_reports_dead(cluster: Cluster, node: Node) -> bool:
    if node.role == NodeRole.HEAD or not node.ray_node_id or cluster.ray_reported_at is None or node.ready_at is None:
        return False
    # The head's report must postdate this node's readiness by a margin before it counts.
    if (cluster.ray_reported_at - node.ready_at).total_seconds() < 10:
        return False
    return node.ray_node_id not in set(cluster.ray_alive_node_ids or [])


def _instance_fields(inst: Instance) -> dict:
    fields = {"instance_id": inst.instance_id, "private_ip": inst.private_ip or "", "public_ip": inst.public_ip or ""}
    fields["launched_at"] = (
        datetime.fromtimestamp(inst.launched_at, tz=UTC) if inst.launched_at else timezone.now()
    )
    return fields


def _terminate(cluster: Cluster, provider: NodeProvider, nodes: list[Node], observed: dict[str, Instance]) -> None:
    """Terminate the machines of TERMINATING nodes and confirm; a node is TERMINATED only once its machine is gone."""
    if not nodes:
        return
    ids = [observed[str(n.key)].instance_id for n in nodes if str(n.key) in observed]
    if ids:
        provider.terminate_nodes(ids)
        still = {i.node_key for i in provider.list_nodes(cluster_uid=str(cluster.uid))}
    else:
        still = set()
    for node in nodes:
        if str(node.key) not in still:
            node_transition(node=node, to=N.TERMINATED, reason="machine terminated")


# --- apply ----------------------------------------------------------------------------


def apply(cluster: Cluster, provider: NodeProvider, actions: planner.Plan) -> None:
    if actions.terminations:
        by_id = {n.pk: n for n in cluster.nodes.filter(pk__in=[i for i, _ in actions.terminations])}
        doomed = []
        for node_id, reason in actions.terminations:
            node = by_id.get(node_id)
            if node and node_transition(node=node, to=N.TERMINATING, reason=reason):
                doomed.append(node)
        observed = {i.node_key: i for i in provider.list_nodes(cluster_uid=str(cluster.uid))}
        _terminate(cluster, provider, doomed, observed)

    if actions.launches:
        _create_node_rows(cluster, actions.launches)
    _launch_requested(cluster, provider)

    # The plan's status was decided before the provider calls; decide again on what they did,
    # so a launched head shows STARTING and confirmed terminations finish now, not next sweep.
    refresh_status(cluster)


def refresh_status(cluster: Cluster) -> None:
    """Move the cluster to the status its nodes call for now (also the heartbeat's fast path)."""
    cluster.refresh_from_db()
    nodes = [planner.NodeView(n.pk, n.name, n.role, n.group_name, n.state)
             for n in cluster.nodes.exclude(state=N.TERMINATED)]
    if cluster.status in (C.STOPPING, C.TERMINATING):
        target = None if nodes else (C.STOPPED if cluster.status == C.STOPPING else C.TERMINATED)
    else:
        target = planner.target_status(_view(cluster), nodes)
    walk_status(cluster, target)


def _view(cluster: Cluster) -> planner.ClusterView:
    return planner.ClusterView(
        status=cluster.status,
        head_instance_type=cluster.head_instance_type,
        groups=tuple(
            planner.GroupView(g.name, g.instance_type, g.min_workers, g.desired_workers, g.spot)
            for g in cluster.groups.all()
        ),
    )


def walk_status(cluster: Cluster, target: str | None, message: str = "") -> None:
    """Move the cluster to `target` through the allowed intermediate statuses."""
    if not target or target == cluster.status:
        return
    for step in planner.STATUS_PATHS.get((cluster.status, target), ()):
        if not cluster_transition(cluster=cluster, to=step, message=message or _status_message(cluster, step)):
            return


def _status_message(cluster: Cluster, status: str) -> str:
    if status == C.RUNNING:
        ready = cluster.nodes.filter(state=N.READY).count()
        return f"{ready} node{'s' if ready != 1 else ''} ready"
    if status == C.UPDATING:
        return "replacing or resizing nodes"
    return ""


@transaction.atomic
def _create_node_rows(cluster: Cluster, launches: list[planner.Launch]) -> list[Node]:
    """Write the node rows, each with its idempotency key, before any provider call.

    The plan was made from a read taken before this lock: a second reconcile (its lease
    expired, or a stale worker) may have written rows since. Count again under the lock
    and write only what is still missing, so two planners never launch the same node twice.
    """
    Cluster.objects.select_for_update().get(pk=cluster.pk)
    groups = {g.name: g for g in NodeGroup.objects.filter(cluster=cluster)}
    active = list(cluster.nodes.filter(state__in=planner.ACTIVE).values_list("role", "group_name"))
    has_head = any(role == NodeRole.HEAD for role, _ in active)
    wanted = {name: g.desired_workers - sum(1 for role, group_name in active
                                             if role == NodeRole.WORKER and group_name == name)
              for name, g in groups.items()}
    created = []
    for launch in launches:
        if launch.role == NodeRole.HEAD:
            if has_head:
                continue
            has_head = True
        else:
            if wanted.get(launch.group_name, 0) <= 0:
                continue
            wanted[launch.group_name] -= 1
        prefix = "head" if launch.role == NodeRole.HEAD else launch.group_name
        used = cluster.nodes.filter(group_name=launch.group_name).count()
        node = Node.objects.create(
            cluster=cluster,
            group=groups.get(launch.group_name),
            group_name=launch.group_name,
            role=launch.role,
            name=f"{prefix}-{used + 1}",
            instance_type=launch.instance_type,
            market="spot" if launch.spot else "on-demand",
        )
        text = f"Launching {node.name} ({node.instance_type})"
        if launch.replaces:
            text += f" to replace {launch.replaces}"
        record_event(cluster=cluster, node=node,
                     kind=EventKind.NODE_REPLACED if launch.replaces else EventKind.NODE_STATE,
                     message=text, data={"node": node.name, "replaces": launch.replaces})
        created.append(node)
    return created


def _launch_requested(cluster: Cluster, provider: NodeProvider) -> None:
    """Call the provider for every REQUESTED node (new ones, and any left by a crash: same key, no duplicate)."""
    pending = list(cluster.nodes.filter(state=N.REQUESTED).order_by("role", "id"))  # "head" sorts first
    if not pending:
        return
    requests = [_launch_request(cluster, node) for node in pending]
    with ThreadPoolExecutor(max_workers=min(8, len(requests))) as pool:
        outcomes = list(pool.map(lambda r: _call_create(provider, r), requests))
    transient: list[str] = []
    for node, (inst, error) in zip(pending, outcomes, strict=True):
        if inst is not None:
            fields = _instance_fields(inst)
            if not node_transition(node=node, to=N.PROVISIONING, reason=f"machine {inst.instance_id} created",
                                   extra=fields):
                Node.objects.filter(pk=node.pk).update(**fields)  # the agent registered first
        elif isinstance(error, PermanentProviderError):
            node_transition(node=node, to=N.TERMINATING, reason=f"launch failed: {error}", level=EventLevel.ERROR,
                            kind=EventKind.NODE_LAUNCH_FAILED)
            node_transition(node=node, to=N.TERMINATED, reason="nothing was created")
            if node.role == NodeRole.HEAD:
                cluster.refresh_from_db()
                if cluster.status in (C.PENDING, C.PROVISIONING, C.STARTING, C.RUNNING, C.UPDATING):
                    cluster_transition(cluster=cluster, to=C.FAILED, message=f"head launch failed: {error}",
                                       level=EventLevel.ERROR)
        else:
            transient.append(f"{node.name}: {error}")
    if transient:
        record_event(cluster=cluster, kind=EventKind.PROVIDER_ERROR, level=EventLevel.WARNING,
                     message="Launch will be retried: " + "; ".join(transient))
        raise TransientProviderError("; ".join(transient))


def _call_create(provider: NodeProvider, request: LaunchRequest) -> tuple[Instance | None, Exception | None]:
    try:
        return provider.create_node(request), None
    except (TransientProviderError, PermanentProviderError) as error:
        return None, error
    except OSError as error:  # a local process could not be started: worth another try
        return None, TransientProviderError(str(error))


def _launch_request(cluster: Cluster, node: Node) -> LaunchRequest:
    itype = find_instance_type(cluster.provider, node.instance_type)
    if itype is None:
        raise PermanentProviderError(f"instance type {node.instance_type} left the catalog")
    return LaunchRequest(
        node_key=str(node.key),
        cluster_uid=str(cluster.uid),
        cluster_name=cluster.name,
        workspace=cluster.workspace.slug,
        role=node.role,  # type: ignore[arg-type]
        group=node.group_name,
        instance_type=itype,
        bootstrap=Bootstrap(control_plane_url=settings.CUMULUS_PUBLIC_URL,
                            bootstrap_token=bootstrap_token_for(node.key)),
        spot=node.market == "spot",
        region=cluster.region,
        zone=cluster.zone,
        tags={str(k): str(v) for k, v in (cluster.tags or {}).items()},
    )


# --- the sweep ------------------------------------------------------------------------


def clusters_needing_reconcile() -> list[int]:
    # Crosses workspaces on purpose: the sweep covers the whole install.
    return list(
        Cluster.objects.filter(
            ~Q(status__in=[C.TERMINATED, C.STOPPED])
            | Q(nodes__state__in=[*planner.LIVE, N.TERMINATING, N.LOST])
        ).values_list("pk", flat=True).distinct()
    )


def collect_orphans(provider_names: list[str]) -> int:
    """Terminate machines that carry our tags but have no live node row: leaked machines cost money."""
    count = 0
    for name in provider_names:
        provider = get_provider(name)
        for inst in provider.list_nodes(cluster_uid=None):
            try:
                key = uuid.UUID(inst.node_key)
            except ValueError:
                key = None
            node = Node.objects.select_related("cluster").filter(key=key).first() if key else None
            if node is not None and node.state != N.TERMINATED:
                continue
            age = (timezone.now().timestamp() - inst.launched_at) if inst.launched_at else float("inf")
            if age < settings.CUMULUS_ORPHAN_GRACE_S:
                continue  # may be a launch whose row is still being written
            provider.terminate_nodes([inst.instance_id])
            count += 1
            logger.warning("orphan.terminated", extra={"instance_id": inst.instance_id, "node_key": inst.node_key})
            cluster = node.cluster if node else Cluster.objects.filter(uid=_uuid_or_none(inst.cluster_uid)).first()
            if cluster is not None:
                record_event(cluster=cluster, node=node, kind=EventKind.ORPHAN_TERMINATED, level=EventLevel.WARNING,
                             message=f"Terminated machine {inst.instance_id}: it had no live node")
    return count


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError):
        return None
