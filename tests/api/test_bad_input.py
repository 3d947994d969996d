"""Bad input: a 400 in the contract's shape with per-field messages, and nothing written."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from clusters.choices import ClusterStatus
from clusters.models import Cluster, ClusterEvent, Node, NodeGroup
from controlplane.models import ApiToken, AuditEvent, Membership, Workspace
from tests.conftest import Api
from tests.factories import ClusterFactory

pytestmark = pytest.mark.django_db

SPEC: dict[str, Any] = {
    "name": "train-1",
    "provider": "local",
    "head": {"instance_type": "local.small"},
    "worker_groups": [{"name": "cpu", "instance_type": "local.small", "min_workers": 0, "max_workers": 4}],
    "idle_timeout_minutes": 5,
    "tags": {"team": "ml"},
}


def counts() -> dict[str, int]:
    models = (Cluster, NodeGroup, Node, ClusterEvent, AuditEvent, Workspace, Membership, ApiToken)
    return {m.__name__: m.objects.count() for m in models}


def spec_with(path: str, value: Any) -> dict:
    """SPEC with `path` ("worker_groups.0.max_workers") set to `value`."""
    spec = copy.deepcopy(SPEC)
    *parents, last = path.split(".")
    here: Any = spec
    for key in parents:
        here = here[int(key)] if key.isdigit() else here[key]
    here[int(last) if last.isdigit() else last] = value
    return spec


def assert_400(response, fields: dict | None = None) -> dict:
    assert response.status_code == 400, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "fields"}
    assert body["error"]["code"] in ("validation_error", "parse_error")
    assert body["error"]["message"]
    if fields is not None:
        assert _subset(fields, body["error"]["fields"]), body["error"]["fields"]
    return body["error"]


def _subset(expected: Any, actual: Any) -> bool:
    """Every key path of `expected` is in `actual`; a leaf string must occur in one of the messages."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _subset(v, actual[k]) for k, v in expected.items())
    return isinstance(actual, list) and any(expected in str(message) for message in actual)


@pytest.fixture
def clusters_url(workspace: Workspace) -> str:
    return f"workspaces/{workspace.slug}/clusters/"


def test_a_valid_spec_is_accepted(api: Api, clusters_url: str):
    response = api.post(clusters_url, SPEC)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == ClusterStatus.PENDING
    assert body["worker_groups"][0]["max_workers"] == 4
    assert body["runtime"]["ray_version"]


