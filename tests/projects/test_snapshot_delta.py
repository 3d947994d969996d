"""Snapshots named by their manifest, and made from an earlier snapshot plus changes.

`POST snapshots/` takes the whole manifest (`files`) or `base` (a snapshot of the workspace),
`changes` and `removed`; a manifest the workspace already has a snapshot of returns that one.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest

from controlplane.choices import Role
from controlplane.models import AuditEvent, Workspace
from projects import manifests, services
from projects.models import Blob, Snapshot, SnapshotFile
from tests.conftest import Api, api_for
from tests.factories import MembershipFactory, WorkspaceFactory

pytestmark = pytest.mark.django_db


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(path: str, data: bytes, mode: int = 0o644) -> dict:
    return {"path": path, "sha256": sha(data), "size": len(data), "mode": mode}


def upload(api: Api, ws: str, *blobs: bytes) -> None:
    for data in blobs:
        response = api.client.put(f"/api/v1/workspaces/{ws}/blobs/{sha(data)}", data=data,
                                  content_type="application/octet-stream")
        assert response.status_code in (200, 201), response.content


def snapshots(ws: str) -> str:
    return f"workspaces/{ws}/snapshots/"


def manifest(api: Api, ws: str, snapshot_id: str) -> list[dict]:
    response = api.get(f"{snapshots(ws)}{snapshot_id}/")
    assert response.status_code == 200, response.content
    return response.json()["files"]


A, B, C, B2, D = b"a = 1\n", b"b = 1\n", b"c = 1\n", b"b = 2\n", b"d = 1\n"


@pytest.fixture
def base(api: Api, workspace: Workspace) -> str:
    """A snapshot of a.py, b.py and c.py; the blobs of B2 and D are uploaded too."""
    upload(api, workspace.slug, A, B, C, B2, D)
    response = api.post(snapshots(workspace.slug), {"files": [entry("a.py", A), entry("b.py", B), entry("c.py", C)]})
    assert response.status_code == 201, response.content
    return response.json()["id"]


def test_a_snapshot_from_a_base_holds_the_base_with_the_changes_and_without_the_removed(
    api: Api, workspace: Workspace, base: str
):
    # when: b.py changes (and becomes executable), d.py is new, c.py is gone
    response = api.post(snapshots(workspace.slug), {
        "base": base, "changes": [entry("b.py", B2, 0o755), entry("d/d.py", D)], "removed": ["c.py"]})
    # then
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"] != base
    assert (body["file_count"], body["total_size"]) == (3, len(A) + len(B2) + len(D))
    assert manifest(api, workspace.slug, body["id"]) == [entry("a.py", A), entry("b.py", B2, 0o755),
                                                         entry("d/d.py", D)]
    assert SnapshotFile.objects.filter(snapshot_id=body["id"]).count() == 3
    # and the base is as it was
    assert manifest(api, workspace.slug, base) == [entry("a.py", A), entry("b.py", B), entry("c.py", C)]
    event = AuditEvent.objects.get(workspace=workspace, action="snapshot.create", target_id=body["id"])
    assert event.data == {"file_count": 3, "total_size": len(A) + len(B2) + len(D), "base": base}


def test_a_mode_change_alone_is_a_change(api: Api, workspace: Workspace, base: str):
    response = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("a.py", A, 0o700)]})
    assert response.status_code == 201, response.content
    assert manifest(api, workspace.slug, response.json()["id"])[0] == entry("a.py", A, 0o700)


def test_the_same_manifest_again_is_the_same_snapshot_200(api: Api, workspace: Workspace, base: str):
    files = [entry("c.py", C), entry("a.py", A), entry("b.py", B)]  # another order: the same manifest
    again = api.post(snapshots(workspace.slug), {"files": files})
    assert again.status_code == 200, again.content
    assert again.json()["id"] == base
    assert set(again.json()) == {"id", "file_count", "total_size", "created_at"}
    # a base without changes is itself
    same = api.post(snapshots(workspace.slug), {"base": base, "changes": [], "removed": []})
    assert (same.status_code, same.json()["id"]) == (200, base)
    assert Snapshot.objects.count() == 1 and SnapshotFile.objects.count() == 3
    assert AuditEvent.objects.filter(action="snapshot.create").count() == 1


def test_changes_that_come_back_to_an_earlier_tree_return_its_snapshot(api: Api, workspace: Workspace, base: str):
    edited = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("b.py", B2)]}).json()["id"]
    back = api.post(snapshots(workspace.slug), {"base": edited, "changes": [entry("b.py", B)]})
    assert (back.status_code, back.json()["id"]) == (200, base)
    whole = api.post(snapshots(workspace.slug), {"files": [entry("a.py", A), entry("b.py", B2), entry("c.py", C)]})
    assert (whole.status_code, whole.json()["id"]) == (200, edited)
    # a different mode is a different tree
    other = api.post(snapshots(workspace.slug), {"files": [entry("a.py", A, 0o755), entry("b.py", B),
                                                           entry("c.py", C)]})
    assert other.status_code == 201


def test_the_same_manifest_in_another_workspace_is_another_snapshot(api: Api, workspace: Workspace, base: str):
    other = WorkspaceFactory(slug="other")
    theirs = api_for(MembershipFactory(workspace=other, role=Role.OWNER).user)
    upload(theirs, other.slug, A, B, C)
    response = theirs.post(snapshots(other.slug), {"files": [entry("a.py", A), entry("b.py", B), entry("c.py", C)]})
    assert response.status_code == 201 and response.json()["id"] != base


def test_a_base_of_another_workspace_is_400_naming_base(api: Api, workspace: Workspace, base: str):
    other = WorkspaceFactory(slug="other")
    theirs = api_for(MembershipFactory(workspace=other, role=Role.OWNER).user)
    upload(theirs, other.slug, A)
    their_base = theirs.post(snapshots(other.slug), {"files": [entry("a.py", A)]}).json()["id"]
    response = api.post(snapshots(workspace.slug), {"base": their_base, "changes": [entry("b.py", B)]})
    assert response.status_code == 400, response.content
    assert list(response.json()["error"]["fields"]) == ["base"]
    assert Snapshot.objects.filter(workspace=workspace).count() == 1


@pytest.mark.parametrize("base_id", [str(uuid.uuid4()), "not-a-uuid", 7])
def test_an_unknown_or_malformed_base_is_400_naming_base(api: Api, workspace: Workspace, base: str, base_id):
    response = api.post(snapshots(workspace.slug), {"base": base_id, "changes": [], "removed": []})
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "validation_error"
    assert list(response.json()["error"]["fields"]) == ["base"]


def test_a_removed_path_not_in_the_base_is_400_naming_it(api: Api, workspace: Workspace, base: str):
    response = api.post(snapshots(workspace.slug), {"base": base, "removed": ["a.py", "nope.py"]})
    assert response.status_code == 400, response.content
    fields = response.json()["error"]["fields"]
    assert fields == {"removed": {"1": ["nope.py is not a file of the base snapshot."]}}
    both = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("a.py", B)], "removed": ["a.py"]})
    assert both.status_code == 400 and "0" in both.json()["error"]["fields"]["removed"]
    assert Snapshot.objects.count() == 1


@pytest.mark.parametrize(("body", "field"), [
    ({"changes": [entry("../x.py", A)]}, "changes"),
    ({"changes": [entry("x.py", A), entry("x.py", B)]}, "changes"),
    ({"changes": [{**entry("x.py", A), "size": "6"}]}, "changes"),
    ({"removed": ["a.py", "a.py"]}, "removed"),
    ({"removed": ["/etc/passwd"]}, "removed"),
    ({"removed": [3]}, "removed"),
    ({"removed": "a.py"}, "removed"),
    ({"extra": 1}, "extra"),
])
def test_malformed_changes_are_refused_like_files(api: Api, workspace: Workspace, base: str, body: dict, field: str):
    response = api.post(snapshots(workspace.slug), {"base": base, **body})
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"], response.json()
    assert Snapshot.objects.count() == 1


@pytest.mark.parametrize("body", [
    {},
    {"changes": [], "removed": []},
    {"files": [], "base": str(uuid.uuid4())},
    {"files": [], "removed": []},
])
def test_files_or_base_exactly_one(api: Api, workspace: Workspace, body: dict):
    response = api.post(snapshots(workspace.slug), body)
    assert response.status_code == 400, response.content
    assert set(response.json()["error"]["fields"]) & {"files", "base", "removed"}


def test_a_change_whose_blob_is_missing_or_of_another_size_is_400(api: Api, workspace: Workspace, base: str):
    never = b"never uploaded"
    response = api.post(snapshots(workspace.slug), {
        "base": base, "changes": [entry("d.py", D), entry("n.py", never), {**entry("s.py", D), "size": 99}]})
    assert response.status_code == 400, response.content
    fields = response.json()["error"]["fields"]
    assert fields["missing"] == [sha(never)]
    assert set(fields["changes"]) == {"1", "2"}
    assert "99" in fields["changes"]["2"]["size"][0]
    assert Snapshot.objects.count() == 1


def test_a_base_blob_lost_since_is_missing_and_the_request_works_once_it_is_back(
    api: Api, workspace: Workspace, base: str
):
    Blob.objects.filter(workspace=workspace, sha256=sha(A)).delete()
    # a delta that keeps a.py needs it
    response = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("d.py", D)]})
    assert response.status_code == 400, response.content
    assert response.json()["error"]["fields"]["missing"] == [sha(A)]
    # so does the same manifest again: it is not handed back while a blob is lost
    again = api.post(snapshots(workspace.slug), {"files": [entry("a.py", A), entry("b.py", B), entry("c.py", C)]})
    assert again.status_code == 400 and again.json()["error"]["fields"]["missing"] == [sha(A)]
    # a delta that removes a.py does not need it
    without = api.post(snapshots(workspace.slug), {"base": base, "removed": ["a.py"]})
    assert without.status_code == 201, without.content
    # once a.py is uploaded again, both work, and the same manifest is the base again
    upload(api, workspace.slug, A)
    assert api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("d.py", D)]}).status_code == 201
    again = api.post(snapshots(workspace.slug), {"files": [entry("a.py", A), entry("b.py", B), entry("c.py", C)]})
    assert (again.status_code, again.json()["id"]) == (200, base)


def test_a_delta_past_the_file_limit_is_400(api: Api, workspace: Workspace, base: str,
                                            monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(services, "MAX_SNAPSHOT_FILES", 4)
    response = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("d.py", D), entry("e.py", D)]})
    assert response.status_code == 400 and "at most 4" in response.json()["error"]["fields"]["changes"][0]


def test_many_changes_and_removals(api: Api, workspace: Workspace):
    # more than a batch of paths to leave out of the copy
    upload(api, workspace.slug, A, B)
    files = [entry(f"m/{i:04d}.py", A) for i in range(1200)]
    base_id = api.post(snapshots(workspace.slug), {"files": files}).json()["id"]
    changes = [entry(f"m/{i:04d}.py", B) for i in range(0, 1200, 2)]
    removed = [f"m/{i:04d}.py" for i in range(1, 1200, 4)]
    response = api.post(snapshots(workspace.slug), {"base": base_id, "changes": changes, "removed": removed})
    assert response.status_code == 201, response.content
    expected = {f"m/{i:04d}.py": sha(B if i % 2 == 0 else A) for i in range(1200) if i % 4 != 1}
    shown = {f["path"]: f["sha256"] for f in manifest(api, workspace.slug, response.json()["id"])}
    assert shown == expected
    assert response.json()["file_count"] == len(expected)


def test_a_viewer_cannot_make_a_snapshot_from_a_base(workspace: Workspace, base: str, member_api):
    viewer = member_api(workspace, Role.VIEWER)
    assert viewer.post(snapshots(workspace.slug), {"base": base}).status_code == 403


def test_the_digest_is_the_sha256_of_the_sum_of_the_entries_shake_numbers():
    rows = [("b", "1" * 64, 2, 420), ("a/b", "0" * 64, 1, 493), ("a", "2" * 64, 0, 420)]
    numbers = [int.from_bytes(hashlib.shake_256(f"{p}\0{h}\0{s}\0{m}\n".encode()).digest(512), "little")
               for p, h, s, m in rows]
    total = (sum(numbers) % 2**4096).to_bytes(512, "little")
    assert manifests.manifest_digest(rows) == hashlib.sha256(total).hexdigest()
    assert manifests.manifest_digest(reversed(rows)) == manifests.manifest_digest(rows)
    assert manifests.manifest_digest([]) == hashlib.sha256(bytes(512)).hexdigest()
    # one entry more or less moves the sum by its number alone
    assert manifests.digest_of((manifests.state_of(rows[:2]) + numbers[2]) % manifests.MODULUS) == \
        manifests.manifest_digest(rows)


def test_a_digest_that_the_result_does_not_have_is_400_naming_digest(api: Api, workspace: Workspace, base: str):
    wanted = [("a.py", sha(A), len(A), 0o644), ("b.py", sha(B2), len(B2), 0o644), ("c.py", sha(C), len(C), 0o644)]
    right = manifests.manifest_digest(wanted)
    wrong = manifests.manifest_digest(wanted[:2])
    refused = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("b.py", B2)], "digest": wrong})
    assert refused.status_code == 400, refused.content
    assert list(refused.json()["error"]["fields"]) == ["digest"]
    assert Snapshot.objects.count() == 1
    made = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("b.py", B2)], "digest": right})
    assert made.status_code == 201, made.content
    assert Snapshot.objects.get(pk=made.json()["id"]).digest == right
    # the same check for an empty delta (the base itself) and for a whole manifest
    assert api.post(snapshots(workspace.slug), {"base": base, "digest": right}).status_code == 400
    whole = {"files": [entry("a.py", A), entry("b.py", B2), entry("c.py", C)]}
    assert api.post(snapshots(workspace.slug), {**whole, "digest": wrong}).status_code == 400
    again = api.post(snapshots(workspace.slug), {**whole, "digest": right})
    assert (again.status_code, again.json()["id"]) == (200, made.json()["id"])
    assert api.post(snapshots(workspace.slug), {**whole, "digest": "X" * 64}).status_code == 400


# --- layers: a snapshot made from another writes only what changed ---------------------------------


def test_snapshots_made_one_from_another_are_layers_over_the_first_never_deeper(api: Api, workspace: Workspace):
    upload(api, workspace.slug, A, B, B2, C, D)
    files = [entry(f"m/{i:03d}.py", A) for i in range(300)]
    first = api.post(snapshots(workspace.slug), {"files": files}).json()["id"]
    expected = {f["path"]: f for f in files}
    steps = [
        ({"changes": [entry("m/000.py", B)]}, 1),  # rows in the new layer
        ({"changes": [entry("new.py", C)], "removed": ["m/001.py"]}, 3),
        ({"changes": [entry("m/000.py", B2, 0o755)], "removed": ["new.py"]}, 3),  # new.py: a tombstone
        ({"changes": [entry("m/001.py", D)]}, 3),  # back, with other bytes
    ]
    base = first
    for body, rows in steps:
        response = api.post(snapshots(workspace.slug), {"base": base, **body})
        assert response.status_code == 201, response.content
        base = response.json()["id"]
        for f in body.get("changes", []):
            expected[f["path"]] = f
        for path in body.get("removed", []):
            del expected[path]
        snapshot = Snapshot.objects.get(pk=base)
        # then: a layer over the first snapshot holding the changes since it, read back as the whole tree
        assert str(snapshot.root_id) == first
        assert SnapshotFile.objects.filter(snapshot=snapshot).count() == rows
        assert manifest(api, workspace.slug, base) == sorted(expected.values(), key=lambda f: f["path"])
        assert (snapshot.file_count, snapshot.total_size) == (len(expected), sum(f["size"] for f in expected.values()))
        assert snapshot.digest == manifests.manifest_digest(
            (f["path"], f["sha256"], f["size"], f["mode"]) for f in expected.values())
    # and the same tree sent whole is that layer
    again = api.post(snapshots(workspace.slug), {"files": list(expected.values())})
    assert (again.status_code, again.json()["id"]) == (200, base)


def test_a_layer_that_would_hold_a_large_share_of_its_files_is_written_whole(api: Api, workspace: Workspace):
    upload(api, workspace.slug, A, B)
    files = [entry(f"m/{i:03d}.py", A) for i in range(400)]
    first = api.post(snapshots(workspace.slug), {"files": files}).json()["id"]
    small = api.post(snapshots(workspace.slug), {"base": first, "changes": [entry(f"m/{i:03d}.py", B)
                                                                            for i in range(100)]}).json()["id"]
    assert str(Snapshot.objects.get(pk=small).root_id) == first  # 100 of 400: a layer
    # when: more files change from that layer: 101 of 400 differ from the first snapshot
    response = api.post(snapshots(workspace.slug), {"base": small, "changes": [entry("m/399.py", B)]})
    # then: the new snapshot is whole, and what follows it is a layer over it
    assert response.status_code == 201, response.content
    whole = Snapshot.objects.get(pk=response.json()["id"])
    assert whole.root_id is None and SnapshotFile.objects.filter(snapshot=whole).count() == 400
    shown = {f["path"]: f["sha256"] for f in manifest(api, workspace.slug, str(whole.pk))}
    assert shown == {f"m/{i:03d}.py": sha(B if i < 100 or i == 399 else A) for i in range(400)}
    after = api.post(snapshots(workspace.slug), {"base": str(whole.pk), "removed": ["m/000.py"]}).json()["id"]
    assert Snapshot.objects.get(pk=after).root_id == whole.pk


def test_a_lost_blob_counts_only_where_the_layer_keeps_it(api: Api, workspace: Workspace, base: str):
    layer = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("a.py", D)]}).json()["id"]
    # the first snapshot's a.py is replaced in the layer: losing its blob does not touch the layer
    Blob.objects.filter(workspace=workspace, sha256=sha(A)).delete()
    ok = api.post(snapshots(workspace.slug), {"base": layer, "changes": [entry("e.py", B2)]})
    assert ok.status_code == 201, ok.content
    # the layer's own d-bytes at a.py, lost, are missing; so are the root's b.py bytes it keeps
    Blob.objects.filter(workspace=workspace, sha256__in=[sha(D), sha(B)]).delete()
    refused = api.post(snapshots(workspace.slug), {"base": layer, "changes": [entry("f.py", C)]})
    assert refused.status_code == 400, refused.content
    assert sorted(refused.json()["error"]["fields"]["missing"]) == sorted([sha(B), sha(D)])


def test_a_root_is_not_deleted_from_under_its_layers(api: Api, workspace: Workspace, base: str):
    from django.db.models import RestrictedError

    layer = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("d.py", D)]}).json()["id"]
    with pytest.raises(RestrictedError):
        Snapshot.objects.filter(pk=base).delete()
    assert manifest(api, workspace.slug, layer)[-1] == entry("d.py", D)
    Snapshot.objects.filter(pk=layer).delete()
    Snapshot.objects.filter(pk=base).delete()
    assert not SnapshotFile.objects.exists()


def test_a_bases_blobs_are_looked_at_again_only_after_a_blob_of_the_workspace_was_deleted(
    api: Api, workspace: Workspace, base: str
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def made_from_base(data: bytes) -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            response = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("new.py", data)]})
        assert response.status_code == 201, response.content
        return [q["sql"] for q in queries.captured_queries if "NOT EXISTS" in q["sql"]]

    assert made_from_base(D) == []  # nothing deleted since the base was written: its rows are not read
    Blob.objects.filter(workspace=workspace, sha256=sha(C)).delete()
    assert not Snapshot.objects.filter(blobs_held=True).exists()
    upload(api, workspace.slug, C)
    assert len(made_from_base(B2)) == 1  # read once, found whole ...
    assert Snapshot.objects.get(pk=base).blobs_held
    assert made_from_base(A) == []  # ... and known to be so


# --- small new blobs sent with the snapshot: one request ----------------------------------------------


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_small_new_blobs_may_come_with_the_snapshot_in_one_request(api: Api, workspace: Workspace, base: str):
    new = b"brand new\n"
    response = api.post(snapshots(workspace.slug), {"base": base, "changes": [entry("n.py", new)],
                                                    "blobs": {sha(new): b64(new)}})
    assert response.status_code == 201, response.content
    assert manifest(api, workspace.slug, response.json()["id"])[-1] == entry("n.py", new)
    assert Blob.objects.get(workspace=workspace, sha256=sha(new)).size == len(new)
    assert AuditEvent.objects.filter(action="blob.upload", target_id=sha(new)).count() == 1
    # a whole manifest too, and a blob the workspace has already is no trouble
    whole = api.post(snapshots(workspace.slug), {"files": [entry("a.py", A), entry("n.py", new)],
                                                 "blobs": {sha(new): b64(new), sha(A): b64(A)}})
    assert whole.status_code == 201, whole.content


def test_inline_bytes_that_do_not_match_their_hash_are_400_naming_it_and_nothing_is_kept(
    api: Api, workspace: Workspace, base: str
):
    new, other = b"brand new\n", b"something else\n"
    response = api.post(snapshots(workspace.slug), {
        "base": base, "changes": [entry("n.py", new), entry("o.py", other)],
        "blobs": {sha(new): b64(new), sha(other): b64(b"changed since it was hashed\n")}})
    assert response.status_code == 400, response.content
    assert list(response.json()["error"]["fields"]["blobs"]) == [sha(other)]
    assert not Blob.objects.filter(sha256__in=[sha(new), sha(other)]).exists()
    assert Snapshot.objects.count() == 1


@pytest.mark.parametrize("blobs", [
    {"not-a-hash": "eA=="},
    {sha(b"x"): "not base64!"},
    {sha(b"x"): 7},
    ["eA=="],
    {sha(b"x" * (1024 * 1024 + 1)): b64(b"x" * (1024 * 1024 + 1))},
])
def test_malformed_or_too_large_inline_blobs_are_400_naming_blobs(api: Api, workspace: Workspace, base: str, blobs):
    response = api.post(snapshots(workspace.slug), {"base": base, "changes": [], "blobs": blobs})
    assert response.status_code == 400, response.content
    assert list(response.json()["error"]["fields"]) == ["blobs"]
    assert Blob.objects.filter(workspace=workspace).count() == 5
