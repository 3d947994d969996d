"""Blobs and snapshots over the API: content-addressed, verified, per workspace.

Tests that store bytes take the `store` fixture and so run against both blob stores: the local
folder and S3 (moto's server on loopback); `store` looks at what each really holds.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest

from controlplane.choices import Role
from controlplane.models import AuditEvent, Workspace
from projects.models import Blob, Snapshot, SnapshotFile
from tests.conftest import Api, api_for
from tests.factories import MembershipFactory, WorkspaceFactory
from tests.projects.conftest import StoreProbe

pytestmark = pytest.mark.django_db


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(api: Api, ws: str, data: bytes, digest: str | None = None, **extra):
    return api.client.put(f"/api/v1/workspaces/{ws}/blobs/{digest or sha(data)}", data=data,
                          content_type="application/octet-stream", **extra)


def entry(path: str, data: bytes, mode: int = 0o644) -> dict:
    return {"path": path, "sha256": sha(data), "size": len(data), "mode": mode}


def test_upload_then_missing_round_trip(api: Api, workspace: Workspace, store: StoreProbe):
    a, b = b"print('hello')\n", b"import os\n"
    base = f"workspaces/{workspace.slug}/blobs/missing"
    assert api.post(base, {"sha256": [sha(a), sha(b), sha(a)]}).json() == {"missing": [sha(a), sha(b)]}
    uploaded = put_blob(api, workspace.slug, a)
    assert uploaded.status_code == 201, uploaded.content
    assert uploaded.json() == {"sha256": sha(a), "size": len(a), "created": True}
    assert api.post(base, {"sha256": [sha(a), sha(b)]}).json() == {"missing": [sha(b)]}
    assert store.read(f"{workspace.pk}/{sha(a)[:2]}/{sha(a)}") == a
    fetched = api.get(f"workspaces/{workspace.slug}/blobs/{sha(a)}")
    assert fetched.status_code == 200
    assert fetched["Content-Type"] == "application/octet-stream"
    assert b"".join(fetched.streaming_content) == a
    assert AuditEvent.objects.filter(workspace=workspace, action="blob.upload", target_id=sha(a)).count() == 1


def test_the_same_blob_twice_is_stored_once(api: Api, workspace: Workspace, store: StoreProbe):
    data = b"x" * 3_000_000  # several chunks
    assert put_blob(api, workspace.slug, data).status_code == 201
    again = put_blob(api, workspace.slug, data)
    assert again.status_code == 200 and again.json()["created"] is False
    assert Blob.objects.filter(workspace=workspace).count() == 1
    assert len(store.contents()) == 1


def test_an_empty_blob_is_a_blob(api: Api, workspace: Workspace, store: StoreProbe):
    assert put_blob(api, workspace.slug, b"").status_code == 201
    assert Blob.objects.get(workspace=workspace).size == 0
    assert store.read(f"{workspace.pk}/{sha(b'')[:2]}/{sha(b'')}") == b""
    fetched = api.get(f"workspaces/{workspace.slug}/blobs/{sha(b'')}")
    assert fetched.status_code == 200 and b"".join(fetched.streaming_content) == b""


def test_a_body_that_does_not_match_its_hash_is_refused_and_nothing_stored(
    api: Api, workspace: Workspace, store: StoreProbe
):
    response = put_blob(api, workspace.slug, b"the real bytes", digest=sha(b"other bytes"))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "hash_mismatch"
    assert sha(b"the real bytes") in response.json()["error"]["message"]
    assert not Blob.objects.exists()
    assert store.contents() == []
    assert not AuditEvent.objects.filter(action="blob.upload").exists()


def test_a_blob_over_the_limit_is_413_and_nothing_stored(api: Api, workspace: Workspace, store: StoreProbe,
                                                         settings):
    settings.CUMULUS_BLOB_MAX_BYTES = 10
    response = put_blob(api, workspace.slug, b"eleven byte")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert not Blob.objects.exists() and store.contents() == []
    assert put_blob(api, workspace.slug, b"ten bytes!").status_code == 201


def test_the_limit_holds_when_the_declared_length_lies(workspace: Workspace, store: StoreProbe, settings):
    # the streaming check, not only Content-Length
    from controlplane.services import Actor
    from projects import services

    settings.CUMULUS_BLOB_MAX_BYTES = 10
    with pytest.raises(services.TooLarge):
        services.blob_upload(workspace=workspace, sha256=sha(b"a" * 20), chunks=[b"a" * 8, b"a" * 12],
                             actor=Actor(user=None))
    assert store.contents() == [] and not Blob.objects.exists()


def test_missing_validates_its_input(api: Api, workspace: Workspace):
    base = f"workspaces/{workspace.slug}/blobs/missing"
    for body in ({"sha256": ["ABC"]}, {"sha256": ["A" * 64]}, {"sha256": "x"}, {}, {"sha256": [], "x": 1},
                 {"sha256": ["0" * 64] * 10_001}):
        response = api.post(base, body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == "validation_error"


def test_a_snapshot_records_its_manifest(api: Api, workspace: Workspace, user, store: StoreProbe):
    main, helper = b"import helper\n", b"X = 1\n"
    for data in (main, helper):
        assert put_blob(api, workspace.slug, data).status_code == 201
    files = [entry("main.py", main), entry("pkg/helper.py", helper, 0o755), entry("copy.py", main)]
    created = api.post(f"workspaces/{workspace.slug}/snapshots/", {"files": files})
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["file_count"] == 3 and body["total_size"] == 2 * len(main) + len(helper)
    shown = api.get(f"workspaces/{workspace.slug}/snapshots/{body['id']}/")
    assert shown.status_code == 200
    assert shown.json()["files"] == sorted(files, key=lambda f: f["path"])
    assert shown.json()["created_by"] == user.email
    assert AuditEvent.objects.filter(workspace=workspace, action="snapshot.create", target_id=body["id"]).exists()


@pytest.mark.parametrize(("bad", "field", "words"), [
    ({"path": "../outside.py"}, "path", ".."),
    ({"path": "src/../../etc/passwd"}, "path", ".."),
    ({"path": "/etc/passwd"}, "path", "absolute"),
    ({"path": "src//main.py"}, "path", "empty"),
    ({"path": "src/"}, "path", "empty"),
    ({"path": "a\x00b"}, "path", "NUL"),
    ({"path": "a" * 4097}, "path", "4096"),
    ({"mode": 0o10000}, "mode", "4095"),
    ({"mode": -1}, "mode", "0"),
    ({"mode": "644"}, "mode", "integer"),
    ({"size": -1}, "size", "0"),
    ({"sha256": "Z" * 64}, "sha256", "hexadecimal"),
    ({"extra": 1}, "extra", "Unknown"),
])
def test_a_malformed_manifest_entry_is_400_with_a_message_for_its_field(
    api: Api, workspace: Workspace, bad: dict, field: str, words: str
):
    data = b"ok\n"
    put_blob(api, workspace.slug, data)
    files = [entry("fine.py", data), {**entry("bad.py", data), **bad}]
    response = api.post(f"workspaces/{workspace.slug}/snapshots/", {"files": files})
    assert response.status_code == 400, response.content
    messages = response.json()["error"]["fields"]["files"]["1"][field]
    assert words in " ".join(messages), messages
    assert "0" not in response.json()["error"]["fields"]["files"]
    assert not Snapshot.objects.exists() and not SnapshotFile.objects.exists()


def test_a_duplicate_path_is_400(api: Api, workspace: Workspace):
    data = b"ok\n"
    put_blob(api, workspace.slug, data)
    response = api.post(f"workspaces/{workspace.slug}/snapshots/",
                        {"files": [entry("a.py", data), entry("b.py", data), entry("a.py", data)]})
    assert response.status_code == 400
    assert "Duplicate" in response.json()["error"]["fields"]["files"]["2"]["path"][0]
    assert not Snapshot.objects.exists()


def test_a_size_that_is_not_the_blobs_is_400(api: Api, workspace: Workspace):
    data = b"twelve bytes"
    put_blob(api, workspace.slug, data)
    response = api.post(f"workspaces/{workspace.slug}/snapshots/", {"files": [{**entry("a.py", data), "size": 13}]})
    assert response.status_code == 400
    assert "12 bytes" in response.json()["error"]["fields"]["files"]["0"]["size"][0]
    assert not Snapshot.objects.exists()


def test_an_unknown_hash_is_400_listing_the_missing(api: Api, workspace: Workspace):
    known, unknown = b"known", b"never uploaded"
    put_blob(api, workspace.slug, known)
    response = api.post(f"workspaces/{workspace.slug}/snapshots/",
                        {"files": [entry("k.py", known), entry("u.py", unknown), entry("v.py", unknown)]})
    assert response.status_code == 400
    fields = response.json()["error"]["fields"]
    assert fields["missing"] == [sha(unknown)]
    assert set(fields["files"]) == {"1", "2"}
    assert not Snapshot.objects.exists() and not SnapshotFile.objects.exists()


def test_too_many_files_is_400(api: Api, workspace: Workspace):
    files = [{"path": f"f{i}", "sha256": "0" * 64, "size": 0, "mode": 420} for i in range(100_001)]
    response = api.post(f"workspaces/{workspace.slug}/snapshots/", {"files": files})
    assert response.status_code == 400
    assert "100000" in str(response.json()["error"]["fields"]["files"])


def test_an_empty_manifest_is_an_empty_snapshot(api: Api, workspace: Workspace):
    response = api.post(f"workspaces/{workspace.slug}/snapshots/", {"files": []})
    assert response.status_code == 201
    assert response.json()["file_count"] == 0


def test_an_unknown_snapshot_is_404(api: Api, workspace: Workspace):
    for ident in (uuid.uuid4(), "not-a-uuid"):
        response = api.get(f"workspaces/{workspace.slug}/snapshots/{ident}/")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_another_workspaces_blobs_and_snapshots_are_invisible(api: Api, workspace: Workspace, store: StoreProbe):
    # given: workspace B with a blob and a snapshot
    other = WorkspaceFactory(slug="bravo")
    theirs = api_for(MembershipFactory(workspace=other, role=Role.OWNER).user)
    secret = b"bravo's secret"
    assert put_blob(theirs, other.slug, secret).status_code == 201
    snap = theirs.post(f"workspaces/{other.slug}/snapshots/", {"files": [entry("s.py", secret)]}).json()["id"]
    mine = workspace.slug
    # then: from A, B's blob is missing, unreadable, unusable in a manifest; B's snapshot is 404
    assert api.post(f"workspaces/{mine}/blobs/missing", {"sha256": [sha(secret)]}).json() == {
        "missing": [sha(secret)]}
    assert api.get(f"workspaces/{mine}/blobs/{sha(secret)}").status_code == 404
    assert api.get(f"workspaces/{mine}/snapshots/{snap}/").status_code == 404
    used = api.post(f"workspaces/{mine}/snapshots/", {"files": [entry("s.py", secret)]})
    assert used.status_code == 400 and used.json()["error"]["fields"]["missing"] == [sha(secret)]
    # and B's routes are 404 from A, as for a workspace that does not exist
    assert api.get(f"workspaces/{other.slug}/blobs/{sha(secret)}").status_code == 404
    assert api.get(f"workspaces/{other.slug}/snapshots/{snap}/").status_code == 404
    assert put_blob(api, other.slug, b"intruder").status_code == 404
    # uploading the same bytes to A stores A's own copy
    assert put_blob(api, mine, secret).status_code == 201
    assert Blob.objects.filter(sha256=sha(secret)).count() == 2
    assert store.read(f"{workspace.pk}/{sha(secret)[:2]}/{sha(secret)}") == secret
    assert store.read(f"{other.pk}/{sha(secret)[:2]}/{sha(secret)}") == secret


def test_a_viewer_reads_but_cannot_upload_or_snapshot(workspace: Workspace, api: Api, member_api,
                                                       store: StoreProbe):
    data = b"shared"
    put_blob(api, workspace.slug, data)
    viewer = member_api(workspace, Role.VIEWER)
    denied = put_blob(viewer, workspace.slug, b"viewer bytes")
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "permission_denied"
    assert viewer.post(f"workspaces/{workspace.slug}/snapshots/", {"files": []}).status_code == 403
    assert viewer.post(f"workspaces/{workspace.slug}/blobs/missing", {"sha256": []}).status_code == 403
    assert viewer.get(f"workspaces/{workspace.slug}/blobs/{sha(data)}").status_code == 200
    assert Blob.objects.count() == 1 and len(store.contents()) == 1
    member = member_api(workspace, Role.MEMBER)
    assert put_blob(member, workspace.slug, b"member bytes").status_code == 201


def test_a_body_over_the_json_limit_is_413_not_500(api: Api, workspace: Workspace, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    files = [{"path": f"f{i}", "sha256": "0" * 64, "size": 0, "mode": 420} for i in range(100)]
    response = api.post(f"workspaces/{workspace.slug}/snapshots/", {"files": files})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_blob_a_crash_damaged_is_missing_again_and_its_upload_repairs_it(api: Api, workspace: Workspace,
                                                                            blob_dir, damage: str):
    # given: a recorded blob whose file a crash took (the local store does not fsync each blob)
    data = b"weights " * 1000
    assert put_blob(api, workspace.slug, data).status_code == 201
    path = blob_dir / str(workspace.pk) / sha(data)[:2] / sha(data)
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(data[:100])
    base = f"workspaces/{workspace.slug}/blobs/missing"
    # then: the server says it is missing, so the client sends it again
    assert api.post(base, {"sha256": [sha(data)]}).json() == {"missing": [sha(data)]}
    again = put_blob(api, workspace.slug, data)
    assert again.status_code == 200 and again.json()["created"] is False
    assert path.read_bytes() == data
    assert api.post(base, {"sha256": [sha(data)]}).json() == {"missing": []}
    assert Blob.objects.filter(workspace=workspace).count() == 1


def test_a_workspace_with_blobs_and_snapshots_can_be_deleted_and_its_bytes_go_too(
    api: Api, workspace: Workspace, django_capture_on_commit_callbacks
):
    from django.conf import settings

    from projects.storage import blob_key, blob_store

    a, b = b"a = 1\n", b"b = 1\n"
    for data in (a, b):
        assert api.client.put(f"/api/v1/workspaces/{workspace.slug}/blobs/{sha(data)}", data=data,
                              content_type="application/octet-stream").status_code == 201
    files = [{"path": "a.py", "sha256": sha(a), "size": len(a), "mode": 0o644}]
    base = api.post(f"workspaces/{workspace.slug}/snapshots/", {"files": files}).json()["id"]
    layer = api.post(f"workspaces/{workspace.slug}/snapshots/", {
        "base": base, "changes": [{"path": "b.py", "sha256": sha(b), "size": len(b), "mode": 0o644}]})
    assert layer.status_code == 201, layer.content
    assert blob_store().exists(blob_key(workspace.pk, sha(a)))
    # when
    with django_capture_on_commit_callbacks(execute=True) as after_commit:
        response = api.client.delete(f"/api/v1/workspaces/{workspace.slug}/")
    # then
    assert response.status_code == 204, response.content
    assert not Blob.objects.exists() and not Snapshot.objects.exists() and not SnapshotFile.objects.exists()
    assert len(after_commit) == 1  # the bytes go once the rows are gone for good
    assert not blob_store().exists(blob_key(workspace.pk, sha(a)))
    assert not blob_store().exists(blob_key(workspace.pk, sha(b)))
    assert settings.CUMULUS_BLOB_STORE == "local"
