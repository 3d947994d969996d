"""The sync endpoints' fast paths: plain-Python validation that must match the fields', inline blobs stored in one
go, snapshot lookups in one statement, hash and row batches at their edges; and the queries an incremental sync's
snapshot request makes."""

from __future__ import annotations

import base64
import hashlib
import uuid
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework import serializers

from controlplane.models import AuditEvent, Workspace
from projects import manifests, services
from projects.api import serializers as sync_serializers
from projects.api.serializers import BlobsMissingIn, SnapshotCreate
from projects.models import Blob, Snapshot
from tests.conftest import Api
from tests.factories import WorkspaceFactory

pytestmark = pytest.mark.django_db


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(path: str, data: bytes, mode: int = 0o644) -> dict:
    return {"path": path, "sha256": sha(data), "size": len(data), "mode": mode}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def snapshots(ws: str) -> str:
    return f"workspaces/{ws}/snapshots/"


def upload(api: Api, ws: str, *blobs: bytes) -> None:
    for data in blobs:
        response = api.client.put(f"/api/v1/workspaces/{ws}/blobs/{sha(data)}", data=data,
                                  content_type="application/octet-stream")
        assert response.status_code in (200, 201), response.content


def outcome(serializer_class: type, body: object) -> tuple[str, object]:
    """("valid", the data as the service takes it) or ("invalid", the errors)."""
    try:
        data = serializer_class.validated(body)
    except serializers.ValidationError as error:
        return "invalid", error.detail
    if "base" in data:  # snapshot_record takes `changes` and `removed` left out as empty
        data = {"changes": [], "removed": [], **data}
    return "valid", data


