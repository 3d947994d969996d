"""Tenancy: another workspace is invisible (404), a low role is refused (403), bad tokens are 401."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from clusters.choices import ClusterStatus, NodeRole, NodeState
from clusters.models import Cluster, ClusterEvent, Job, JobLogChunk, Node, NodeGroup
from clusters.reconciler import bootstrap_token_for, reconcile_cluster
from controlplane.choices import Role
from controlplane.models import ApiToken, AuditEvent, Membership, Workspace
from controlplane.services import Actor, token_create, token_revoke
from projects.models import Blob, Snapshot
from projects.services import blob_upload, snapshot_create
from tests.conftest import Api, api_for
from tests.factories import ClusterFactory, MembershipFactory, NodeFactory, UserFactory, WorkspaceFactory
from tests.fakes import FakeProvider

pytestmark = pytest.mark.django_db

WS_PREFIX = "api/v1/workspaces/(?P<ws>"
VALID_CLUSTER = {"name": "stolen", "head": {"instance_type": "local.small"},
                 "worker_groups": [{"name": "cpu", "instance_type": "local.small", "max_workers": 1}]}
BODIES = {  # a valid body per (route, method): a 404 must not depend on validation failing first
    ("members/", "post"): {"email": "intruder@example.com", "role": "owner"},
    ("members/{user}/", "patch"): {"role": "viewer"},
    ("clusters/", "post"): VALID_CLUSTER,
    ("clusters/{name}/", "patch"): {"tags": {"owned": "yes"}},
    ("", "patch"): {"name": "Renamed"},
    ("blobs/missing/", "post"): {"sha256": [hashlib.sha256(b"secret").hexdigest()]},
    ("clusters/{name}/jobs/", "post"): {"snapshot": "6f1c0a4e-2b1d-4a8e-9a53-1f0c2d3e4b5a",
                                        "entrypoint": "python x.py"},
    ("snapshots/", "post"): {"files": [{"path": "s.py", "sha256": hashlib.sha256(b"secret").hexdigest(),
                                        "size": 6, "mode": 420}]},
}


def workspace_routes() -> Iterator[tuple[str, list[str]]]:
    """Every URL pattern under /api/v1/workspaces/{ws}/ with the methods it routes."""

    def walk(patterns: list, prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
        for p in patterns:
            if isinstance(p, URLResolver):
                yield from walk(p.url_patterns, prefix + str(p.pattern))
            else:
                yield prefix + str(p.pattern), p

    for regex, pattern in walk(get_resolver().url_patterns):
        regex = regex.replace("^", "").replace("$", "").replace("/?", "/")  # the router accepts both spellings
        if regex.startswith(WS_PREFIX):
            methods = sorted(getattr(pattern.callback, "actions", {}) or {"get": None})
            yield regex, methods


def fill(regex: str, params: dict[str, str]) -> tuple[str, str]:
    """(path, route shape) with the named groups replaced by `params`."""
    shape = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: "{" + m.group(1) + "}", regex)
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: params[m.group(1)], regex)
    return "/" + path, shape.split("{ws}/", 1)[1]


def snapshot(workspace: Workspace) -> dict:
    clusters = Cluster.objects.for_workspace(workspace)
    return {
        "workspace": list(Workspace.objects.filter(pk=workspace.pk).values()),
        "members": sorted(Membership.objects.filter(workspace=workspace).values_list("user_id", "role")),
        "clusters": list(clusters.order_by("id").values()),
        "groups": list(NodeGroup.objects.filter(cluster__in=clusters).order_by("id").values()),
        "nodes": list(Node.objects.filter(cluster__in=clusters).order_by("id").values()),
        "events": ClusterEvent.objects.filter(cluster__in=clusters).count(),
        "audit": AuditEvent.objects.filter(workspace=workspace).count(),
        "blobs": sorted(Blob.objects.for_workspace(workspace).values_list("sha256", "size")),
        "snapshots": sorted(str(s) for s in Snapshot.objects.for_workspace(workspace).values_list("id", flat=True)),
        "jobs": list(Job.objects.for_workspace(workspace).order_by("id").values()),
        "log": list(JobLogChunk.objects.filter(job__workspace=workspace).values_list("job_id", "offset")),
    }


def a_job(cluster: Cluster, snapshot_id: str) -> str:
    """A running job with a line of log on `cluster`; its id."""
    job = Job.objects.create(workspace=cluster.workspace, cluster=cluster, snapshot_id=snapshot_id,
                             entrypoint="python secret.py", status="RUNNING", log_size=7)
    JobLogChunk.objects.create(job=job, offset=0, data=b"secret\n")
    return str(job.pk)


def sync_objects(workspace: Workspace) -> dict[str, str]:
    """A blob and a snapshot in `workspace`; the path parameters that name them."""
    digest = hashlib.sha256(b"secret").hexdigest()
    blob_upload(workspace=workspace, sha256=digest, chunks=[b"secret"], actor=Actor(user=None))
    snap = snapshot_create(workspace=workspace, files=[{"path": "s.py", "sha256": digest, "size": 6, "mode": 420}],
                           actor=Actor(user=None))
    return {"sha256": digest, "snapshot_id": str(snap.pk)}


@pytest.fixture(autouse=True)
def blob_dir(settings, tmp_path):
    settings.CUMULUS_BLOB_DIR = str(tmp_path / "blobs")


@pytest.fixture
def other_workspace() -> dict:
    """Workspace B with an owner, a member, a cluster with a node and an event."""
    ws = WorkspaceFactory(slug="bravo")
    owner = MembershipFactory(workspace=ws, role=Role.OWNER).user
    MembershipFactory(workspace=ws, role=Role.MEMBER)
    cluster = ClusterFactory(workspace=ws, name="secret", status=ClusterStatus.RUNNING)
    NodeFactory(cluster=cluster, role=NodeRole.HEAD, state=NodeState.READY)
    ClusterEvent.objects.create(cluster=cluster, kind="cluster.created", message="created")
    objects = sync_objects(ws)
    return {"ws": ws, "params": {"ws": ws.slug, "name": cluster.name, "user": str(owner.pk), **objects,
                                 "job_id": a_job(cluster, objects["snapshot_id"])}}


def test_routes_walked_cover_every_workspace_resource():
    params = {"ws": "w", "name": "n", "user": "1", "sha256": "0" * 64, "snapshot_id": "0" * 32, "job_id": "0" * 32}
    shapes = {fill(regex, params)[1] for regex, _ in workspace_routes()}
    assert {"", "members/", "members/{user}/", "clusters/", "clusters/{name}/", "clusters/{name}/start/",
            "clusters/{name}/stop/", "clusters/{name}/nodes/", "clusters/{name}/events/", "blobs/missing/",
            "blobs/{sha256}/", "snapshots/", "snapshots/{snapshot_id}/", "clusters/{name}/jobs/",
            "clusters/{name}/jobs/{job_id}/", "clusters/{name}/jobs/{job_id}/logs/",
            "clusters/{name}/jobs/{job_id}/stop/",
            "jobs/", "jobs/{job_id}/", "jobs/{job_id}/logs/", "jobs/{job_id}/stop/"} <= shapes


@pytest.mark.parametrize("role", [Role.OWNER, Role.VIEWER])
def test_every_route_of_another_workspace_is_404(other_workspace: dict, role: str):
    # given: an owner (or viewer) of workspace A, and workspace B full of things
    mine = WorkspaceFactory(slug="alpha")
    me = MembershipFactory(workspace=mine, role=role).user
    api = api_for(me)
    before = snapshot(other_workspace["ws"])
    tried = 0
    # when: every method of every route is tried against B's objects
    for regex, methods in workspace_routes():
        path, shape = fill(regex, other_workspace["params"])
        for method in [*methods, "head"] if "get" in methods else methods:
            response = api.request(method, path, BODIES.get((shape, method)))
            # then
            assert response.status_code == 404, (method, path, response.status_code, response.content)
            if method != "head":
                assert response.json()["error"]["code"] == "not_found", (method, path)
                assert "bravo" not in response.content.decode() and "secret" not in response.content.decode()
            tried += 1
    assert tried >= 15
    assert snapshot(other_workspace["ws"]) == before


def test_a_workspace_that_does_not_exist_looks_the_same_as_one_you_are_not_in(other_workspace: dict, api: Api):
    hidden = api.get("workspaces/bravo/clusters/")
    missing = api.get("workspaces/nowhere/clusters/")
    assert (hidden.status_code, hidden.json()) == (missing.status_code, missing.json())


def test_the_workspace_list_shows_only_mine(other_workspace: dict, workspace: Workspace, api: Api):
    response = api.get("workspaces/")
    assert [w["slug"] for w in response.json()["results"]] == [workspace.slug]
    assert response.json()["results"][0]["role"] == Role.OWNER


def test_a_viewer_gets_403_on_every_write_route_of_their_workspace(workspace: Workspace):
    # given
    cluster = ClusterFactory(workspace=workspace, name="mine", status=ClusterStatus.RUNNING)
    owner = Membership.objects.get(workspace=workspace, role=Role.OWNER).user
    viewer = MembershipFactory(workspace=workspace, role=Role.VIEWER).user
    api = api_for(viewer)
    objects = sync_objects(workspace)
    params = {"ws": workspace.slug, "name": cluster.name, "user": str(owner.pk), **objects,
              "job_id": a_job(cluster, objects["snapshot_id"])}
    before = snapshot(workspace)
    tried = 0
    # when / then
    for regex, methods in workspace_routes():
        path, shape = fill(regex, params)
        for method in methods:
            if method in ("get", "head"):
                assert api.request(method, path).status_code == 200, path
                continue
            response = api.request(method, path, BODIES.get((shape, method)))
            assert response.status_code == 403, (method, path, response.content)
            assert response.json()["error"]["code"] == "permission_denied"
            tried += 1
    assert tried >= 9
    assert snapshot(workspace) == before


def test_a_member_cannot_manage_members(workspace: Workspace, member_api):
    owner = Membership.objects.get(workspace=workspace, role=Role.OWNER).user
    viewer = MembershipFactory(workspace=workspace, role=Role.VIEWER).user
    api = member_api(workspace, Role.MEMBER)
    base = f"workspaces/{workspace.slug}/members/"
    assert api.post(base, {"email": "new@example.com", "role": "viewer"}).status_code == 403
    assert api.patch(f"{base}{viewer.pk}/", {"role": "admin"}).status_code == 403
    assert api.delete(f"{base}{viewer.pk}/").status_code == 403
    assert api.delete(f"{base}{owner.pk}/").status_code == 403
    assert Membership.objects.filter(workspace=workspace).count() == 3


def test_an_admin_manages_members_but_not_owners(workspace: Workspace, member_api):
    owner = Membership.objects.get(workspace=workspace, role=Role.OWNER).user
    api = member_api(workspace, Role.ADMIN)
    base = f"workspaces/{workspace.slug}/members/"
    added = api.post(base, {"email": "New@Example.com", "role": "member"})
    assert added.status_code == 201, added.content
    assert added.json()["email"] == "new@example.com"
    assert api.patch(f"{base}{added.json()['user_id']}/", {"role": "viewer"}).json()["role"] == "viewer"
    assert api.post(base, {"email": "boss@example.com", "role": "owner"}).status_code == 403
    assert api.patch(f"{base}{owner.pk}/", {"role": "member"}).status_code == 403
    assert api.delete(f"{base}{owner.pk}/").status_code == 403
    assert api.post(base, {"email": "new@example.com", "role": "member"}).status_code == 409


def test_a_member_may_leave(workspace: Workspace):
    viewer = MembershipFactory(workspace=workspace, role=Role.VIEWER).user
    assert api_for(viewer).delete(f"workspaces/{workspace.slug}/members/{viewer.pk}/").status_code == 204
    assert not Membership.objects.filter(workspace=workspace, user=viewer).exists()


def test_the_last_owner_cannot_be_removed_or_demoted(workspace: Workspace, user, api: Api):
    base = f"workspaces/{workspace.slug}/members/{user.pk}/"
    for response in (api.delete(base), api.patch(base, {"role": "admin"})):
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "conflict"
    assert Membership.objects.get(workspace=workspace, user=user).role == Role.OWNER
    # with a second owner, the first may step down
    second = MembershipFactory(workspace=workspace, role=Role.OWNER).user
    assert api.patch(base, {"role": "admin"}).status_code == 200
    assert api_for(second).delete(f"workspaces/{workspace.slug}/members/{second.pk}/").status_code == 409


# --- tokens -----------------------------------------------------------------------------


def test_expired_and_revoked_tokens_get_401(workspace: Workspace, user):
    _, expired_raw = token_create(user=user, name="old", expires_at=timezone.now() - timedelta(seconds=1))
    revoked, revoked_raw = token_create(user=user, name="gone")
    token_revoke(token=revoked, actor=Actor(user=user))
    for raw, why in ((expired_raw, "expired"), (revoked_raw, "revoked"), ("cu_" + "x" * 43, "Invalid")):
        response = Api(user, raw).get("workspaces/")
        assert response.status_code == 401, raw
        assert response.json()["error"]["code"] == "not_authenticated"
        assert why in response.json()["error"]["message"]
        assert response["WWW-Authenticate"] == "Bearer"
    assert Api().get("workspaces/").status_code == 401


def test_a_disabled_account_gets_401(user, api: Api):
    user.is_active = False
    user.save()
    assert api.get("workspaces/").status_code == 401


def test_tokens_are_shown_once_and_stored_hashed(api: Api, user):
    created = api.post("tokens/", {"name": "ci", "expires_in_days": 30})
    assert created.status_code == 201
    raw = created.json()["token"]
    assert raw.startswith("cu_")
    row = ApiToken.objects.get(pk=created.json()["id"])
    assert raw not in (row.token_hash, row.name) and row.last_four == raw[-4:]
    assert all("token" not in t for t in api.get("tokens/").json()["results"])
    assert Api(user, raw).get("tokens/").status_code == 200
    assert api.delete(f"tokens/{row.pk}/").status_code == 204
    assert Api(user, raw).get("tokens/").status_code == 401


def test_another_users_token_cannot_be_revoked_or_seen(api: Api):
    stranger = UserFactory()
    theirs, raw = token_create(user=stranger, name="theirs")
    assert api.delete(f"tokens/{theirs.pk}/").status_code == 404
    assert theirs.pk not in [t["id"] for t in api.get("tokens/").json()["results"]]
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    assert Api(stranger, raw).get("tokens/").status_code == 200


# --- node tokens ------------------------------------------------------------------------


@pytest.fixture
def two_nodes(fake_provider: FakeProvider, workspace: Workspace) -> tuple[Node, Node, str]:
    cluster = ClusterFactory(workspace=workspace, groups=[{"name": "cpu", "min_workers": 1, "max_workers": 1}])
    reconcile_cluster(cluster.pk)
    head, worker = Node.objects.filter(cluster=cluster).order_by("id")
    registered = Api().post("/api/agent/v1/register", {"bootstrap_token": bootstrap_token_for(head.key)})
    assert registered.status_code == 200
    return head, worker, registered.json()["node_token"]


def test_a_node_token_speaks_only_for_its_own_node(two_nodes: tuple[Node, Node, str]):
    head, worker, token = two_nodes
    agent = Api(None, token)
    response = agent.post(f"/api/agent/v1/nodes/{worker.key}/heartbeat", {"state": "failed", "message": "x"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    worker.refresh_from_db()
    assert worker.state == NodeState.PROVISIONING and worker.last_heartbeat_at is None
    assert agent.post(f"/api/agent/v1/nodes/{head.key}/heartbeat", {"state": "starting_ray"}).status_code == 200


def test_a_user_token_cannot_heartbeat_and_a_node_token_cannot_use_the_user_api(
    two_nodes: tuple[Node, Node, str], api: Api, workspace: Workspace
):
    head, _, node_token = two_nodes
    as_user = api.post(f"/api/agent/v1/nodes/{head.key}/heartbeat", {"state": "ready"})
    assert as_user.status_code == 401
    assert Api().post(f"/api/agent/v1/nodes/{head.key}/heartbeat", {"state": "ready"}).status_code == 401
    head.refresh_from_db()
    assert head.state == NodeState.BOOTING
    as_node = Api(None, node_token)
    for path in ("workspaces/", f"workspaces/{workspace.slug}/clusters/", "tokens/", "catalog/instance-types/"):
        response = as_node.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "not_authenticated"
    boot = Api(None, bootstrap_token_for(head.key))
    assert boot.get("workspaces/").status_code == 401


# --- audit ------------------------------------------------------------------------------


def test_mutations_write_audit_rows_with_who_what_and_where(workspace: Workspace, user, api: Api):
    base = f"workspaces/{workspace.slug}/"
    extra = {"REMOTE_ADDR": "203.0.113.7", "HTTP_USER_AGENT": "cloudctl/0.1"}
    assert api.post(f"{base}clusters/", VALID_CLUSTER, **extra).status_code == 201
    assert api.patch(f"{base}clusters/stolen/", {"tags": {"a": "b"}}, **extra).status_code == 200
    assert api.post(f"{base}clusters/stolen/stop/", **extra).status_code == 202
    assert api.delete(f"{base}clusters/stolen/", **extra).status_code == 202
    assert api.post(f"{base}members/", {"email": "x@example.com", "role": "viewer"}, **extra).status_code == 201
    assert api.patch(base, {"name": "Renamed"}, **extra).status_code == 200
    rows = AuditEvent.objects.filter(workspace=workspace, ip_address="203.0.113.7").order_by("id")
    assert [r.action for r in rows] == ["cluster.create", "cluster.update", "cluster.stop", "cluster.delete",
                                        "member.add", "workspace.update"]
    assert {(r.actor_id, r.actor_email, r.user_agent) for r in rows} == {(user.pk, user.email, "cloudctl/0.1")}
    assert all(r.token_id == ApiToken.objects.get(user=user).pk for r in rows)
    assert rows[0].target_type == "cluster" and rows[0].target_id == "stolen"


def test_reads_write_no_audit_rows(workspace: Workspace, api: Api):
    before = AuditEvent.objects.count()
    api.get("workspaces/")
    api.get(f"workspaces/{workspace.slug}/clusters/")
    api.get(f"workspaces/{workspace.slug}/members/")
    assert AuditEvent.objects.count() == before
