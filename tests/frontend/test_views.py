"""The console's views through Django's test client: sign-in, tenancy, roles, form errors, CSRF, live fragments.

The browser tests (test_browser.py) show the same pages work in Chromium against a real control
plane; these pin the rules quickly, and that the console answers exactly as the API does.
"""

from __future__ import annotations

import hashlib
import html as html_lib
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from clusters.choices import ClusterStatus, JobStatus, NodeRole, NodeState
from clusters.models import Cluster, ClusterEvent, Job, JobLogChunk
from controlplane.choices import Role
from controlplane.models import ApiToken, AuditEvent, Membership, Workspace
from controlplane.services import Actor, token_create
from frontend.views import jobs as job_views
from projects.services import blob_upload, snapshot_create
from tests.conftest import api_for
from tests.factories import ClusterFactory, MembershipFactory, NodeFactory, UserFactory, WorkspaceFactory

pytestmark = pytest.mark.django_db

Console = Callable[..., Client]


def csrf_token(client: Client) -> str:
    """A CSRF token as a browser has it: from the cookie that a page with a form set."""
    for url in ("/console/login/", "/console/tokens/"):  # the first for visitors, the second once signed in
        if "csrftoken" not in client.cookies:
            client.get(url)
    return client.cookies["csrftoken"].value


def post(client: Client, url: str, data: dict | None = None, **extra: str) -> object:
    """POST like the console's own forms do: with the CSRF token."""
    return client.post(url, {"csrfmiddlewaretoken": csrf_token(client), **(data or {})}, **extra)


def valid_form(name: str = "web", **overrides: str) -> dict[str, object]:
    form: dict[str, object] = {
        "name": name, "provider": "local", "head_instance_type": "local.small", "wg": ["0"],
        "wg-0-name": "cpu", "wg-0-instance_type": "local.small", "wg-0-min_workers": "0", "wg-0-max_workers": "2",
        "idle_timeout_minutes": "5", "auto_stop_minutes": "60",
    }
    form.update(overrides)
    return form


def html(response: object) -> str:
    return response.content.decode()  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def blob_dir(settings, tmp_path) -> None:
    settings.CUMULUS_BLOB_DIR = str(tmp_path / "blobs")


def make_job(cluster: Cluster, *, log: Sequence[bytes] = (), **fields: object) -> Job:
    """A job of `cluster` on a real snapshot, its log stored as `log`'s chunks one after the other."""
    main = b"print('hello')\n"
    digest = hashlib.sha256(main).hexdigest()
    blob_upload(workspace=cluster.workspace, sha256=digest, chunks=[main], actor=Actor(user=None))
    snapshot = snapshot_create(workspace=cluster.workspace, actor=Actor(user=None),
                               files=[{"path": "main.py", "sha256": digest, "size": len(main), "mode": 0o644}])
    fields = {"entrypoint": "python main.py", "status": JobStatus.RUNNING, **fields}
    job = Job.objects.create(workspace=cluster.workspace, cluster=cluster, snapshot=snapshot, **fields)
    append_log(job, *log)
    return job


def append_log(job: Job, *chunks: bytes) -> None:
    """Store chunks where the log ends, as the head's reports do."""
    for data in chunks:
        JobLogChunk.objects.create(job=job, offset=job.log_size, data=data)
        job.log_size += len(data)
    Job.objects.filter(pk=job.pk).update(log_size=job.log_size)


HX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "job-log"}


def poll(client: Client, job: Job, offset: int, version: str = "") -> tuple[str, str]:
    """One poll of the log, as htmx sends it: (the text appended to the log, the out-of-band rest)."""
    response = client.get(f"/console/w/acme/jobs/{job.pk}/log/", {"offset": offset, "v": version}, **HX)
    assert response.status_code == 200
    text, rest = html(response).split('<p id="job-log-poller"', 1)
    return text, '<p id="job-log-poller"' + rest


def next_poll(fragment: str) -> tuple[int, str] | None:
    """The offset and header version the poller asks with next; None once it has stopped."""
    found = re.search(r'id="job-log-poller"[^>]*hx-get="[^"?]+\?offset=(\d+)&amp;v=(\w+)"', fragment)
    return (int(found[1]), found[2]) if found else None


# --- sign in and out ------------------------------------------------------------------------------------------

def test_the_console_asks_for_sign_in_and_a_sign_in_needs_the_csrf_token(ws: Workspace) -> None:
    # given a member with a password
    user = UserFactory(email="ada@example.com")
    MembershipFactory(workspace=ws, user=user, role=Role.MEMBER)
    browser = Client(enforce_csrf_checks=True)

    # when an anonymous browser opens the console, then it is sent to sign in
    first = browser.get("/console/")
    assert first.status_code == 302 and first["Location"].startswith("/console/login/?next=/console/")

    # when it posts the sign-in without the CSRF token, then it is refused
    forged = browser.post("/console/login/", {"username": "ada@example.com", "password": "pw"})
    assert forged.status_code == 403

    # when it signs in with the token, then it lands on its workspace's clusters
    signed = post(browser, "/console/login/", {"username": "ada@example.com", "password": "pw", "next": "/console/"})
    assert signed.status_code == 302 and signed["Location"] == "/console/"
    assert browser.get("/console/")["Location"] == "/console/w/acme/clusters/"

    # when it signs out (POST with CSRF), then the console asks for sign-in again
    assert post(browser, "/console/logout/").status_code == 302
    assert browser.get("/console/").status_code == 302


