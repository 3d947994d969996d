"""Jobs over the public API and the agent API: submit, hand-over to the head, reports, logs by offset, stop."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest

from clusters.choices import ClusterStatus as C
from clusters.choices import EventKind, NodeRole
from clusters.choices import JobStatus as J
from clusters.choices import NodeState as N
from clusters.jobs import job_log_read, settle_jobs
from clusters.models import Cluster, ClusterEvent, Job, JobLogChunk, Node
from clusters.reconciler import bootstrap_token_for
from controlplane.choices import Role
from controlplane.models import AuditEvent, Workspace
from controlplane.services import Actor
from projects.services import blob_upload, blobs_upload_batch, snapshot_create, snapshot_record
from tests.conftest import Api
from tests.factories import ClusterFactory, NodeFactory, WorkspaceFactory

pytestmark = pytest.mark.django_db

MAIN = b"import helper\nprint(helper.greet())\n"
HELPER = b"def greet():\n    return 'hi'\n"


@pytest.fixture(autouse=True)
def blob_dir(settings, tmp_path):
    settings.CUMULUS_BLOB_DIR = str(tmp_path / "blobs")


def make_snapshot(workspace: Workspace) -> str:
    files = []
    for path, data, mode in (("main.py", MAIN, 0o644), ("helper.py", HELPER, 0o755)):
        digest = hashlib.sha256(data).hexdigest()
        blob_upload(workspace=workspace, sha256=digest, chunks=[data], actor=Actor(user=None))
        files.append({"path": path, "sha256": digest, "size": len(data), "mode": mode})
    return str(snapshot_create(workspace=workspace, files=files, actor=Actor(user=None)).pk)


class AgentApi:
    """One node's side of the agent API, with its real node token."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.api = Api()
        response = self.api.post("/api/agent/v1/register", {"bootstrap_token": bootstrap_token_for(node.key)})
        assert response.status_code == 200, response.content
        self.api.client.credentials(HTTP_AUTHORIZATION=f"Bearer {response.json()['node_token']}")

    def beat(self, state: str = "ready"):
        response = self.api.post(f"/api/agent/v1/nodes/{self.node.key}/heartbeat", {"state": state})
        assert response.status_code == 200, response.content
        return response.json()

    def jobs(self) -> list[dict]:
        return [c["job"] for c in self.beat()["commands"] if c["type"] == "run_job"]

    def report(self, job_id: str, **body):
        if "log" in body:
            offset, data = body.pop("log")
            body.update(log_offset=offset, log_data=base64.b64encode(data).decode())
        return self.api.post(f"/api/agent/v1/nodes/{self.node.key}/jobs/{job_id}/report", body)


@pytest.fixture
def cluster(workspace: Workspace) -> Cluster:
    cluster = ClusterFactory(workspace=workspace, name="train", status=C.RUNNING, groups=[],
                             runtime={"pip": ["numpy"], "env": {"STAGE": "cluster", "SHARED": "cluster"}})
    return cluster


@pytest.fixture
def head(cluster: Cluster) -> AgentApi:
    node = NodeFactory(cluster=cluster, role=NodeRole.HEAD, state=N.PROVISIONING)
    agent = AgentApi(node)
    Node.objects.filter(pk=node.pk).update(state=N.READY)
    node.refresh_from_db()
    return agent


def submit(api: Api, cluster: Cluster, snapshot: str, entrypoint: str = "python main.py", **extra):
    return api.post(f"workspaces/{cluster.workspace.slug}/clusters/{cluster.name}/jobs/",
                    {"snapshot": snapshot, "entrypoint": entrypoint, **extra})


# --- submitting ------------------------------------------------------------------------------------