MAX = "worker_groups.0.max_workers"
MIN = "worker_groups.0.min_workers"
BAD_SPECS = [
    (MAX, "4", {"worker_groups": {"0": {"max_workers": "valid integer"}}}),
    (MAX, 4.5, {"worker_groups": {"0": {"max_workers": "valid integer"}}}),
    (MAX, 4.0, {"worker_groups": {"0": {"max_workers": "valid integer"}}}),
    (MAX, True, {"worker_groups": {"0": {"max_workers": "valid integer"}}}),
    (MAX, None, {"worker_groups": {"0": {"max_workers": "null"}}}),
    (MAX, [4], {"worker_groups": {"0": {"max_workers": "valid integer"}}}),
    (MAX, -1, {"worker_groups": {"0": {"max_workers": "greater than or equal to 0"}}}),
    (MAX, 10**6, {"worker_groups": {"0": {"max_workers": "less than or equal to"}}}),
    (MAX, 10**30, {"worker_groups": {"0": {"max_workers": "less than or equal to"}}}),
    (MIN, -5, {"worker_groups": {"0": {"min_workers": "greater than or equal to 0"}}}),
    (MIN, 5, {"worker_groups": {"0": {"min_workers": "must not exceed max_workers"}}}),
    (MIN, 10**30, {"worker_groups": {"0": {"min_workers": "must not exceed"}}}),
    ("worker_groups.0.spot", "yes", {"worker_groups": {"0": {"spot": "boolean"}}}),
    ("worker_groups.0.spot", 1, {"worker_groups": {"0": {"spot": "boolean"}}}),
    ("worker_groups.0.instance_type", "m5.24xlarge",
     {"worker_groups": {"0": {"instance_type": "Unknown instance type"}}}),
    ("worker_groups.0.name", "head", {"worker_groups": {"0": {"name": "reserved"}}}),
    ("worker_groups.0.name", "CPU!", {"worker_groups": {"0": {"name": "lowercase"}}}),
    ("worker_groups.0.surprise", 1, {"worker_groups": {"0": {"surprise": "Unknown field"}}}),
    ("worker_groups", {"name": "cpu"}, {"worker_groups": {"non_field_errors": "list"}}),
    ("worker_groups", "cpu", {"worker_groups": {"non_field_errors": "list"}}),
    ("head.instance_type", "gpu.huge", {"head": {"instance_type": "Unknown instance type"}}),
    ("head.instance_type", 7, {"head": {"instance_type": "valid string"}}),
    ("head", None, {"head": "null"}),
    ("head.extra", True, {"head": {"extra": "Unknown field"}}),
    ("name", "x" * 200, {"name": "no more than 63"}),
    ("name", "Train_1", {"name": "lowercase"}),
    ("name", "", {"name": "blank"}),
    ("name", 12, {"name": "valid string"}),
    ("name", None, {"name": "null"}),
    ("provider", "aws", {"provider": "Unknown or disabled provider"}),
    ("cloud_account", "acc-1", {"cloud_account": "not available"}),
    ("idle_timeout_minutes", "5", {"idle_timeout_minutes": "valid number"}),
    ("idle_timeout_minutes", -1, {"idle_timeout_minutes": "greater than or equal to 0"}),
    ("idle_timeout_minutes", 1e300, {"idle_timeout_minutes": "less than or equal to"}),
    ("idle_timeout_minutes", 10**400, {"idle_timeout_minutes": ""}),
    ("idle_timeout_minutes", False, {"idle_timeout_minutes": "valid number"}),
    ("auto_stop_minutes", 0, {"auto_stop_minutes": "greater than or equal to 1"}),
    ("tags", ["a"], {"tags": "object"}),
    ("tags", {"team": 5}, {"tags": "must be a string"}),
    ("tags", {"bad key!": "x"}, {"tags": "not a valid key"}),
    ("runtime", {"ray_version": "1.0.0"}, {"runtime": {"ray_version": "bundled"}}),
    ("runtime", {"pip": "numpy"}, {"runtime": {"pip": "list"}}),
    ("runtime", {"env": {"1BAD": "x"}}, {"runtime": {"env": "not a valid key"}}),
    ("unknown_field", 1, {"unknown_field": "Unknown field"}),
]


@pytest.mark.parametrize(("path", "value", "fields"), BAD_SPECS,
                         ids=[f"{p}={json.dumps(v)[:20]}" for p, v, _ in BAD_SPECS])
def test_a_bad_spec_is_400_with_per_field_messages_and_writes_nothing(
    api: Api, clusters_url: str, path: str, value: Any, fields: dict
):
    before = counts()
    assert_400(api.post(clusters_url, spec_with(path, value)), fields)
    assert counts() == before


def test_every_mistake_is_reported_at_once(api: Api, clusters_url: str):
    spec = spec_with("name", "Bad Name")
    spec["head"]["instance_type"] = "nope"  # reported only once the fields are well-formed
    spec["worker_groups"] = [{"name": "cpu", "instance_type": "local.small", "max_workers": "4"}, {"oops": 1}]
    error = assert_400(api.post(clusters_url, spec))
    assert set(error["fields"]) >= {"name", "worker_groups"}
    assert set(error["fields"]["worker_groups"]["0"]) == {"max_workers"}
    assert {"oops", "name", "instance_type", "max_workers"} <= set(error["fields"]["worker_groups"]["1"])