def test_a_wrong_password_is_an_error_on_the_page(ws: Workspace) -> None:
    UserFactory(email="ada@example.com")
    browser = Client(enforce_csrf_checks=True)
    response = post(browser, "/console/login/", {"username": "ada@example.com", "password": "nope"},)
    assert response.status_code == 200
    assert "Please enter a correct" in html(response)


def test_the_header_says_who_i_am_my_role_and_lists_my_workspaces_only(console: Console, ws: Workspace) -> None:
    # given a viewer of acme who also owns beta, and a workspace gamma they are not in
    client = console(Role.VIEWER)
    MembershipFactory(workspace=WorkspaceFactory(slug="beta"), user=client.user, role=Role.OWNER)
    WorkspaceFactory(slug="gamma")

    page = html(client.get("/console/w/acme/clusters/"))

    assert client.user.email in page
    assert re.search(r'class="role"[^>]*>viewer<', page)
    assert "/console/w/beta/clusters/" in page
    assert "gamma" not in page


def test_someone_in_no_workspace_is_told_so(db: None) -> None:
    client = Client()
    client.force_login(UserFactory())
    response = client.get("/console/")
    assert response.status_code == 200
    assert "No workspace yet" in html(response)


def test_an_expired_session_sends_an_htmx_poll_to_sign_in(ws: Workspace) -> None:
    response = Client().get("/console/w/acme/clusters/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="cluster-rows",
                            HTTP_HX_CURRENT_URL="http://testserver/console/w/acme/clusters/")
    assert response.status_code == 200
    assert response["HX-Redirect"] == "/console/login/?next=/console/w/acme/clusters/"


# --- tenancy: another workspace is 404 on every route ---------------------------------------------------------

def console_workspace_routes() -> Iterator[str]:
    """Every URL pattern of the console under w/<ws>/, as a route with `{name}`-style placeholders."""

    def walk(patterns: list, prefix: str = "") -> Iterator[str]:
        for p in patterns:
            if isinstance(p, URLResolver):
                yield from walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                yield prefix + str(p.pattern)

    for route in walk(get_resolver().url_patterns):
        if route.startswith("console/w/<slug:ws>/"):
            yield re.sub(r"<\w+:(\w+)>", r"{\1}", route)


ROUTES = sorted(set(console_workspace_routes()))


def test_the_routes_walked_cover_the_console() -> None:
    assert {"console/w/{ws}/clusters/", "console/w/{ws}/new-cluster/", "console/w/{ws}/clusters/{name}/",
            "console/w/{ws}/clusters/{name}/{verb}/", "console/w/{ws}/members/", "console/w/{ws}/audit/",
            "console/w/{ws}/members/{user_id}/role/", "console/w/{ws}/members/{user_id}/remove/",
            "console/w/{ws}/jobs/{job_id}/", "console/w/{ws}/jobs/{job_id}/log/",
            "console/w/{ws}/jobs/{job_id}/stop/"} <= set(ROUTES)


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize("route", ROUTES)
def test_every_route_of_another_workspace_is_404_and_changes_nothing(console: Console, route: str,
                                                                     method: str) -> None:
    # given an owner of acme, and workspace bravo with a running cluster and an owner
    me = console(Role.OWNER)
    bravo = WorkspaceFactory(slug="bravo")
    owner = MembershipFactory(workspace=bravo, role=Role.OWNER)
    cluster = ClusterFactory(workspace=bravo, name="secret", status=ClusterStatus.RUNNING)
    job = make_job(cluster, log=[b"secret output\n"])
    url = "/" + route.format(ws="bravo", name="secret", verb="terminate", user_id=owner.user_id, job_id=job.pk)
    before = (Cluster.objects.filter(workspace=bravo).count(), cluster.status, AuditEvent.objects.count())

    # when I ask for it (with a valid body for the posts)
    if method == "get":
        response = me.get(url)
    else:
        response = post(me, url, {**valid_form("stolen"), "email": me.user.email, "role": "owner"})

    # then it does not exist for me, and nothing in bravo changed
    assert response.status_code == 404, (url, response.status_code)
    assert "secret output" not in html(response)
    job.refresh_from_db()
    assert (job.status, job.stop_requested_at) == (JobStatus.RUNNING, None)
    cluster.refresh_from_db()
    assert (Cluster.objects.filter(workspace=bravo).count(), cluster.status, AuditEvent.objects.count()) == before
    assert Membership.objects.get(workspace=bravo, user=owner.user).role == Role.OWNER


# --- roles: a viewer sees no controls, and a forged POST is refused --------------------------------------------

def test_a_viewer_sees_no_create_or_verb_controls(console: Console, ws: Workspace) -> None:
    viewer = console(Role.VIEWER)
    ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)

    listing = html(viewer.get("/console/w/acme/clusters/"))
    detail = html(viewer.get("/console/w/acme/clusters/alpha/"))

    assert "alpha" in listing and "New cluster" not in listing and "new-cluster" not in listing
    assert "RUNNING" in detail
    for verb in ("start", "stop", "terminate"):
        assert f"/clusters/alpha/{verb}/" not in detail
    assert viewer.get("/console/w/acme/new-cluster/").status_code == 403


def test_a_member_sees_the_controls_the_status_allows(console: Console, ws: Workspace) -> None:
    member = console(Role.MEMBER)
    ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    ClusterFactory(workspace=ws, name="beta", status=ClusterStatus.STOPPED)

    running = html(member.get("/console/w/acme/clusters/alpha/"))
    stopped = html(member.get("/console/w/acme/clusters/beta/"))

    assert "/clusters/alpha/stop/" in running and "/clusters/alpha/terminate/" in running
    assert "/clusters/alpha/start/" not in running
    assert "/clusters/beta/start/" in stopped and "/clusters/beta/stop/" not in stopped
    assert "New cluster" in html(member.get("/console/w/acme/clusters/"))