def test_a_job_is_submitted_pending_with_an_event_and_an_audit_row(api: Api, cluster: Cluster):
    snapshot = make_snapshot(cluster.workspace)
    response = submit(api, cluster, snapshot, env={"SHARED": "job"}, pip=["rich"])
    assert response.status_code == 201, response.content
    job = response.json()
    assert (job["status"], job["cluster"], job["snapshot"], job["finished"]) == ("PENDING", "train", snapshot, False)
    assert job["env"] == {"SHARED": "job"} and job["pip"] == ["rich"]
    assert ClusterEvent.objects.filter(cluster=cluster, kind=EventKind.JOB_SUBMITTED).count() == 1
    assert AuditEvent.objects.filter(action="job.submit", target_id=job["id"]).exists()
    # and: the same job under the cluster and by id under the workspace
    ws = cluster.workspace.slug
    assert api.get(f"workspaces/{ws}/clusters/train/jobs/{job['id']}/").json()["id"] == job["id"]
    assert api.get(f"workspaces/{ws}/jobs/{job['id']}/").json()["id"] == job["id"]
    assert [j["id"] for j in api.get(f"workspaces/{ws}/jobs/?cluster=train").json()["results"]] == [job["id"]]


@pytest.mark.parametrize("status", [C.STOPPED, C.STOPPING, C.TERMINATED, C.FAILED])
def test_a_job_for_a_cluster_that_is_not_live_is_409_saying_so(api: Api, cluster: Cluster, status: str):
    snapshot = make_snapshot(cluster.workspace)
    Cluster.objects.filter(pk=cluster.pk).update(status=status)
    response = submit(api, cluster, snapshot)
    assert response.status_code == 409, response.content
    assert f"is {status}" in response.json()["error"]["message"]
    assert not Job.objects.exists()


def test_a_job_may_wait_for_a_cluster_that_is_still_starting(api: Api, cluster: Cluster):
    Cluster.objects.filter(pk=cluster.pk).update(status=C.PROVISIONING)
    assert submit(api, cluster, make_snapshot(cluster.workspace)).status_code == 201


def test_bad_job_input_is_400_with_fields(api: Api, cluster: Cluster):
    other = make_snapshot(WorkspaceFactory())  # a real snapshot, of another workspace
    cases = [
        ({"snapshot": other, "entrypoint": "python main.py"}, "snapshot"),
        ({"snapshot": "6f1c0a4e-2b1d-4a8e-9a53-1f0c2d3e4b5a", "entrypoint": "x"}, "snapshot"),
        ({"snapshot": "not-a-uuid", "entrypoint": "x"}, "snapshot"),
        ({"snapshot": other, "entrypoint": "   "}, "entrypoint"),
        ({"snapshot": other, "entrypoint": 42}, "entrypoint"),
        ({"snapshot": other, "entrypoint": "x", "env": {"1BAD": "v"}}, "env"),
        ({"snapshot": other, "entrypoint": "x", "env": {"K": 1}}, "env"),
        ({"snapshot": other, "entrypoint": "x", "pip": "numpy"}, "pip"),
        ({"snapshot": other, "entrypoint": "x", "surprise": 1}, "surprise"),
    ]
    for body, field in cases:
        response = api.post(f"workspaces/{cluster.workspace.slug}/clusters/train/jobs/", body)
        assert response.status_code == 400, (body, response.content)
        assert field in response.json()["error"]["fields"], (body, response.json())
    assert not Job.objects.exists()


def test_an_unknown_job_or_cluster_is_404(api: Api, cluster: Cluster):
    ws = cluster.workspace.slug
    missing = "6f1c0a4e-2b1d-4a8e-9a53-1f0c2d3e4b5a"
    assert api.get(f"workspaces/{ws}/jobs/{missing}/").status_code == 404
    assert api.get(f"workspaces/{ws}/jobs/{missing}/logs").status_code == 404
    assert api.post(f"workspaces/{ws}/jobs/{missing}/stop").status_code == 404
    assert submit(api, Cluster(workspace=cluster.workspace, name="nope"), make_snapshot(cluster.workspace)
                  ).status_code == 404


def test_a_viewer_sees_jobs_but_cannot_submit_or_stop(cluster: Cluster, member_api, api: Api):
    job = submit(api, cluster, make_snapshot(cluster.workspace)).json()
    viewer = member_api(cluster.workspace, Role.VIEWER)
    assert viewer.get(f"workspaces/{cluster.workspace.slug}/jobs/{job['id']}/logs").status_code == 200
    assert submit(viewer, cluster, job["snapshot"]).status_code == 403
    assert viewer.post(f"workspaces/{cluster.workspace.slug}/jobs/{job['id']}/stop").status_code == 403


# --- hand-over and reports ----------------------------------------------------------------------------