def test_duplicate_worker_group_names_are_refused(api: Api, clusters_url: str):
    spec = copy.deepcopy(SPEC)
    spec["worker_groups"] = [spec["worker_groups"][0], dict(spec["worker_groups"][0])]
    assert_400(api.post(clusters_url, spec), {"worker_groups": {"1": {"name": "unique"}}})


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ('{"name": "x",', "parse_error"),
        ("not json", "parse_error"),
        ('{"name": NaN}', "parse_error"),
        ("[]", "validation_error"),
        ('[{"name": "train-1"}]', "validation_error"),
        ('"train-1"', "validation_error"),
        ("null", "validation_error"),
        ("42", "validation_error"),
        ("", "validation_error"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(api: Api, clusters_url: str, raw: str, code: str):
    before = counts()
    error = assert_400(api.request("POST", clusters_url, raw=raw))
    assert error["code"] == code
    assert counts() == before


def test_a_duplicate_live_name_is_400_and_a_terminated_one_is_free(api: Api, clusters_url: str,
                                                                  workspace: Workspace):
    assert api.post(clusters_url, SPEC).status_code == 201
    before = counts()
    assert_400(api.post(clusters_url, SPEC), {"name": "already exists"})
    assert counts() == before
    Cluster.objects.filter(name="train-1").update(status=ClusterStatus.TERMINATED)
    assert api.post(clusters_url, SPEC).status_code == 201


@pytest.fixture
def cluster(workspace: Workspace) -> Cluster:
    return ClusterFactory(workspace=workspace, name="train-1", status=ClusterStatus.RUNNING,
                          groups=[{"name": "cpu", "min_workers": 1, "max_workers": 2}])


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"name": "renamed"}, {"name": "Cannot be changed"}),
        ({"head": {"instance_type": "local.medium"}}, {"head": "Cannot be changed"}),
        ({"provider": "local", "region": "x"}, {"provider": "Cannot be changed", "region": "Cannot be changed"}),
        ({"worker_groups": [{"name": "cpu", "instance_type": "local.medium", "max_workers": 2}]},
         {"worker_groups": {"0": {"instance_type": "cannot change"}}}),
        ({"worker_groups": [{"name": "cpu", "instance_type": "local.small", "min_workers": 3, "max_workers": 2}]},
         {"worker_groups": {"0": {"min_workers": "must not exceed"}}}),
        ({"idle_timeout_minutes": "10"}, {"idle_timeout_minutes": "valid number"}),
        ({"status": "STOPPED"}, {"status": "Unknown field"}),
        ([{"tags": {}}], {"non_field_errors": "JSON object"}),
    ],
)
def test_a_bad_patch_is_400_and_changes_nothing(api: Api, workspace: Workspace, cluster: Cluster, body: Any,
                                               fields: dict):
    before = (counts(), list(Cluster.objects.values()), list(NodeGroup.objects.values()))
    assert_400(api.patch(f"workspaces/{workspace.slug}/clusters/{cluster.name}/", body), fields)
    assert (counts(), list(Cluster.objects.values()), list(NodeGroup.objects.values())) == before


def test_start_of_a_running_cluster_is_409(api: Api, workspace: Workspace, cluster: Cluster):
    before = counts()
    response = api.post(f"workspaces/{workspace.slug}/clusters/{cluster.name}/start/")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert "RUNNING" in response.json()["error"]["message"]
    assert counts() == before
    cluster.refresh_from_db()
    assert cluster.status == ClusterStatus.RUNNING


def test_stop_of_a_stopped_cluster_is_409_and_delete_twice_is_fine(api: Api, workspace: Workspace):
    ClusterFactory(workspace=workspace, name="idle", status=ClusterStatus.STOPPED)
    url = f"workspaces/{workspace.slug}/clusters/idle/"
    assert api.post(url + "stop/").status_code == 409
    assert api.delete(url).json()["status"] == ClusterStatus.TERMINATING
    assert api.delete(url).status_code == 202
    assert api.post(url + "start/").status_code == 409


# --- workspaces, members, tokens --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"slug": "required"}),
        ({"slug": "Has Caps"}, {"slug": "lowercase"}),
        ({"slug": "a" * 64}, {"slug": "63"}),
        ({"slug": 5}, {"slug": "lowercase"}),
        ({"slug": "ok", "name": 5}, {"name": "valid string"}),
        ({"slug": "ok", "name": "n" * 201}, {"name": "200"}),
        ({"slug": "ok", "owner": "me"}, {"owner": "Unknown field"}),
        (["ok"], {"non_field_errors": "JSON object"}),
    ],
)
def test_bad_workspace_create_is_400(api: Api, body: Any, fields: dict):
    before = counts()
    assert_400(api.post("workspaces/", body), fields)
    assert counts() == before