@pytest.mark.parametrize("verb", ["start", "stop", "terminate"])
def test_a_forged_verb_post_from_a_viewer_is_403_and_changes_nothing(console: Console, ws: Workspace,
                                                                     verb: str) -> None:
    viewer = console(Role.VIEWER)
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)

    confirm = viewer.get(f"/console/w/acme/clusters/alpha/{verb}/")
    forged = post(viewer, f"/console/w/acme/clusters/alpha/{verb}/")

    assert confirm.status_code == 403
    assert forged.status_code == 403
    assert "viewer" in html(forged)
    cluster.refresh_from_db()
    assert cluster.status == ClusterStatus.RUNNING
    assert not AuditEvent.objects.filter(action__startswith="cluster.").exists()


def test_a_forged_create_post_from_a_viewer_is_403_and_creates_nothing(console: Console) -> None:
    viewer = console(Role.VIEWER)
    response = post(viewer, "/console/w/acme/new-cluster/", valid_form())
    assert response.status_code == 403
    assert not Cluster.objects.exists()


def test_a_post_without_the_csrf_token_is_refused(console: Console, ws: Workspace) -> None:
    member = console(Role.MEMBER)
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)

    create = member.post("/console/w/acme/new-cluster/", valid_form())
    stop = member.post("/console/w/acme/clusters/alpha/stop/")
    token = member.post("/console/tokens/", {"name": "sneaky"})

    assert (create.status_code, stop.status_code, token.status_code) == (403, 403, 403)
    cluster.refresh_from_db()
    assert cluster.status == ClusterStatus.RUNNING
    assert not Cluster.objects.filter(name="web").exists()
    assert not ApiToken.objects.filter(name="sneaky").exists()


# --- create: the API's validation and messages ----------------------------------------------------------------

def test_a_member_creates_a_cluster_from_the_form(console: Console, ws: Workspace) -> None:
    member = console(Role.MEMBER)
    form = valid_form("web", **{"wg": ["0", "3"], "wg-3-name": "gpu", "wg-3-instance_type": "local.gpu",
                                "wg-3-min_workers": "", "wg-3-max_workers": "1", "wg-3-spot": "on",
                                "auto_stop_minutes": ""})

    response = post(member, "/console/w/acme/new-cluster/", form)

    assert response.status_code == 302 and response["Location"] == "/console/w/acme/clusters/web/"
    cluster = Cluster.objects.get(workspace=ws, name="web")
    groups = [(g.name, g.instance_type, g.min_workers, g.max_workers, g.spot) for g in cluster.groups.all()]
    assert groups == [("cpu", "local.small", 0, 2, False), ("gpu", "local.gpu", 0, 1, True)]
    assert (cluster.head_instance_type, cluster.idle_timeout_minutes, cluster.auto_stop_minutes) == (
        "local.small", 5, None)
    audit = AuditEvent.objects.get(action="cluster.create")
    assert (audit.actor, audit.token, audit.workspace) == (member.user, None, ws)


def api_spec(form: dict) -> dict:
    """The JSON the API would have been sent for `form`, written out by hand (not through the console's code)."""
    return {"name": form["name"], "provider": "local", "head": {"instance_type": form["head_instance_type"]},
            "worker_groups": [{"name": form["wg-0-name"], "instance_type": form["wg-0-instance_type"],
                               "min_workers": int(form["wg-0-min_workers"]), "max_workers": form["wg-0-max_workers"],
                               "spot": False}],
            "idle_timeout_minutes": -1, "auto_stop_minutes": 60}


def test_a_bad_form_shows_each_api_message_beside_its_field(console: Console, ws: Workspace) -> None:
    # given a form with a bad name, an unknown head type, min above max and a negative idle timeout
    member = console(Role.MEMBER)
    form = valid_form("Bad Name", head_instance_type="local.huge", **{"wg-0-min_workers": "3",
                                                                      "wg-0-max_workers": "2",
                                                                      "idle_timeout_minutes": "-1"})

    # when it is posted to the console, and the same spec to the API
    response = post(member, "/console/w/acme/new-cluster/", form)
    spec = api_spec(form)
    spec["worker_groups"][0]["max_workers"] = 2
    api = api_for(member.user).post("workspaces/acme/clusters/", spec)

    # then nothing is created and every API message shows on the page, beside its field
    assert response.status_code == 400 and api.status_code == 400
    assert not Cluster.objects.exists()
    page = html(response)
    fields = api.json()["error"]["fields"]
    expected = {
        "name-errors": fields["name"],
        "head_instance_type-errors": fields["head"]["instance_type"],
        "wg-0-min_workers-errors": fields["worker_groups"]["0"]["min_workers"],
        "idle_timeout_minutes-errors": fields["idle_timeout_minutes"],
    }
    for element_id, messages in expected.items():
        block = re.search(rf'<ul class="field-errors" id="{element_id}">(.*?)</ul>', page, re.S)
        assert block, f"no errors beside {element_id}"
        shown = re.findall(r"<li>(.*?)</li>", block[1])
        assert shown == [m.replace('"', "&quot;").replace("'", "&#x27;") for m in messages], element_id
    # and the fields keep what was typed
    assert 'value="Bad Name"' in page