def test_the_ready_head_gets_every_unfinished_job_with_the_runtime_merged(api: Api, cluster: Cluster,
                                                                           head: AgentApi):
    job = submit(api, cluster, make_snapshot(cluster.workspace), env={"SHARED": "job"}, pip=["rich", "numpy"]).json()
    # when
    commands = head.jobs()
    # then: the job, with the cluster's env and pip under the job's own
    assert [c["id"] for c in commands] == [job["id"]]
    command = commands[0]
    assert command["env"] == {"STAGE": "cluster", "SHARED": "job"}
    assert command["pip"] == ["numpy", "rich"]
    assert (command["status"], command["log_offset"], command["stop"]) == ("PENDING", 0, False)
    assert Job.objects.get(pk=job["id"]).node_id == head.node.pk
    # and: again on the next heartbeat (level-triggered), but never to a worker
    assert [c["id"] for c in head.jobs()] == [job["id"]]
    worker = AgentApi(NodeFactory(cluster=cluster, role=NodeRole.WORKER, state=N.PROVISIONING))
    Node.objects.filter(pk=worker.node.pk).update(state=N.READY)
    assert worker.jobs() == []


def test_reports_move_the_job_and_append_the_log_by_offset(api: Api, cluster: Cluster, head: AgentApi):
    job_id = submit(api, cluster, make_snapshot(cluster.workspace)).json()["id"]
    head.jobs()
    # when: the agent reports progress, then output in two chunks, one of them sent twice
    assert head.report(job_id, message="fetching 2 of 2 files").json()["log_offset"] == 0
    assert head.report(job_id, status="RUNNING", log=(0, b"hello\n")).json()["log_offset"] == 6
    assert head.report(job_id, log=(0, b"hello\n")).json()["log_offset"] == 6  # a retry: stored once
    assert head.report(job_id, log=(3, b"lo\nworld\n")).json()["log_offset"] == 12  # overlapping: the new part
    gap = head.report(job_id, log=(50, b"later"))  # a gap is never written: resend from 12
    assert gap.json()["log_offset"] == 12
    final = head.report(job_id, status="FAILED", exit_code=3, message="exit code 3").json()
    # then
    assert final == {"log_offset": 12, "stop": True, "status": "FAILED"}
    job = Job.objects.get(pk=job_id)
    assert (job.status, job.exit_code, job.log_size) == (J.FAILED, 3, 12)
    assert job.started_at is not None and job.finished_at is not None
    assert job_log_read(job, 0).data == b"hello\nworld\n"
    events = list(ClusterEvent.objects.filter(cluster=cluster, kind=EventKind.JOB_STATUS).values_list("message",
                                                                                                        flat=True))
    assert any("RUNNING → FAILED (exit code 3)" in e for e in events)
    # and: a finished job is no longer handed out
    assert head.jobs() == []


def test_logs_are_read_from_an_offset_and_never_split_a_character(api: Api, cluster: Cluster, head: AgentApi):
    job_id = submit(api, cluster, make_snapshot(cluster.workspace)).json()["id"]
    head.jobs()
    text = "température ✓ done\n".encode()
    head.report(job_id, status="RUNNING", log=(0, text[:5]))
    head.report(job_id, log=(5, text[5:]))
    logs = f"workspaces/{cluster.workspace.slug}/jobs/{job_id}/logs"
    # when: a slice ends inside "é" (2 bytes, offsets 4 and 5)
    first = api.get(f"{logs}?offset=0&limit=5").json()
    assert (first["data"], first["next_offset"], first["size"], first["complete"]) == ("temp", 4, len(text), False)
    rest = api.get(f"{logs}?offset={first['next_offset']}").json()
    assert first["data"] + rest["data"] == text.decode() and rest["next_offset"] == len(text)
    assert rest["complete"] is False and rest["status"] == "RUNNING"
    # then: once the job is over and the end is read, the log is complete
    head.report(job_id, status="SUCCEEDED", exit_code=0)
    assert api.get(f"{logs}?offset={len(text)}").json()["complete"] is True
    assert api.get(f"{logs}?offset=0").json()["complete"] is True
    # and: a bad offset is a 400
    for bad in ("-1", "abc", "1.5"):
        assert api.get(f"{logs}?offset={bad}").status_code == 400