def through_the_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn every plain-Python path off, so that validation goes field by field."""
    monkeypatch.setattr(sync_serializers, "_plain_snapshot", lambda data: None)
    monkeypatch.setattr(sync_serializers, "_plain_request", lambda data: None)
    monkeypatch.setattr(sync_serializers, "_plain_hashes", lambda hashes: False)


A, B = b"a = 1\n", b"b = 1\n"
BASE = "0b9f1a5e-3c41-4f43-9d3b-6a0c1f2e7d10"
WELL_FORMED_SNAPSHOTS = [
    {"files": [entry("a.py", A), entry("pkg/b.py", B, 0o755)]},
    {"files": [], "digest": sha(b"x")},
    {"files": [entry("a.py", A)], "blobs": {sha(A): b64(A)}},
    {"base": BASE, "changes": [entry("a.py", A)], "removed": ["old.py"], "digest": sha(b"x"),
     "blobs": {sha(A): b64(A), sha(b""): ""}},
    {"base": BASE.replace("-", "").upper()},
    {"base": BASE, "changes": [], "removed": []},
    {"base": 7, "changes": []},  # UUIDField reads an integer as a UUID; the service then finds no such base
]
MALFORMED_SNAPSHOTS = [
    {"base": "not-a-uuid", "changes": [entry("a.py", A)]},
    {"base": None, "changes": []},
    {"base": BASE, "blobs": {sha(A): "not base64!"}},
    {"base": BASE, "blobs": {sha(A): 7}},
    {"base": BASE, "blobs": {"not-a-hash": b64(A)}},
    {"base": BASE, "blobs": {sha(A): "eA==\x00"}},
    {"base": BASE, "blobs": {sha(A): "\udcff"}},
    {"base": BASE, "blobs": [b64(A)]},
    {"base": BASE, "blobs": None},
    {"base": BASE, "blobs": {sha(b"x" * (1024 * 1024 + 1)): b64(b"x" * (1024 * 1024 + 1))}},
    {"files": [entry("a.py", A)], "base": BASE},
    {"files": [{**entry("a.py", A), "path": []}]},
    {"files": [{**entry("a.py", A), "path": "a/../b.py"}]},
    {"files": [{**entry("a.py", A), "sha256": sha(A).upper()}]},
    {"files": [entry("a.py", A), entry("a.py", B)]},
    {"base": BASE, "removed": ["a.py", "a.py"]},
    {"base": BASE, "changes": [entry("a.py", A)], "digest": "nope"},
    {"changes": [entry("a.py", A)]},
    {"files": [entry("a.py", A)], "extra": 1},
    ["not", "an", "object"],
]


@pytest.mark.parametrize("body", WELL_FORMED_SNAPSHOTS + MALFORMED_SNAPSHOTS)
def test_a_snapshot_request_validates_exactly_as_its_fields_do(body: object, monkeypatch: pytest.MonkeyPatch):
    # given: what the request comes to without the plain paths
    fast = outcome(SnapshotCreate, body)
    through_the_fields(monkeypatch)
    # then: the same validated data, or the same errors
    assert fast == outcome(SnapshotCreate, body)
    assert fast[0] == ("valid" if body in WELL_FORMED_SNAPSHOTS else "invalid")


@pytest.mark.parametrize("body", [
    {"sha256": [sha(A), sha(B), sha(A)]},
    {"sha256": []},
    {"sha256": [sha(A).upper()]},
    {"sha256": [sha(A) + "\n"]},
    {"sha256": [sha(A)[:-1]]},
    {"sha256": [7]},
    {"sha256": [None]},
    {"sha256": sha(A)},
    {"sha256": [sha(A)], "x": 1},
    {},
])
def test_a_missing_request_validates_exactly_as_its_fields_do(body: dict, monkeypatch: pytest.MonkeyPatch):
    fast = outcome(BlobsMissingIn, body)
    through_the_fields(monkeypatch)
    assert fast == outcome(BlobsMissingIn, body)


def test_an_inline_blob_whose_row_outlived_its_file_is_written_again_without_a_second_row(
    api: Api, workspace: Workspace, blob_dir: Path
):
    # given: a blob whose file a crash lost, its row kept
    upload(api, workspace.slug, A)
    (blob_dir / str(workspace.pk) / sha(A)[:2] / sha(A)).unlink()
    # when: it comes inline with a snapshot
    response = api.post(snapshots(workspace.slug), {"files": [entry("a.py", A)], "blobs": {sha(A): b64(A)}})
    # then: the file is back, and the row and its audit record are the first upload's
    assert response.status_code == 201, response.content
    assert (blob_dir / str(workspace.pk) / sha(A)[:2] / sha(A)).read_bytes() == A
    assert Blob.objects.filter(workspace=workspace, sha256=sha(A)).count() == 1
    assert AuditEvent.objects.filter(action="blob.upload", target_id=sha(A)).count() == 1


def test_inline_blobs_are_each_recorded_and_audited_once(api: Api, workspace: Workspace):
    # given: one of three already uploaded
    upload(api, workspace.slug, A)
    new = [b"one\n", b"two\n"]
    # when
    response = api.post(snapshots(workspace.slug), {
        "files": [entry("a.py", A), entry("one.py", new[0]), entry("two.py", new[1])],
        "blobs": {sha(A): b64(A), sha(new[0]): b64(new[0]), sha(new[1]): b64(new[1])}})
    # then
    assert response.status_code == 201, response.content
    assert sorted(Blob.objects.filter(workspace=workspace).values_list("sha256", "size")) == sorted(
        (sha(data), len(data)) for data in [A, *new])
    for data in [A, *new]:
        event = AuditEvent.objects.get(action="blob.upload", target_id=sha(data))
        assert event.workspace == workspace and event.data == {"size": len(data)}


def test_an_inline_blob_over_the_blob_limit_is_413_and_nothing_is_kept(api: Api, workspace: Workspace, settings):
    settings.CUMULUS_BLOB_MAX_BYTES = 4
    response = api.post(snapshots(workspace.slug), {"files": [entry("a.py", A)], "blobs": {sha(A): b64(A)}})
    assert response.status_code == 413, response.content
    assert not Blob.objects.exists() and not Snapshot.objects.exists()


def test_a_snapshot_is_found_with_its_root_and_only_in_its_workspace(api: Api, workspace: Workspace):
    # given: a whole snapshot and a layer over it
    upload(api, workspace.slug, A, B)
    root = api.post(snapshots(workspace.slug), {"files": [entry("a.py", A)]}).json()["id"]
    layer = api.post(snapshots(workspace.slug), {"base": root, "changes": [entry("b.py", B)]}).json()["id"]
    digest = Snapshot.objects.get(pk=layer).digest
    # when
    with CaptureQueriesContext(connection) as queries:
        found = services._snapshot_by(workspace, "digest", digest)
        by_id = services._snapshot_by(workspace, "id", uuid.UUID(layer))
        assert (found.root.pk, by_id.root.pk) == (uuid.UUID(root), uuid.UUID(root))
    # then: one statement each, the root included
    assert len(queries.captured_queries) == 2
    assert (found.pk, by_id.pk) == (uuid.UUID(layer), uuid.UUID(layer))
    assert services._snapshot_by(workspace, "id", uuid.UUID(root)).root_id is None
    other = WorkspaceFactory()
    assert services._snapshot_by(other, "id", uuid.UUID(layer)) is None
    assert services._snapshot_by(other, "digest", digest) is None


def test_the_oldest_snapshot_of_a_manifest_is_the_one_found(workspace: Workspace):
    first, second = (Snapshot.objects.create(workspace=workspace, digest="d" * 64) for _ in range(2))
    assert services._snapshot_by(workspace, "digest", "d" * 64).pk == first.pk != second.pk


def test_an_incremental_snapshot_with_its_new_blob_inline_makes_few_queries(api: Api, workspace: Workspace):
    # given: a base of 100 files, and a layer over it, as a second sync leaves them
    files = [entry(f"src/m{i}.py", f"x = {i}\n".encode()) for i in range(100)]
    upload(api, workspace.slug, *(f"x = {i}\n".encode() for i in range(101)))
    root = api.post(snapshots(workspace.slug), {"files": files}).json()["id"]
    base = api.post(snapshots(workspace.slug), {"base": root, "changes": [entry("src/m100.py", b"x = 100\n")]})
    new = b"brand new\n"
    # when
    with CaptureQueriesContext(connection) as queries:
        response = api.post(snapshots(workspace.slug), {"base": base.json()["id"], "changes": [entry("n.py", new)],
                                                        "removed": [], "blobs": {sha(new): b64(new)}})
    # then: authentication and membership; the blob looked up, written, audited; the base and its root in
    # one statement; its entries at the changed paths; the snapshot of the manifest, if any; the layer's
    # own rows; the snapshot, its rows and its audit record (and the transaction's savepoint, in a test)
    assert response.status_code == 201, response.content
    assert len(queries.captured_queries) <= 14, "\n".join(q["sql"][:120] for q in queries.captured_queries)


@pytest.mark.parametrize("count", [0, 1, 5_000, 5_001])
def test_rows_are_inserted_whole_whatever_their_number(workspace: Workspace, count: int):
    # given
    snapshot = Snapshot.objects.create(workspace=workspace)
    rows = [(f"d{i % 7}/f{i}.py", sha(str(i).encode()), i, 0o644 + i % 2) for i in range(count)]
    # when
    manifests.insert_rows(snapshot, iter(rows))
    # then
    assert manifests.manifest(snapshot) == {path: (digest, size, mode) for path, digest, size, mode in sorted(rows)}


@pytest.mark.parametrize("count", [0, 1, services.IN_BATCH, services.IN_BATCH + 1, 2 * services.IN_BATCH + 3])
def test_existing_hashes_finds_exactly_the_workspaces_blobs_however_many_are_asked(workspace: Workspace, count: int):
    # given: every third hash is a blob of the workspace, every fifth one of another's
    hashes = [sha(str(i).encode()) for i in range(count)]
    other = WorkspaceFactory()
    Blob.objects.bulk_create([Blob(workspace=workspace, sha256=h, size=i) for i, h in enumerate(hashes) if i % 3 == 0]
                             + [Blob(workspace=other, sha256=h, size=1) for i, h in enumerate(hashes) if i % 5 == 0])
    # when
    found = services.existing_hashes(workspace, hashes + hashes[:2])
    # then
    assert found == {h: i for i, h in enumerate(hashes) if i % 3 == 0}
