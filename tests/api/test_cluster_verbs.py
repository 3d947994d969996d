"""Cluster verbs as API.md spells them, and the caller's address in the audit log."""

from __future__ import annotations

import pytest

from clusters.choices import ClusterStatus
from controlplane.models import AuditEvent
from tests.factories import ClusterFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("slash", ["", "/"])
def test_stop_and_start_answer_with_and_without_a_trailing_slash(api, workspace, slash: str) -> None:
    # given a running cluster
    cluster = ClusterFactory(workspace=workspace, status=ClusterStatus.RUNNING)
    base = f"workspaces/{workspace.slug}/clusters/{cluster.name}"

    # when it is stopped, then started while it is still stopping
    stopped = api.post(f"{base}/stop{slash}")
    conflict = api.post(f"{base}/start{slash}")

    # then the stop is accepted and the start is refused with the contract's 409
    assert stopped.status_code == 202, stopped.content
    assert stopped.json()["status"] == ClusterStatus.STOPPING
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"
    assert "STOPPING" in conflict.json()["error"]["message"]


def test_audit_ignores_a_forged_forwarded_for_header(api, workspace, settings) -> None:
    settings.CUMULUS_TRUSTED_PROXIES = 0
    cluster = ClusterFactory(workspace=workspace, status=ClusterStatus.RUNNING)

    api.post(f"workspaces/{workspace.slug}/clusters/{cluster.name}/stop", HTTP_X_FORWARDED_FOR="203.0.113.9",
             REMOTE_ADDR="127.0.0.7")

    assert AuditEvent.objects.get(action="cluster.stop").ip_address == "127.0.0.7"


def test_audit_believes_forwarded_for_from_a_trusted_proxy(api, workspace, settings) -> None:
    settings.CUMULUS_TRUSTED_PROXIES = 1
    cluster = ClusterFactory(workspace=workspace, status=ClusterStatus.RUNNING)

    api.post(f"workspaces/{workspace.slug}/clusters/{cluster.name}/stop",
             HTTP_X_FORWARDED_FOR="198.51.100.1, 203.0.113.9", REMOTE_ADDR="127.0.0.7")

    assert AuditEvent.objects.get(action="cluster.stop").ip_address == "203.0.113.9"