def test_a_log_past_the_limit_is_cut_with_a_note(api: Api, cluster: Cluster, head: AgentApi, settings):
    settings.CUMULUS_JOB_LOG_MAX_BYTES = 10
    job_id = submit(api, cluster, make_snapshot(cluster.workspace)).json()["id"]
    head.jobs()
    assert head.report(job_id, log=(0, b"0123456789abcdef")).json()["log_offset"] == 16  # the sender moves on
    assert head.report(job_id, log=(16, b"more")).json()["log_offset"] >= 16
    data = job_log_read(Job.objects.get(pk=job_id), 0).data
    assert data.startswith(b"0123456789\n[cumulus: the log passed 10 bytes")
    assert Job.objects.get(pk=job_id).log_truncated


def test_stop_before_the_head_has_it_is_immediate(api: Api, cluster: Cluster):
    job_id = submit(api, cluster, make_snapshot(cluster.workspace)).json()["id"]
    response = api.post(f"workspaces/{cluster.workspace.slug}/jobs/{job_id}/stop")
    assert response.status_code == 202 and response.json()["status"] == "STOPPED"
    again = api.post(f"workspaces/{cluster.workspace.slug}/jobs/{job_id}/stop")
    assert again.status_code == 409 and "already finished (STOPPED)" in again.json()["error"]["message"]


def test_stop_of_a_running_job_goes_to_the_head(api: Api, cluster: Cluster, head: AgentApi):
    job_id = submit(api, cluster, make_snapshot(cluster.workspace)).json()["id"]
    head.jobs()
    head.report(job_id, status="RUNNING")
    response = api.post(f"workspaces/{cluster.workspace.slug}/clusters/train/jobs/{job_id}/stop")
    assert response.status_code == 202 and response.json()["status"] == "RUNNING"
    assert head.jobs()[0]["stop"] is True
    assert head.report(job_id, log=(0, b"bye\n")).json()["stop"] is True
    head.report(job_id, status="STOPPED", message="stopped")
    assert Job.objects.get(pk=job_id).status == J.STOPPED


def test_jobs_end_with_their_cluster_or_their_head(api: Api, cluster: Cluster, head: AgentApi):
    snapshot = make_snapshot(cluster.workspace)
    running = submit(api, cluster, snapshot).json()["id"]
    head.jobs()
    head.report(running, status="RUNNING")
    # when: the head is lost
    Node.objects.filter(pk=head.node.pk).update(state=N.LOST)
    assert settle_jobs(Cluster.objects.get(pk=cluster.pk)) == 1
    job = Job.objects.get(pk=running)
    assert job.status == J.FAILED and "is LOST" in job.message
    # when: the cluster is stopped with a job still waiting for a head
    waiting = submit(api, cluster, snapshot).json()["id"]
    Cluster.objects.filter(pk=cluster.pk).update(status=C.STOPPED)
    settle_jobs(Cluster.objects.get(pk=cluster.pk))
    assert Job.objects.get(pk=waiting).status == J.STOPPED


# --- what a node may read ----------------------------------------------------------------------------


def test_the_manifest_of_a_layered_snapshot_is_the_whole_tree(api: Api, cluster: Cluster, head: AgentApi):
    base = make_snapshot(cluster.workspace)
    extra = b"print('extra')\n"
    blob_upload(workspace=cluster.workspace, sha256=hashlib.sha256(extra).hexdigest(), chunks=[extra],
                actor=Actor(user=None))
    layer, _ = snapshot_record(workspace=cluster.workspace, actor=Actor(user=None), base=base, removed=["helper.py"],
                               changes=[{"path": "extra.py", "sha256": hashlib.sha256(extra).hexdigest(),
                                         "size": len(extra), "mode": 0o644}])
    assert layer.root_id is not None
    job_id = submit(api, cluster, str(layer.pk)).json()["id"]
    head.jobs()
    manifest = head.api.get(f"/api/agent/v1/nodes/{head.node.key}/jobs/{job_id}/manifest").json()
    assert manifest["files"] == [["extra.py", hashlib.sha256(extra).hexdigest(), len(extra), 0o644],
                                 ["main.py", hashlib.sha256(MAIN).hexdigest(), len(MAIN), 0o644]]