def test_a_number_that_is_not_a_number_gets_the_api_message(console: Console) -> None:
    member = console(Role.MEMBER)
    response = post(member, "/console/w/acme/new-cluster/", valid_form(**{"wg-0-max_workers": "two"}))
    page = html(response)
    assert response.status_code == 400
    assert re.search(r'id="wg-0-max_workers-errors"><li>A valid integer is required.</li>', page)
    assert 'id="wg-0-max_workers" name="wg-0-max_workers" value="two"' in page


def test_a_duplicate_live_name_is_an_error_on_the_name(console: Console, ws: Workspace) -> None:
    member = console(Role.MEMBER)
    ClusterFactory(workspace=ws, name="web", status=ClusterStatus.RUNNING)
    response = post(member, "/console/w/acme/new-cluster/", valid_form("web"))
    assert response.status_code == 400
    assert "A live cluster with this name already exists in this workspace." in html(response)
    assert Cluster.objects.filter(name="web").count() == 1


def test_adding_and_removing_worker_groups_keeps_what_was_typed(console: Console) -> None:
    member = console(Role.MEMBER)

    added = post(member, "/console/w/acme/new-cluster/", {**valid_form("keep-me"), "action": "add-group"})
    page = html(added)
    assert added.status_code == 200 and not Cluster.objects.exists()
    assert 'value="keep-me"' in page
    assert 'name="wg-1-name"' in page and "autofocus" in page.split('name="wg-1-name"')[1].split(">")[0]

    removed = post(member, "/console/w/acme/new-cluster/", {**valid_form("keep-me"), "action": "remove-group-0"})
    assert 'name="wg-0-name"' not in html(removed)
    assert "No worker groups" in html(removed)


def test_the_form_shows_the_catalog_with_cpus_memory_gpus_and_prices(console: Console) -> None:
    page = html(console(Role.MEMBER).get("/console/w/acme/new-cluster/"))
    assert "local.gpu: 1 CPU, 4 GB, 1 GPU (virtual), $0.100/h (spot $0.040/h)" in page
    assert "<th scope=\"row\">local.medium</th>" in page


# --- detail, verbs and live fragments -------------------------------------------------------------------------

def test_the_detail_shows_status_nodes_events_chart_and_dashboard(console: Console, ws: Workspace) -> None:
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING, status_message="all good",
                             dashboard_url="http://127.0.0.1:8265")
    NodeFactory(cluster=cluster, role=NodeRole.HEAD, name="head-1", state=NodeState.READY, private_ip="127.0.0.1")
    NodeFactory(cluster=cluster, name="cpu-1", state=NodeState.BOOTING)
    ClusterEvent.objects.create(cluster=cluster, kind="cluster.created", message="Cluster alpha created")

    page = html(console(Role.VIEWER).get("/console/w/acme/clusters/alpha/"))

    assert "all good" in page and 'href="http://127.0.0.1:8265"' in page
    assert 'data-node="head-1"' in page and 'data-node="cpu-1"' in page and "BOOTING" in page
    assert "Cluster alpha created" in page
    assert "<svg" in page and "Node count over time by group" in page
    assert 'hx-trigger="every 2s"' in page