def test_a_taken_workspace_slug_is_400(api: Api, workspace: Workspace):
    before = counts()
    assert_400(api.post("workspaces/", {"slug": workspace.slug}), {"slug": "already exists"})
    assert counts() == before


def test_bad_workspace_patch_is_400(api: Api, workspace: Workspace):
    for body, fields in (({"name": None}, {"name": "null"}), ({"name": ""}, {"name": "blank"}),
                         ({"slug": "new"}, {"slug": "Unknown field"})):
        assert_400(api.patch(f"workspaces/{workspace.slug}/", body), fields)
    assert Workspace.objects.get(pk=workspace.pk).name == workspace.name
    before = counts()
    assert api.patch(f"workspaces/{workspace.slug}/", {}).json()["name"] == workspace.name  # PATCH of nothing
    assert counts() == before


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"email": "not-an-email", "role": "member"}, {"email": "valid email"}),
        ({"email": "a@example.com", "role": "god"}, {"role": "not a valid choice"}),
        ({"email": "a@example.com", "role": ["member"]}, {"role": "not a valid choice"}),
        ({"email": 5, "role": "member"}, {"email": "valid email"}),
        ({"role": "member"}, {"email": "required"}),
        ({"email": "a@" + "b" * 150 + ".example.com", "role": "member"}, {"email": "150"}),
        ({"email": "a@example.com", "role": "member", "admin": True}, {"admin": "Unknown field"}),
    ],
)
def test_bad_member_add_is_400(api: Api, workspace: Workspace, body: Any, fields: dict):
    before = counts()
    assert_400(api.post(f"workspaces/{workspace.slug}/members/", body), fields)
    assert counts() == before


def test_bad_member_patch_is_400(api: Api, workspace: Workspace, user):
    url = f"workspaces/{workspace.slug}/members/{user.pk}/"
    assert_400(api.patch(url, {"role": "boss"}), {"role": "not a valid choice"})
    assert_400(api.patch(url, {"role": None}), {"role": "null"})
    assert api.patch(url, {}).json()["role"] == "owner"  # PATCH of nothing changes nothing
    assert api.patch(f"workspaces/{workspace.slug}/members/999999/", {"role": "viewer"}).status_code == 404


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"name": "required"}),
        ({"name": ""}, {"name": "blank"}),
        ({"name": "x" * 101}, {"name": "100"}),
        ({"name": "ci", "expires_in_days": 0}, {"expires_in_days": "greater than or equal to 1"}),
        ({"name": "ci", "expires_in_days": 10**9}, {"expires_in_days": "less than or equal to"}),
        ({"name": "ci", "expires_in_days": "30"}, {"expires_in_days": "valid integer"}),
        ({"name": "ci", "expires_in_days": 1.5}, {"expires_in_days": "valid integer"}),
        ({"name": "ci", "scopes": ["all"]}, {"scopes": "Unknown field"}),
    ],
)
def test_bad_token_create_is_400(api: Api, body: Any, fields: dict):
    before = counts()
    assert_400(api.post("tokens/", body), fields)
    assert counts() == before


@pytest.mark.parametrize("query", ["page_size=abc", "page_size=0", "page_size=-1", "page_size="])
def test_a_bad_page_size_is_400(api: Api, query: str):
    assert_400(api.get(f"workspaces/?{query}"), {"page_size": "positive whole number"})


def test_unknown_catalog_provider_is_400(api: Api):
    assert_400(api.get("catalog/instance-types/?provider=aws"), {"provider": "Unknown"})
    types = api.get("catalog/instance-types/?provider=local").json()
    assert {t["name"] for t in types} == {"local.small", "local.medium", "local.gpu"}


def test_bad_heartbeat_is_400(api: Api):
    # A heartbeat body is checked only after the node token; an unauthenticated one is 401 first.
    assert Api().post("/api/agent/v1/register", {"bootstrap_token": 5}).status_code == 400
    assert Api().post("/api/agent/v1/register", {"bootstrap_token": "cub_x", "address": "nowhere"}).status_code == 400
    assert Api().post("/api/agent/v1/register", ["cub_x"]).status_code == 400