def test_the_head_reads_a_blob_kept_in_a_pack(api: Api, cluster: Cluster, head: AgentApi):
    small = [b"print('one')\n", b"", b"print('three')\n"]
    bundle = b"".join(f"{hashlib.sha256(b).hexdigest()}{len(b):016x}".encode() + b for b in small)
    blobs_upload_batch(workspace=cluster.workspace, stream=io.BytesIO(bundle), actor=Actor(user=None))
    for data in small:
        blob = head.api.get(f"/api/agent/v1/nodes/{head.node.key}/blobs/{hashlib.sha256(data).hexdigest()}")
        assert blob.status_code == 200 and blob["Content-Length"] == str(len(data))
        assert b"".join(blob.streaming_content) == data


def test_the_head_reads_its_jobs_manifest_and_blobs_and_nothing_else(api: Api, cluster: Cluster, head: AgentApi):
    job_id = submit(api, cluster, make_snapshot(cluster.workspace)).json()["id"]
    head.jobs()
    manifest = head.api.get(f"/api/agent/v1/nodes/{head.node.key}/jobs/{job_id}/manifest").json()
    assert manifest["files"] == [["helper.py", hashlib.sha256(HELPER).hexdigest(), len(HELPER), 0o755],
                                 ["main.py", hashlib.sha256(MAIN).hexdigest(), len(MAIN), 0o644]]
    blob = head.api.get(f"/api/agent/v1/nodes/{head.node.key}/blobs/{hashlib.sha256(MAIN).hexdigest()}")
    assert blob.status_code == 200 and b"".join(blob.streaming_content) == MAIN
    # another workspace's blob, another cluster's job, another node's URL
    other_ws = WorkspaceFactory()
    make_snapshot(other_ws)
    secret = b"other"
    blob_upload(workspace=other_ws, sha256=hashlib.sha256(secret).hexdigest(), chunks=[secret], actor=Actor(user=None))
    assert head.api.get(f"/api/agent/v1/nodes/{head.node.key}/blobs/{hashlib.sha256(secret).hexdigest()}"
                        ).status_code == 404
    other_cluster = ClusterFactory(workspace=other_ws, status=C.RUNNING, groups=[])
    other_job = Job.objects.create(workspace=other_ws, cluster=other_cluster, snapshot_id=make_snapshot(other_ws),
                                   entrypoint="x")
    assert head.api.get(f"/api/agent/v1/nodes/{head.node.key}/jobs/{other_job.pk}/manifest").status_code == 404
    assert head.report(str(other_job.pk), status="FAILED").status_code == 404
    worker = NodeFactory(cluster=cluster, role=NodeRole.WORKER, state=N.READY)
    assert head.api.get(f"/api/agent/v1/nodes/{worker.key}/jobs/{job_id}/manifest").status_code == 403
    assert Api().get(f"/api/agent/v1/nodes/{head.node.key}/jobs/{job_id}/manifest").status_code == 401
    assert JobLogChunk.objects.count() == 0


def test_bad_reports_are_400(api: Api, cluster: Cluster, head: AgentApi):
    job_id = submit(api, cluster, make_snapshot(cluster.workspace)).json()["id"]
    head.jobs()
    url = f"/api/agent/v1/nodes/{head.node.key}/jobs/{job_id}/report"
    for body in ({"status": "DONE"}, {"log_offset": -1, "log_data": ""}, {"log_offset": 0, "log_data": "@@@"},
                 {"exit_code": "1"}, {"unknown": True}, []):
        assert head.api.post(url, body).status_code == 400, body
    assert Job.objects.get(pk=job_id).status == J.PENDING


def test_a_workspace_whose_terminated_cluster_ran_jobs_can_be_deleted(api: Api, cluster: Cluster):
    from controlplane.services import workspace_delete
    from projects.models import Blob, Snapshot

    workspace, workspace_id = cluster.workspace, cluster.workspace_id
    job_id = submit(api, cluster, make_snapshot(workspace)).json()["id"]
    Cluster.objects.filter(pk=cluster.pk).update(status=C.TERMINATED)
    workspace_delete(workspace=workspace, actor=Actor(user=None))
    assert not Job.objects.filter(pk=job_id).exists()
    assert not Snapshot.objects.filter(workspace_id=workspace_id).exists()
    assert not Blob.objects.filter(workspace_id=workspace_id).exists()
    assert not Workspace.objects.filter(pk=workspace_id).exists()