def test_terminated_nodes_are_listed_apart_and_outside_the_polled_part(console: Console, ws: Workspace) -> None:
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    NodeFactory(cluster=cluster, name="cpu-old", state=NodeState.TERMINATED, state_reason="idle for 5 min")
    viewer = console(Role.VIEWER)

    page = html(viewer.get("/console/w/acme/clusters/alpha/"))
    live = html(viewer.get("/console/w/acme/clusters/alpha/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="cluster-live"))

    assert "Terminated nodes (1)" in page and "idle for 5 min" in page
    assert 'data-node="cpu-old"' not in page and "cpu-old" not in live


def test_htmx_polls_get_only_the_live_part(console: Console, ws: Workspace) -> None:
    viewer = console(Role.VIEWER)
    ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.STARTING)

    rows = viewer.get("/console/w/acme/clusters/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="cluster-rows")
    live = viewer.get("/console/w/acme/clusters/alpha/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="cluster-live")

    assert html(rows).startswith('<tbody id="cluster-rows"') and "<html" not in html(rows)
    assert "STARTING" in html(rows)
    assert html(live).startswith('<div id="cluster-live"') and "<html" not in html(live)


def test_a_terminated_cluster_stops_polling(console: Console, ws: Workspace) -> None:
    ClusterFactory(workspace=ws, name="gone", status=ClusterStatus.TERMINATED)
    page = html(console(Role.VIEWER).get("/console/w/acme/clusters/gone/"))
    assert "TERMINATED" in page and 'hx-get="/console/w/acme/clusters/gone/"' not in page


def test_stop_asks_first_then_stops_through_the_service(console: Console, ws: Workspace) -> None:
    member = console(Role.MEMBER)
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)

    confirm = member.get("/console/w/acme/clusters/alpha/stop/")
    cluster.refresh_from_db()
    assert confirm.status_code == 200 and cluster.status == ClusterStatus.RUNNING
    assert "Stop cluster alpha?" in html(confirm)

    done = post(member, "/console/w/acme/clusters/alpha/stop/")
    cluster.refresh_from_db()
    assert done.status_code == 302 and cluster.status == ClusterStatus.STOPPING
    assert AuditEvent.objects.get(action="cluster.stop").actor == member.user


def test_a_verb_the_status_does_not_allow_is_the_api_conflict_message(console: Console, ws: Workspace) -> None:
    member = console(Role.MEMBER)
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)

    response = post(member, "/console/w/acme/clusters/alpha/start/", follow=True)

    cluster.refresh_from_db()
    assert cluster.status == ClusterStatus.RUNNING
    assert "Cannot start cluster alpha while it is RUNNING." in html(response)


def test_terminate_moves_the_cluster_to_terminating(console: Console, ws: Workspace) -> None:
    member = console(Role.MEMBER)
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    post(member, "/console/w/acme/clusters/alpha/terminate/")
    cluster.refresh_from_db()
    assert cluster.status == ClusterStatus.TERMINATING


def test_the_list_shows_status_nodes_cost_and_age(console: Console, ws: Workspace) -> None:
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    NodeFactory(cluster=cluster, role=NodeRole.HEAD, name="head-1", state=NodeState.READY)
    NodeFactory(cluster=cluster, name="cpu-1", state=NodeState.READY)
    ClusterFactory(workspace=ws, name="old", status=ClusterStatus.TERMINATED)

    page = html(console(Role.VIEWER).get("/console/w/acme/clusters/"))
    everything = html(console(Role.VIEWER).get("/console/w/acme/clusters/?all=1"))

    assert 'data-cluster="alpha"' in page and 'data-status="RUNNING"' in page and "2 ready" in page
    assert "$0.0000" in page
    assert 'data-cluster="old"' not in page and 'data-cluster="old"' in everything


# --- jobs: the cluster's table, a job's page with its live log, stop -------------------------------------------

def test_the_detail_lists_the_clusters_newest_jobs_in_its_live_part(console: Console, ws: Workspace) -> None:
    # given a cluster with a finished and a running job, and a job on another cluster
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    ada = UserFactory(email="ada@example.com")
    now = timezone.now()
    done = make_job(cluster, status=JobStatus.SUCCEEDED, exit_code=0, entrypoint="python train.py --epochs 3",
                    created_by=ada, started_at=now - timedelta(minutes=5), finished_at=now - timedelta(minutes=2))
    running = make_job(cluster, status=JobStatus.RUNNING, entrypoint="python serve.py " + "x" * 200)
    Job.objects.filter(pk=done.pk).update(created_at=now - timedelta(minutes=6))
    make_job(ClusterFactory(workspace=ws, name="beta", status=ClusterStatus.RUNNING), entrypoint="python beta.py")
    viewer = console(Role.VIEWER)

    # when the page is opened, and when htmx polls its live part
    page = html(viewer.get("/console/w/acme/clusters/alpha/"))
    live = html(viewer.get("/console/w/acme/clusters/alpha/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="cluster-live"))

    # then both list this cluster's jobs, newest first, each linking to its page, with status, exit code and who
    for text in (page, live):
        rows = re.findall(r'<tr data-job="([0-9a-f-]+)">', text)
        assert rows == [str(running.pk), str(done.pk)]
        assert f'href="/console/w/acme/jobs/{done.pk}/"' in text and f"<code>{str(done.pk)[:8]}</code>" in text
        assert 'data-status="SUCCEEDED"' in text and 'data-status="RUNNING"' in text
        assert "python train.py --epochs 3" in text and "ada@example.com" in text and "3m 0s" in text
        assert re.search(r'title="python serve\.py x{200}">python serve\.py x{63}…</code>', text)  # cut short
        assert "python beta.py" not in text


def test_the_detail_shows_the_twenty_newest_jobs(console: Console, ws: Workspace) -> None:
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    jobs = [make_job(cluster, entrypoint=f"python job{i}.py") for i in range(21)]
    for i, job in enumerate(jobs):
        Job.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(minutes=30 - i))

    page = html(console(Role.VIEWER).get("/console/w/acme/clusters/alpha/"))

    assert len(re.findall(r"<tr data-job=", page)) == 20
    assert "the 20 newest of 21" in page and "python job20.py" in page and "python job0.py" not in page


def test_the_job_page_shows_its_facts_and_the_log_so_far_then_follows_it(console: Console, ws: Workspace) -> None:
    # given a running job with two lines of output
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    job = make_job(cluster, log=[b"step 1\n", b"step 2\n"], message="handed to the head's agent",
                   entrypoint="python main.py --fast", started_at=timezone.now())

    # when a viewer opens its page
    response = console(Role.VIEWER).get(f"/console/w/acme/jobs/{job.pk}/")
    page = html(response)

    # then it shows the status, message, cluster, entrypoint and snapshot, and the log so far in a live log view
    assert response.status_code == 200
    assert re.search(r'id="job-status" data-status="RUNNING">RUNNING<', page)
    assert "handed to the head&#x27;s agent" in page and 'href="/console/w/acme/clusters/alpha/"' in page
    assert "python main.py --fast" in page and str(job.snapshot_id) in page
    assert re.search(r'<pre id="job-log" class="log" role="log" aria-live="polite"[^>]*>step 1\nstep 2\n</pre>', page)
    # and it polls every second for what follows those 14 bytes
    assert 'hx-trigger="every 1s" hx-target="#job-log" hx-swap="beforeend"' in page
    assert next_poll(page) == (14, job_views._head_version(job))
    assert 'aria-current="page">Clusters<' in page


def test_a_log_that_starts_with_a_blank_line_keeps_it(console: Console, ws: Workspace) -> None:
    job = make_job(ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING), log=[b"\nafter\n"])
    page = html(console(Role.VIEWER).get(f"/console/w/acme/jobs/{job.pk}/"))
    assert re.search(r'<pre id="job-log"[^>]*>\n\nafter\n</pre>', page)  # the parser eats the first newline


def test_a_log_poll_returns_only_the_new_text_escaped(console: Console, ws: Workspace) -> None:
    # given a job whose log has grown past what the page showed, with markup in its output
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    job = make_job(cluster, log=[b"old line\n"])
    viewer = console(Role.VIEWER)
    offset, version = next_poll(html(viewer.get(f"/console/w/acme/jobs/{job.pk}/")))
    append_log(job, b"<script>alert('x')</script> & <b>done</b>\n")

    # when htmx polls from where the page ended
    text, rest = poll(viewer, job, offset, version)

    # then only the new bytes come back, as text, and the poller moves on to the log's end
    assert text == "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;done&lt;/b&gt;\n"
    assert html_lib.unescape(text) == "<script>alert('x')</script> & <b>done</b>\n"
    assert 'hx-swap-oob="true"' in rest and next_poll(rest) == (job.log_size, version)
    assert "<script" not in rest and 'id="job-head"' not in rest  # the header has not changed: not sent

    # and a poll with nothing new appends nothing
    assert poll(viewer, job, job.log_size, version)[0] == ""


def test_terminal_colour_codes_are_not_shown(console: Console, ws: Workspace) -> None:
    # given Ray's coloured "dashboard at" line in the log, then more of it later
    job = make_job(ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING),
                   log=[b"View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m\n"])
    viewer = console(Role.VIEWER)
    page_html = html(viewer.get(f"/console/w/acme/jobs/{job.pk}/"))
    offset, version = next_poll(page_html)
    append_log(job, b"\x1b[31mred\x1b[0m text\n")
    # then the page and each poll show the words without the escape codes
    assert "View the dashboard at http://127.0.0.1:8265 \n" in html_lib.unescape(page_html)
    assert "\x1b" not in page_html
    assert poll(viewer, job, offset, version)[0] == "red text\n"


