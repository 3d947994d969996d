"""Packs: the small blobs of a bundle kept together in one object, each read back from its offset.

Tests that store bytes take the `store` fixture and run against both blob stores (a folder, and
S3 through a moto server on loopback); the ones that damage what a folder holds use the folder.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from controlplane.models import Workspace
from controlplane.services import Actor
from projects import services
from projects.models import Blob
from tests.conftest import Api

from .conftest import StoreProbe

pytestmark = pytest.mark.django_db


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def frame(data: bytes, digest: str | None = None) -> bytes:
    return f"{digest or sha(data)}{len(data):016x}".encode() + data


def post_bundle(api: Api, ws: str, body: bytes):
    return api.client.post(f"/api/v1/workspaces/{ws}/blobs/batch", data=body, content_type="application/octet-stream")


def read_blob(api: Api, ws: str, data: bytes) -> tuple[int, bytes, str | None]:
    response = api.client.get(f"/api/v1/workspaces/{ws}/blobs/{sha(data)}")
    body = b"".join(response.streaming_content) if response.status_code == 200 else b""
    return response.status_code, body, response.get("Content-Length")


def packs(store: StoreProbe) -> list[str]:
    return [key for key in store.contents() if "/packs/" in key]


def test_the_small_blobs_of_a_bundle_share_one_object_and_each_reads_back(api: Api, workspace: Workspace,
                                                                          store: StoreProbe):
    small = [b"print('a')\n", b"", b"import os\n" * 50, b"b = 2\n"]
    big = b"w" * (services.PACK_MAX_BLOB + 1)
    response = post_bundle(api, workspace.slug, b"".join(frame(b) for b in [small[0], big, *small[1:]]))
    assert response.status_code == 200, response.content
    assert sorted(response.json()["created"]) == sorted(sha(b) for b in [*small, big])
    # one object for the four small ones, one of its own for the big one: two in all
    assert len(packs(store)) == 1 and len(store.contents()) == 2
    rows = {row.sha256: row for row in Blob.objects.for_workspace(workspace)}
    assert {rows[sha(b)].pack for b in small} == {packs(store)[0].rsplit("/", 1)[1]} and rows[sha(big)].pack == ""
    for data in [*small, big]:
        assert read_blob(api, workspace.slug, data) == (200, data, str(len(data)))
    missing = api.post(f"workspaces/{workspace.slug}/blobs/missing", {"sha256": [sha(b) for b in [*small, big]]})
    assert missing.json() == {"missing": []}


def test_a_blob_that_does_not_match_leaves_no_bytes_in_the_pack(api: Api, workspace: Workspace, store: StoreProbe):
    first, second = b"first = 1\n", b"second = 2\n"
    body = frame(first) + frame(b"edited after hashing\n", digest=sha(b"what was hashed\n")) + frame(second)
    response = post_bundle(api, workspace.slug, body)
    assert response.json() == {"created": [sha(first), sha(second)], "existing": [],
                               "mismatched": [sha(b"what was hashed\n")]}
    (pack,) = packs(store)
    assert store.read(pack.removeprefix("cumulus/blobs/")) == first + second
    assert read_blob(api, workspace.slug, second) == (200, second, str(len(second)))


def test_a_bundle_whose_blobs_all_exist_or_mismatch_writes_no_pack(api: Api, workspace: Workspace,
                                                                   store: StoreProbe):
    old = b"old\n"
    assert post_bundle(api, workspace.slug, frame(old)).status_code == 200
    before = store.contents()
    response = post_bundle(api, workspace.slug, frame(b"changed\n", digest=sha(b"hashed\n")))
    assert response.json()["mismatched"] == [sha(b"hashed\n")]
    assert store.contents() == before and store.uploads() == []


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_pack_a_crash_damaged_makes_its_lost_blobs_missing_and_a_new_bundle_repairs_them(
        api: Api, workspace: Workspace, blob_dir: Path, damage: str):
    a, b = b"a" * 1000, b"b" * 1000
    assert post_bundle(api, workspace.slug, frame(a) + frame(b)).status_code == 200
    (pack,) = [p for p in blob_dir.rglob("*") if p.is_file()]
    if damage == "deleted":
        pack.unlink()
    else:
        pack.write_bytes(a + b[:10])  # the first blob whole, the second cut
    base = f"workspaces/{workspace.slug}/blobs/missing"
    lost = [sha(a), sha(b)] if damage == "deleted" else [sha(b)]
    assert api.post(base, {"sha256": [sha(a), sha(b)]}).json() == {"missing": lost}
    # the client sends what is missing again; the rows now point at where the bytes are
    again = post_bundle(api, workspace.slug, b"".join(frame(a if h == sha(a) else b) for h in lost))
    assert again.status_code == 200 and again.json()["existing"] == lost
    assert api.post(base, {"sha256": [sha(a), sha(b)]}).json() == {"missing": []}
    for data in (a, b):
        assert read_blob(api, workspace.slug, data) == (200, data, str(len(data)))
    assert Blob.objects.for_workspace(workspace).count() == 2


def test_a_blob_sent_alone_after_its_pack_was_lost_is_read_from_its_own_object(api: Api, workspace: Workspace,
                                                                                blob_dir: Path):
    data = b"weights " * 100
    assert post_bundle(api, workspace.slug, frame(data)).status_code == 200
    for pack in [p for p in blob_dir.rglob("*") if p.is_file()]:
        pack.unlink()
    put = api.client.put(f"/api/v1/workspaces/{workspace.slug}/blobs/{sha(data)}", data=data,
                         content_type="application/octet-stream")
    assert put.status_code == 200 and put.json()["created"] is False
    assert Blob.objects.get(workspace=workspace, sha256=sha(data)).pack == ""
    assert read_blob(api, workspace.slug, data) == (200, data, str(len(data)))


def test_deleting_a_workspace_deletes_its_packs(api: Api, workspace: Workspace, store: StoreProbe,
                                                django_capture_on_commit_callbacks):
    small, big = b"x = 1\n", b"y" * (services.PACK_MAX_BLOB + 1)
    assert post_bundle(api, workspace.slug, frame(small) + frame(big)).status_code == 200
    services.blobs_upload_batch(workspace=workspace, stream=io.BytesIO(frame(b"z = 3\n")), actor=Actor(user=None))
    assert len(packs(store)) == 2
    with django_capture_on_commit_callbacks(execute=True):
        assert api.client.delete(f"/api/v1/workspaces/{workspace.slug}/").status_code == 204
    assert store.contents() == [] and not Blob.objects.exists()


def test_another_workspace_cannot_read_a_packed_blob(api: Api, workspace: Workspace, store: StoreProbe):
    from tests.factories import WorkspaceFactory

    other = WorkspaceFactory()
    secret = b"secret = 1\n"
    services.blobs_upload_batch(workspace=other, stream=io.BytesIO(frame(secret)), actor=Actor(user=None))
    assert read_blob(api, workspace.slug, secret)[0] == 404
    assert api.post(f"workspaces/{workspace.slug}/blobs/missing", {"sha256": [sha(secret)]}).json() == {
        "missing": [sha(secret)]}


def test_a_blobs_own_file_must_be_exactly_its_size_while_a_pack_may_run_past_it(api: Api, workspace: Workspace,
                                                                                blob_dir: Path):
    small, big = b"s = 1\n", b"b" * (services.PACK_MAX_BLOB + 1)
    assert post_bundle(api, workspace.slug, frame(small) + frame(big)).status_code == 200
    own = blob_dir / str(workspace.pk) / sha(big)[:2] / sha(big)
    (pack,) = (blob_dir / str(workspace.pk) / "packs").iterdir()
    own.write_bytes(big + b"junk")  # a file that is not the blob's bytes any more
    with pack.open("ab") as f:
        f.write(b"bytes of no blob")  # the pack still holds every blob it had
    missing = api.post(f"workspaces/{workspace.slug}/blobs/missing", {"sha256": [sha(small), sha(big)]})
    assert missing.json() == {"missing": [sha(big)]}
