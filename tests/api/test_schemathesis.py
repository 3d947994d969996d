"""Property-based run of the whole API against its own OpenAPI schema: no 5xx, no schema violation."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis import checks

from clusters.choices import ClusterStatus, NodeRole, NodeState
from controlplane.choices import Role
from controlplane.services import Actor
from controlplane.wsgi import application
from projects.services import blob_upload, snapshot_create
from tests.conftest import api_for
from tests.factories import ClusterFactory, MembershipFactory, NodeFactory, UserFactory, WorkspaceFactory

# Loaded in-process through the WSGI app; generating the schema needs no database.
schema = schemathesis.openapi.from_wsgi("/api/schema/", application)


@pytest.fixture
def in_test_transaction() -> Iterator[None]:
    """Keep the test's connection across requests, as Django's own test client does.

    The WSGI handler closes the connection when a request finishes, which would end the
    test transaction that holds `world`.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def world(db: None, in_test_transaction: None, settings, tmp_path) -> dict:
    """A user who owns a workspace with a running cluster (head, worker, events) and a second member."""
    owner = UserFactory()
    workspace = WorkspaceFactory(slug="acme")
    MembershipFactory(workspace=workspace, user=owner, role=Role.OWNER)
    MembershipFactory(workspace=workspace, role=Role.VIEWER)
    cluster = ClusterFactory(workspace=workspace, name="train", status=ClusterStatus.RUNNING)
    NodeFactory(cluster=cluster, role=NodeRole.HEAD, state=NodeState.READY)
    NodeFactory(cluster=cluster, state=NodeState.BOOTING)
    settings.CUMULUS_BLOB_DIR = str(tmp_path / "blobs")
    digest = hashlib.sha256(b"print(1)\n").hexdigest()
    blob_upload(workspace=workspace, sha256=digest, chunks=[b"print(1)\n"], actor=Actor(user=owner))
    snap = snapshot_create(workspace=workspace, actor=Actor(user=owner),
                           files=[{"path": "main.py", "sha256": digest, "size": 9, "mode": 420}])
    api = api_for(owner)
    return {"token": api.token, "path": {"ws": workspace.slug, "name": cluster.name, "user": str(owner.pk),
                                         "sha256": digest, "snapshot_id": str(snap.pk)}}


# Two checks judge how precisely the schema describes valid input, which OpenAPI cannot do
# here: a unique live name or slug, instance types per provider, min_workers <= max_workers,
# the bundled Ray version and IP-address agent fields are checked by the server (and tested
# in test_bad_input.py), and Django cannot refuse arbitrary extra headers. Every other
# default check runs: no 5xx, documented status codes, response schemas, content types...
NOT_EXPRESSIBLE = [checks.positive_data_acceptance, checks.negative_data_rejection]


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_api_honours_its_schema(case: schemathesis.Case, world: dict):
    # Point the path at real objects, so responses with bodies are checked too, not only 404s.
    for name, value in world["path"].items():
        if case.path_parameters and name in case.path_parameters:
            case.path_parameters[name] = value
    case.call_and_validate(headers={"Authorization": f"Bearer {world['token']}"}, excluded_checks=NOT_EXPRESSIBLE)