def test_a_log_poll_never_splits_a_character(console: Console, ws: Workspace,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # given a log of multi-byte characters, stored in chunks that split one, read three bytes a poll
    text = "héllo wörld ✓ ünïcode\n"
    raw = text.encode()
    job = make_job(ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING),
                   log=[raw[:2], raw[2:13], raw[13:]])
    monkeypatch.setattr(job_views, "LOG_POLL_BYTES", 3)  # at least one whole character: "✓" has three bytes
    viewer = console(Role.VIEWER)

    # when it is polled until the poller reaches the end
    offset, pieces = 0, []
    while offset < len(raw):
        piece, rest = poll(viewer, job, offset)
        pieces.append(html_lib.unescape(piece))
        offset = next_poll(rest)[0]  # type: ignore[index]

    # then every piece is whole characters, and together they are the log
    assert "".join(pieces) == text and all("\ufffd" not in p and p for p in pieces)


def test_the_header_comes_with_a_poll_once_it_changed_and_polling_stops_at_the_end(console: Console,
                                                                                   ws: Workspace) -> None:
    # given an open job page, then the job finishes with its last line
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    job = make_job(cluster, log=[b"working\n"], started_at=timezone.now())
    viewer = console(Role.VIEWER)
    offset, version = next_poll(html(viewer.get(f"/console/w/acme/jobs/{job.pk}/")))
    append_log(job, b"finished\n")
    Job.objects.filter(pk=job.pk).update(status=JobStatus.SUCCEEDED, exit_code=0, finished_at=timezone.now())

    # when htmx polls
    text, rest = poll(viewer, job, offset, version)

    # then the new line, the new header (out of band) and a poller that has stopped come back
    assert text == "finished\n"
    assert re.search(r'<div id="job-head" hx-swap-oob="true">', rest)
    assert 'data-status="SUCCEEDED"' in rest and re.search(r'id="job-exit-code">0<', rest)
    assert next_poll(rest) is None and "hx-get" not in rest and "End of the log." in rest
    # and the page opened now does not poll at all
    page = html(viewer.get(f"/console/w/acme/jobs/{job.pk}/"))
    assert 'hx-trigger="every 1s"' not in page and "working\nfinished\n</pre>" in page


def test_a_finished_job_whose_log_is_not_all_read_keeps_polling(console: Console, ws: Workspace,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING),
                   log=[b"0123456789"], status=JobStatus.FAILED, exit_code=1)
    monkeypatch.setattr(job_views, "LOG_POLL_BYTES", 4)
    viewer = console(Role.VIEWER)

    text, rest = poll(viewer, job, 0)
    assert text == "0123" and next_poll(rest) is not None
    text, rest = poll(viewer, job, 8)
    assert text == "89" and next_poll(rest) is None


def test_a_long_log_opens_at_its_last_mebibyte_with_a_note(console: Console, ws: Workspace) -> None:
    # given a finished job with 1.5 MB of output
    line = b"x" * 99 + b"\n"
    job = make_job(ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING),
                   log=[line * 15_000, b"the last line\n"], status=JobStatus.SUCCEEDED, exit_code=0)

    page = html(console(Role.VIEWER).get(f"/console/w/acme/jobs/{job.pk}/"))

    # then the page holds its last MiB at most, from a line's start, and says so
    shown = re.search(r'<pre id="job-log"[^>]*>(.*?)</pre>', page, re.S)[1]  # type: ignore[index]
    assert len(shown.encode()) <= 1024 * 1024 and shown.startswith(line.decode())
    assert shown.endswith("the last line\n") and shown.count("\n") == len(shown.encode()) // 100 + 1
    assert re.search(r"Showing the last 1.0\xa0MB of 1.4\xa0MB", page)
    assert f"cloudctl logs {str(job.pk)[:8]}" in page


