"""`POST blobs/batch`: many blobs in one request, each verified; and the snapshot manifest's fast path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from controlplane.choices import Role
from controlplane.models import AuditEvent, Workspace
from projects import services
from projects.models import Blob, Snapshot, SnapshotFile
from tests.conftest import Api

pytestmark = pytest.mark.django_db


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def frame(data: bytes, digest: str | None = None, size: int | None = None) -> bytes:
    return f"{digest or sha(data)}{len(data) if size is None else size:016x}".encode() + data


def post_bundle(api: Api, ws: str, body: bytes):
    return api.client.post(f"/api/v1/workspaces/{ws}/blobs/batch", data=body,
                           content_type="application/octet-stream")


def stored(blob_dir: Path) -> list[str]:
    return sorted(p.name for p in blob_dir.rglob("*") if p.is_file()) if blob_dir.exists() else []


def read_back(api: Api, ws: str, data: bytes) -> bytes:
    response = api.client.get(f"/api/v1/workspaces/{ws}/blobs/{sha(data)}")
    assert response.status_code == 200, response
    return b"".join(response.streaming_content)


def test_a_bundle_stores_every_blob_and_records_them_at_once(api: Api, workspace: Workspace, blob_dir: Path):
    # given
    blobs = [b"print('a')\n", b"", b"x" * 3_000_000, b"import os\n"]
    # when
    response = post_bundle(api, workspace.slug, b"".join(frame(b) for b in blobs))
    # then
    assert response.status_code == 200, response.content
    assert response.json() == {"created": [sha(b) for b in blobs], "existing": [], "mismatched": []}
    assert sorted(Blob.objects.for_workspace(workspace).values_list("sha256", "size")) == sorted(
        (sha(b), len(b)) for b in blobs)
    for b in blobs:
        assert read_back(api, workspace.slug, b) == b
    # the three small ones in one pack, the 3 MB one in a file of its own
    assert stored(blob_dir) == sorted([sha(blobs[2]), Blob.objects.get(sha256=sha(blobs[0])).pack])
    event = AuditEvent.objects.get(workspace=workspace, action="blob.upload_batch")
    assert event.data["count"] == 4 and event.data["size"] == sum(map(len, blobs))
    # and the workspace no longer misses them
    missing = api.post(f"workspaces/{workspace.slug}/blobs/missing", {"sha256": [sha(b) for b in blobs]})
    assert missing.json() == {"missing": []}


def test_blobs_already_there_are_listed_as_existing(api: Api, workspace: Workspace, blob_dir: Path):
    old, new = b"old\n", b"new\n"
    assert post_bundle(api, workspace.slug, frame(old)).status_code == 200
    response = post_bundle(api, workspace.slug, frame(old) + frame(new))
    assert response.json() == {"created": [sha(new)], "existing": [sha(old)], "mismatched": []}
    assert Blob.objects.for_workspace(workspace).count() == 2
    assert len(stored(blob_dir)) == 2


def test_a_blob_whose_bytes_do_not_match_is_dropped_and_the_others_kept(api: Api, workspace: Workspace,
                                                                        blob_dir: Path):
    good, changed = b"good bytes\n", b"edited after hashing\n"
    response = post_bundle(api, workspace.slug, frame(good) + frame(changed, digest=sha(b"what was hashed\n")))
    assert response.status_code == 200
    assert response.json() == {"created": [sha(good)], "existing": [], "mismatched": [sha(b"what was hashed\n")]}
    assert list(Blob.objects.for_workspace(workspace).values_list("sha256", flat=True)) == [sha(good)]
    # one pack of the good blob's bytes alone: no temporary file left behind either
    (pack,) = [p for p in blob_dir.rglob("*") if p.is_file()]
    assert pack.read_bytes() == good and read_back(api, workspace.slug, good) == good


@pytest.mark.parametrize(("body", "words"), [
    (b"not a header at all", "no valid header"),
    (frame(b"abc")[:-1], "ends inside blob 1"),
    (frame(b"abc") + b"Z" * 80, "Blob 2 of the bundle has no valid header"),
    (frame(b"abc", digest=sha(b"abc").upper()), "no valid header"),
])
def test_a_malformed_bundle_is_400_and_records_nothing(api: Api, workspace: Workspace, body: bytes, words: str):
    response = post_bundle(api, workspace.slug, body)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_bundle"
    assert words in response.json()["error"]["message"]
    assert not Blob.objects.exists()


def test_an_empty_bundle_is_nothing(api: Api, workspace: Workspace):
    response = post_bundle(api, workspace.slug, b"")
    assert response.status_code == 200
    assert response.json() == {"created": [], "existing": [], "mismatched": []}


def test_a_blob_over_the_limit_is_413(api: Api, workspace: Workspace, settings):
    settings.CUMULUS_BLOB_MAX_BYTES = 10
    response = post_bundle(api, workspace.slug, frame(b"ok") + frame(b"eleven byte"))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert not Blob.objects.exists()


def test_too_many_blobs_is_400(api: Api, workspace: Workspace, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(services, "MAX_BATCH_BLOBS", 2)
    response = post_bundle(api, workspace.slug, b"".join(frame(bytes([i])) for i in range(3)))
    assert response.status_code == 400
    assert "at most 2 blobs" in response.json()["error"]["message"]
    assert not Blob.objects.exists()


def test_a_viewer_may_not_upload(member_api, workspace: Workspace):
    viewer = member_api(workspace, Role.VIEWER)
    response = post_bundle(viewer, workspace.slug, frame(b"data"))
    assert response.status_code == 403
    assert not Blob.objects.exists()


def test_a_concurrently_recorded_blob_is_not_an_error(workspace: Workspace):
    from controlplane.services import Actor

    data = b"raced\n"
    Blob.objects.create(workspace=workspace, sha256=sha(data), size=len(data))
    services._insert_blobs(workspace, {sha(data): (len(data), "", None)})  # the row exists: skipped, no IntegrityError
    assert Blob.objects.filter(sha256=sha(data)).count() == 1
    result = services.blobs_upload_batch(workspace=workspace, stream=None, actor=Actor(user=None))
    assert (result.created, result.existing, result.mismatched) == ([], [], [])


# -- the manifest's fast path gives the same answers as the serializer ----------------------------


def test_a_well_formed_manifest_of_many_files_is_recorded(api: Api, workspace: Workspace):
    data = b"shared\n"
    post_bundle(api, workspace.slug, frame(data))
    files = [{"path": f"src/ü/mod{i}.py", "sha256": sha(data), "size": len(data), "mode": 0o644 if i else 0o755}
             for i in range(3000)]
    response = api.post(f"workspaces/{workspace.slug}/snapshots/", {"files": files})
    assert response.status_code == 201, response.content
    snapshot = Snapshot.objects.get(pk=response.json()["id"])
    assert snapshot.file_count == 3000
    rows = SnapshotFile.objects.filter(snapshot=snapshot)
    assert rows.count() == 3000
    assert rows.get(path="src/ü/mod0.py").mode == 0o755
    shown = api.get(f"workspaces/{workspace.slug}/snapshots/{snapshot.pk}/").json()
    assert shown["files"][0] == {"path": "src/ü/mod0.py", "sha256": sha(data), "size": len(data), "mode": 0o755}


@pytest.mark.parametrize("bad", [
    {"path": "a\ud800b.py"},
    {"size": True},
    {"mode": 4096},
    {"sha256": "A" * 64},
    {"path": "./a.py"},
    {"path": ""},
])
def test_what_the_fast_path_passes_on_is_still_refused(api: Api, workspace: Workspace, bad: dict):
    data = b"ok\n"
    post_bundle(api, workspace.slug, frame(data))
    entry = {"path": "fine.py", "sha256": sha(data), "size": len(data), "mode": 420}
    body = json.dumps({"files": [entry, {**entry, **bad}]})  # ASCII: a lone surrogate travels as \ud800
    response = api.post(f"workspaces/{workspace.slug}/snapshots/", raw=body)
    assert response.status_code == 400, response.content
    assert "1" in response.json()["error"]["fields"]["files"]
    assert not Snapshot.objects.exists()
