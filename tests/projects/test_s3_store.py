"""The s3 blob store against a real S3 API (moto's server on loopback), through the API and directly.

The API tests of test_sync_api.py run on this store too (their `store` fixture); these add what is
S3's own: the multipart path, that no upload is left open whatever happens, keys under the prefix,
and a lost object.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from controlplane.choices import Role
from controlplane.models import Workspace
from controlplane.services import Actor
from projects import services
from projects.models import Blob, Snapshot
from projects.storage import S3_MIN_PART_SIZE, S3_PART_SIZE, S3BlobStore, blob_key, blob_store, s3_client
from tests.conftest import Api, api_for
from tests.factories import MembershipFactory, WorkspaceFactory
from tests.projects.conftest import S3_PREFIX

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(api: Api, ws: str, data: bytes, digest: str | None = None) -> Any:
    return api.client.put(f"/api/v1/workspaces/{ws}/blobs/{digest or sha(data)}", data=data,
                          content_type="application/octet-stream")


def get_blob(api: Api, ws: str, digest: str) -> Any:
    return api.get(f"workspaces/{ws}/blobs/{digest}")


def object_key(workspace: Workspace, data: bytes) -> str:
    return f"{S3_PREFIX}/{workspace.pk}/{sha(data)[:2]}/{sha(data)}"


def bucket_keys(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def open_uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@pytest.fixture
def s3_store(s3_bucket: str) -> S3BlobStore:
    store = blob_store()
    assert isinstance(store, S3BlobStore)
    return store


# --- through the API ------------------------------------------------------------------


def test_a_blob_round_trips_byte_identical_under_the_prefix(api: Api, workspace: Workspace, s3_bucket: str,
                                                           s3_admin: Any):
    # given: every byte value, so nothing on the way may treat the body as text
    data = bytes(range(256)) * 40
    # when
    response = put_blob(api, workspace.slug, data)
    # then
    assert response.status_code == 201, response.content
    assert bucket_keys(s3_admin, s3_bucket) == [object_key(workspace, data)]
    fetched = get_blob(api, workspace.slug, sha(data))
    assert fetched.status_code == 200
    assert fetched["Content-Type"] == "application/octet-stream"
    assert b"".join(fetched.streaming_content) == data


def test_a_20_mib_blob_goes_multipart_and_round_trips(api: Api, workspace: Workspace, s3_bucket: str,
                                                     s3_admin: Any):
    data = os.urandom(20 * MiB)
    response = put_blob(api, workspace.slug, data)
    assert response.status_code == 201, response.content
    head = s3_admin.head_object(Bucket=s3_bucket, Key=object_key(workspace, data))
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # 8 + 8 + 4 MiB: the multipart path
    assert open_uploads(s3_admin, s3_bucket) == []
    fetched = get_blob(api, workspace.slug, sha(data))
    assert fetched.status_code == 200
    assert b"".join(fetched.streaming_content) == data


def test_a_mismatching_body_is_400_and_leaves_no_object_and_no_upload(api: Api, workspace: Workspace,
                                                                      s3_bucket: str, s3_admin: Any):
    # given: bodies on both paths, one put_object, one multipart with parts already sent
    for data in (b"the real bytes", os.urandom(S3_PART_SIZE + MiB)):
        # when
        response = put_blob(api, workspace.slug, data, digest=sha(b"other bytes"))
        # then
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "hash_mismatch"
        assert bucket_keys(s3_admin, s3_bucket) == []
        assert open_uploads(s3_admin, s3_bucket) == []
    assert not Blob.objects.exists()


def test_an_oversized_stream_aborts_its_multipart_upload(workspace: Workspace, s3_bucket: str, s3_admin: Any,
                                                         settings):
    # given: a limit past the first part, and a client whose Content-Length said nothing
    settings.CUMULUS_BLOB_MAX_BYTES = S3_PART_SIZE + 2 * MiB
    chunks = [b"a" * MiB] * 12
    # when / then
    with pytest.raises(services.TooLarge):
        services.blob_upload(workspace=workspace, sha256=sha(b"".join(chunks)), chunks=chunks,
                             actor=Actor(user=None))
    assert bucket_keys(s3_admin, s3_bucket) == [] and open_uploads(s3_admin, s3_bucket) == []
    assert not Blob.objects.exists()


def test_the_same_blob_twice_is_stored_once_and_the_second_upload_aborted(api: Api, workspace: Workspace,
                                                                        s3_bucket: str, s3_admin: Any):
    data = os.urandom(S3_PART_SIZE + MiB)
    assert put_blob(api, workspace.slug, data).status_code == 201
    first = s3_admin.head_object(Bucket=s3_bucket, Key=object_key(workspace, data))
    again = put_blob(api, workspace.slug, data)
    assert again.status_code == 200 and again.json()["created"] is False
    assert bucket_keys(s3_admin, s3_bucket) == [object_key(workspace, data)]
    assert open_uploads(s3_admin, s3_bucket) == []
    assert s3_admin.head_object(Bucket=s3_bucket, Key=object_key(workspace, data))["ETag"] == first["ETag"]
    assert Blob.objects.filter(workspace=workspace).count() == 1


def test_a_project_syncs_through_s3(api: Api, workspace: Workspace, s3_bucket: str, s3_admin: Any):
    # given: a small tree, one of whose files the workspace already has
    tree = {"main.py": b"import lib\n", "lib/__init__.py": b"X = 1\n", "data.bin": os.urandom(S3_PART_SIZE + 1)}
    assert put_blob(api, workspace.slug, tree["main.py"]).status_code == 201
    hashes = [sha(d) for d in tree.values()]
    # when: ask what is missing, upload that, record the snapshot
    missing = api.post(f"workspaces/{workspace.slug}/blobs/missing", {"sha256": hashes}).json()["missing"]
    assert missing == hashes[1:]
    for data in tree.values():
        if sha(data) in missing:
            assert put_blob(api, workspace.slug, data).status_code == 201
    assert api.post(f"workspaces/{workspace.slug}/blobs/missing", {"sha256": hashes}).json() == {"missing": []}
    files = [{"path": p, "sha256": sha(d), "size": len(d), "mode": 0o644} for p, d in tree.items()]
    created = api.post(f"workspaces/{workspace.slug}/snapshots/", {"files": files})
    assert created.status_code == 201, created.content
    # then: the manifest reads back, and every file's bytes download as a node would fetch them
    shown = api.get(f"workspaces/{workspace.slug}/snapshots/{created.json()['id']}/").json()
    assert shown["files"] == sorted(files, key=lambda f: f["path"])
    for entry in shown["files"]:
        fetched = get_blob(api, workspace.slug, entry["sha256"])
        assert b"".join(fetched.streaming_content) == tree[entry["path"]]
    assert sorted(bucket_keys(s3_admin, s3_bucket)) == sorted(object_key(workspace, d) for d in tree.values())
    assert Snapshot.objects.filter(workspace=workspace).count() == 1


def test_another_workspaces_blob_is_404(api: Api, workspace: Workspace, s3_bucket: str, s3_admin: Any):
    # given: workspace B's blob in the bucket
    other = WorkspaceFactory(slug="bravo")
    theirs = api_for(MembershipFactory(workspace=other, role=Role.OWNER).user)
    secret = b"bravo's secret"
    assert put_blob(theirs, other.slug, secret).status_code == 201
    # then: A reads it neither under its own workspace nor under B's
    assert get_blob(api, workspace.slug, sha(secret)).status_code == 404
    assert get_blob(api, other.slug, sha(secret)).status_code == 404
    assert get_blob(theirs, other.slug, sha(secret)).status_code == 200
    assert bucket_keys(s3_admin, s3_bucket) == [object_key(other, secret)]


def test_a_lost_object_is_404_and_an_upload_brings_it_back(api: Api, workspace: Workspace, s3_store: S3BlobStore,
                                                          s3_bucket: str, s3_admin: Any):
    # given: a recorded blob whose object is gone
    data = b"short-lived"
    assert put_blob(api, workspace.slug, data).status_code == 201
    s3_store.delete(blob_key(workspace.pk, sha(data)))
    assert bucket_keys(s3_admin, s3_bucket) == []
    # then: reading it is 404, not 500
    assert get_blob(api, workspace.slug, sha(data)).status_code == 404
    # when: the client uploads it again, the object is back (the row was there all along)
    again = put_blob(api, workspace.slug, data)
    assert again.status_code == 200 and again.json()["created"] is False
    assert b"".join(get_blob(api, workspace.slug, sha(data)).streaming_content) == data


# --- the store itself -----------------------------------------------------------------


def test_a_multipart_blob_is_invisible_until_commit(s3_store: S3BlobStore, s3_bucket: str, s3_admin: Any):
    key = "1/ab/invisible"
    data = os.urandom(S3_PART_SIZE + MiB)
    with s3_store.open_write(key) as writer:
        writer.write(data)
        # a part is in S3 already, but no object under the key
        assert open_uploads(s3_admin, s3_bucket) == [f"{S3_PREFIX}/{key}"]
        assert not s3_store.exists(key) and bucket_keys(s3_admin, s3_bucket) == []
        writer.commit()
    assert s3_store.exists(key) and open_uploads(s3_admin, s3_bucket) == []
    handle = s3_store.open_read(key)
    try:
        pieces = iter(lambda: handle.read(4096), b"")  # how FileResponse reads it
        assert b"".join(pieces) == data
    finally:
        handle.close()


@pytest.mark.parametrize("size", [0, 1, S3_MIN_PART_SIZE - 1, S3_MIN_PART_SIZE, 2 * S3_MIN_PART_SIZE + 1])
def test_every_size_around_the_part_boundary_round_trips(s3_admin: Any, s3_bucket: str, size: int):
    # the smallest legal part, so each boundary costs little: below, at, past one part and two
    store = S3BlobStore(s3_admin, s3_bucket, prefix="/edge/", part_size=S3_MIN_PART_SIZE)
    data = os.urandom(size)
    with store.open_write("k") as writer:
        for i in range(0, size, 3 * MiB):  # chunks that straddle part boundaries
            writer.write(data[i:i + 3 * MiB])
        assert writer.size == size and writer.hexdigest() == sha(data)
        writer.commit()
    assert bucket_keys(s3_admin, s3_bucket) == ["edge/k"]
    with store.open_read("k") as handle:
        assert handle.read() == data
    assert open_uploads(s3_admin, s3_bucket) == []


def test_an_abandoned_writer_leaves_nothing(s3_store: S3BlobStore, s3_bucket: str, s3_admin: Any):
    with pytest.raises(RuntimeError), s3_store.open_write("1/ab/abandoned") as writer:
        writer.write(os.urandom(S3_PART_SIZE + 1))
        raise RuntimeError("the client went away")
    assert bucket_keys(s3_admin, s3_bucket) == [] and open_uploads(s3_admin, s3_bucket) == []
    with pytest.raises(ValueError, match="committed or aborted"):
        writer.write(b"late")


def test_missing_keys_read_as_absent_and_delete_is_idempotent(s3_store: S3BlobStore):
    assert not s3_store.exists("1/00/nothing")
    with pytest.raises(FileNotFoundError):
        s3_store.open_read("1/00/nothing")
    s3_store.delete("1/00/nothing")  # no error
    with s3_store.open_write("1/00/something") as writer:
        writer.write(b"x")
        writer.commit()
    s3_store.delete("1/00/something")
    s3_store.delete("1/00/something")
    assert not s3_store.exists("1/00/something")


@pytest.mark.parametrize(("policy", "checksummed"), [("when_supported", True), ("when_required", False)])
def test_parts_carry_checksums_as_the_client_is_configured(s3_endpoint: str, s3_env: None, s3_bucket: str,
                                                           policy: str, checksummed: bool):
    # given: a client as an operator would set it for an S3 look-alike that refuses part checksums
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint,
                                            config=Config(request_checksum_calculation=policy))
    store = S3BlobStore(client, s3_bucket, part_size=S3_MIN_PART_SIZE)
    data = os.urandom(S3_MIN_PART_SIZE + 1)
    # when
    with store.open_write("k") as writer:
        writer.write(data)
        writer.commit()
    # then: the parts list repeated each part's CRC32 only when the parts were sent with one
    assert all(("ChecksumCRC32" in part) is checksummed for part in writer.parts) and len(writer.parts) == 2
    with store.open_read("k") as handle:
        assert handle.read() == data


def test_parts_below_the_s3_minimum_are_refused(s3_admin: Any, s3_bucket: str):
    with pytest.raises(ValueError, match="at least"):
        S3BlobStore(s3_admin, s3_bucket, part_size=S3_MIN_PART_SIZE - 1).open_write("k")


def test_one_client_per_settings_shared_across_threads(s3_endpoint: str, s3_env: None):
    # given: many threads asking at once for a client with the same settings
    made: list[Any] = []
    barrier = threading.Barrier(8)

    def ask() -> None:
        barrier.wait()
        made.append(s3_client(s3_endpoint, "eu-west-3"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then: they all got the same one; other settings get another
    assert len(made) == 8 and len({id(c) for c in made}) == 1
    assert made[0].meta.region_name == "eu-west-3"
    assert s3_client(s3_endpoint, "eu-west-2") is not made[0]


# --- settings -------------------------------------------------------------------------

PRODUCTION_ENV = {
    "DJANGO_SECRET_KEY": "x" * 50,
    "CELERY_BROKER_URL": "memory://",
    "CUMULUS_PUBLIC_URL": "https://cumulus.example",
    "DJANGO_ALLOWED_HOSTS": "cumulus.example",
}


@pytest.mark.parametrize(("extra", "error"), [
    ({"CUMULUS_BLOB_STORE": "s3"}, "CUMULUS_BLOB_S3_BUCKET"),
    ({"CUMULUS_BLOB_STORE": "s3", "CUMULUS_BLOB_S3_BUCKET": ""}, "CUMULUS_BLOB_S3_BUCKET"),
    ({"CUMULUS_BLOB_STORE": "gcs", "CUMULUS_BLOB_S3_BUCKET": "b"}, "'local' or 's3'"),
    ({"CUMULUS_BLOB_STORE": "s3", "CUMULUS_BLOB_S3_BUCKET": "b"}, None),
    ({}, None),
])
def test_production_settings_fail_fast_on_a_bad_blob_store(tmp_path: Path, extra: dict, error: str | None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUMULUS_", "DJANGO_", "AWS_"))}
    env.update(PRODUCTION_ENV, CUMULUS_DATA_DIR=str(tmp_path), DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3",
               **extra)
    run = subprocess.run([sys.executable, "-c", "import controlplane.settings.production"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    if error is None:
        assert run.returncode == 0, run.stderr
    else:
        assert run.returncode != 0 and "ImproperlyConfigured" in run.stderr and error in run.stderr, run.stderr