def test_a_bad_offset_is_400(console: Console, ws: Workspace) -> None:
    job = make_job(ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING))
    viewer = console(Role.VIEWER)
    for offset in ("-1", "ten", "²", "9" * 19):
        assert viewer.get(f"/console/w/acme/jobs/{job.pk}/log/", {"offset": offset}, **HX).status_code == 400


def test_a_job_of_another_workspace_or_of_none_is_404_in_mine(console: Console, ws: Workspace) -> None:
    # given a member of acme, and a job in bravo
    member = console(Role.MEMBER)
    bravo = WorkspaceFactory(slug="bravo")
    MembershipFactory(workspace=bravo, role=Role.OWNER)
    theirs = make_job(ClusterFactory(workspace=bravo, name="alpha", status=ClusterStatus.RUNNING),
                      log=[b"their output\n"])

    # when bravo's job, or a job that does not exist, is asked for under acme
    for job_id in (theirs.pk, uuid.uuid4()):
        for suffix in ("", "log/?offset=0", "stop/"):
            response = member.get(f"/console/w/acme/jobs/{job_id}/{suffix}")
            assert response.status_code == 404, (job_id, suffix)
            assert "their output" not in html(response)
        assert post(member, f"/console/w/acme/jobs/{job_id}/stop/").status_code == 404

    # then it was not there, as over the API, and it was not stopped
    assert api_for(member.user).get(f"workspaces/acme/jobs/{theirs.pk}/").status_code == 404
    theirs.refresh_from_db()
    assert (theirs.status, theirs.stop_requested_at) == (JobStatus.RUNNING, None)


def test_a_viewer_sees_no_stop_and_a_forged_stop_post_is_403(console: Console, ws: Workspace) -> None:
    viewer = console(Role.VIEWER)
    job = make_job(ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING))

    page = html(viewer.get(f"/console/w/acme/jobs/{job.pk}/"))
    confirm = viewer.get(f"/console/w/acme/jobs/{job.pk}/stop/")
    forged = post(viewer, f"/console/w/acme/jobs/{job.pk}/stop/")

    assert f"/jobs/{job.pk}/stop/" not in page and 'id="job-stop"' not in page
    assert confirm.status_code == 403 and forged.status_code == 403 and "viewer" in html(forged)
    assert api_for(viewer.user).post(f"workspaces/acme/jobs/{job.pk}/stop/").status_code == 403  # as the API says
    job.refresh_from_db()
    assert (job.status, job.stop_requested_at) == (JobStatus.RUNNING, None)
    assert not AuditEvent.objects.filter(action="job.stop").exists()


def test_a_member_stops_a_job_after_confirming(console: Console, ws: Workspace) -> None:
    # given a job that waits for the head, and one that the head runs
    member = console(Role.MEMBER)
    cluster = ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    waiting = make_job(cluster, status=JobStatus.PENDING)
    head = NodeFactory(cluster=cluster, role=NodeRole.HEAD, name="head-1", state=NodeState.READY)
    running = make_job(cluster, node=head)

    # when Stop is chosen on the waiting job's page, then the console asks first
    page = html(member.get(f"/console/w/acme/jobs/{waiting.pk}/"))
    assert f'href="/console/w/acme/jobs/{waiting.pk}/stop/"' in page
    confirm = member.get(f"/console/w/acme/jobs/{waiting.pk}/stop/")
    waiting.refresh_from_db()
    assert confirm.status_code == 200 and waiting.status == JobStatus.PENDING
    assert f"Stop job {str(waiting.pk)[:8]} (python main.py) on cluster alpha?" in html(confirm)

    # and once confirmed, the service stops it at once: no head has it yet
    done = post(member, f"/console/w/acme/jobs/{waiting.pk}/stop/", follow=True)
    waiting.refresh_from_db()
    assert waiting.status == JobStatus.STOPPED and f"Job {str(waiting.pk)[:8]} is stopped." in html(done)
    assert AuditEvent.objects.get(action="job.stop", target_id=str(waiting.pk)).actor == member.user

    # and a running job is stopped by its head: the page says it was asked for, and offers Stop no more
    stopping = post(member, f"/console/w/acme/jobs/{running.pk}/stop/", follow=True)
    running.refresh_from_db()
    assert running.status == JobStatus.RUNNING and running.stop_requested_at is not None
    assert "is stopping." in html(stopping) and "Stop requested at" in html(stopping)
    assert 'id="job-stop"' not in html(stopping)


def test_stopping_a_finished_job_is_the_api_conflict_message(console: Console, ws: Workspace) -> None:
    member = console(Role.MEMBER)
    job = make_job(ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING),
                   status=JobStatus.SUCCEEDED, exit_code=0)

    page = html(member.get(f"/console/w/acme/jobs/{job.pk}/"))
    response = post(member, f"/console/w/acme/jobs/{job.pk}/stop/", follow=True)
    api = api_for(member.user).post(f"workspaces/acme/jobs/{job.pk}/stop/")

    assert 'id="job-stop"' not in page
    assert api.status_code == 409
    assert html_lib.escape(api.json()["error"]["message"]) in html(response)
    assert f"Job {job.pk} has already finished (SUCCEEDED)." in html(response)
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED


# --- members, tokens, audit -----------------------------------------------------------------------------------

def test_an_admin_adds_an_existing_user_and_changes_roles(console: Console, ws: Workspace) -> None:
    admin = console(Role.ADMIN)
    newcomer = UserFactory(email="grace@example.com")

    added = post(admin, "/console/w/acme/members/", {"email": "grace@example.com", "role": "viewer"})
    changed = post(admin, f"/console/w/acme/members/{newcomer.pk}/role/", {"role": "member"})

    assert added.status_code == 302 and changed.status_code == 302
    assert Membership.objects.get(workspace=ws, user=newcomer).role == Role.MEMBER
    assert list(AuditEvent.objects.filter(workspace=ws).values_list("action", flat=True).order_by("id")) == [
        "member.add", "member.role"]


def test_adding_an_unknown_address_or_a_member_again_is_an_error_beside_the_email(console: Console,
                                                                                    ws: Workspace) -> None:
    admin = console(Role.ADMIN)

    unknown = post(admin, "/console/w/acme/members/", {"email": "nobody@example.com", "role": "member"})
    again = post(admin, "/console/w/acme/members/", {"email": admin.user.email, "role": "member"})
    bad = post(admin, "/console/w/acme/members/", {"email": "not-an-address", "role": "member"})

    assert unknown.status_code == 400 and "No account uses this address" in html(unknown)
    assert again.status_code == 409 and "is already a member of this workspace." in html(again)
    assert bad.status_code == 400 and re.search(r'id="invite-email-errors"><li>Enter a valid email address.', html(bad))


def test_only_an_owner_grants_the_owner_role(console: Console, ws: Workspace) -> None:
    admin = console(Role.ADMIN)
    other = MembershipFactory(workspace=ws, role=Role.MEMBER)

    page = html(admin.get("/console/w/acme/members/"))
    forged = post(admin, f"/console/w/acme/members/{other.user_id}/role/", {"role": "owner"})

    assert '<option value="owner"' not in page
    assert forged.status_code == 403
    assert Membership.objects.get(pk=other.pk).role == Role.MEMBER


def test_members_and_viewers_manage_no_one(console: Console, ws: Workspace) -> None:
    for role in (Role.MEMBER, Role.VIEWER):
        client = console(role)
        UserFactory(email=f"x-{role}@example.com")
        assert "Add member" not in html(client.get("/console/w/acme/members/"))
        forged = post(client, "/console/w/acme/members/", {"email": f"x-{role}@example.com", "role": "viewer"})
        assert forged.status_code == 403
    assert not Membership.objects.filter(user__email__startswith="x-").exists()


def test_the_last_owner_cannot_step_down(console: Console, ws: Workspace) -> None:
    owner = console(Role.OWNER)
    response = post(owner, f"/console/w/acme/members/{owner.user.pk}/role/", {"role": "admin"}, follow=True)
    assert "A workspace needs at least one owner." in html(response)
    assert Membership.objects.get(workspace=ws, user=owner.user).role == Role.OWNER


def test_a_token_is_shown_once_and_can_be_revoked(console: Console) -> None:
    client = console(Role.VIEWER)  # tokens are one's own, whatever the role

    created = post(client, "/console/tokens/", {"name": "laptop", "expires_in_days": "30"})
    raw = re.search(r'id="new-token" class="token" value="(cu_[^"]+)"', html(created))
    listing = html(client.get("/console/tokens/"))

    assert created.status_code == 201 and raw
    assert "no-store" in created["Cache-Control"]
    token = ApiToken.objects.get(user=client.user, name="laptop")
    assert token.matches(raw[1]) and token.expires_at is not None
    assert raw[1] not in listing and f"cu_…{token.last_four}" in listing

    revoked = post(client, f"/console/tokens/{token.pk}/revoke/")
    token.refresh_from_db()
    assert revoked.status_code == 302 and token.revoked_at is not None


def test_a_bad_token_form_shows_the_api_messages(console: Console) -> None:
    client = console(Role.MEMBER)
    response = post(client, "/console/tokens/", {"name": "", "expires_in_days": "0"})
    page = html(response)
    assert response.status_code == 400
    assert re.search(r'id="token-name-errors"><li>This field may not be blank.', page)
    assert re.search(r'id="token-expiry-errors"><li>Ensure this value is greater than or equal to 1.', page)


def test_another_users_token_is_404(console: Console) -> None:
    client = console(Role.OWNER)
    theirs, _ = token_create(user=UserFactory(), name="theirs")
    assert client.get(f"/console/tokens/{theirs.pk}/revoke/").status_code == 404
    assert post(client, f"/console/tokens/{theirs.pk}/revoke/").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


def test_the_audit_log_is_for_admins(console: Console, ws: Workspace) -> None:
    admin = console(Role.ADMIN)
    ClusterFactory(workspace=ws, name="alpha", status=ClusterStatus.RUNNING)
    post(console(Role.MEMBER), "/console/w/acme/clusters/alpha/stop/")

    page = html(admin.get("/console/w/acme/audit/"))

    assert "cluster.stop" in page and "alpha" in page
    assert console(Role.MEMBER).get("/console/w/acme/audit/").status_code == 403
    assert "Audit log" not in html(console(Role.VIEWER).get("/console/w/acme/clusters/"))


def test_static_files_are_ours(console: Console) -> None:
    page = html(console(Role.VIEWER).get("/console/w/acme/clusters/"))
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', page)
    styles = re.findall(r'<link[^>]*href="([^"]+)"', page)
    assert scripts and all(s.startswith("/static/") for s in scripts + styles), scripts + styles
