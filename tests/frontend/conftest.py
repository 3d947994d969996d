"""Fixtures for the console's tests: a signed-in Django test client per role, and the browser harness.

`control_plane` is the end-to-end harness of tests/e2e (gunicorn, Celery worker and beat, the
local provider), imported so the browser tests run against exactly what `make run` starts.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.test import Client

from controlplane.choices import Role
from controlplane.models import User, Workspace
from tests.e2e.conftest import control_plane  # noqa: F401 - re-exported fixture
from tests.factories import MembershipFactory, UserFactory, WorkspaceFactory


@pytest.fixture
def ws(db: None) -> Workspace:
    return WorkspaceFactory(slug="acme", name="Acme")


@pytest.fixture
def console(ws: Workspace) -> Callable[..., Client]:
    """`console(role)`: a CSRF-enforcing client signed in as a new user with `role` in workspace `acme`."""

    def make(role: str = Role.MEMBER, *, workspace: Workspace | None = None, user: User | None = None) -> Client:
        user = user or UserFactory()
        MembershipFactory(workspace=workspace or ws, user=user, role=role)
        client = Client(enforce_csrf_checks=True)
        client.force_login(user)
        client.user = user  # type: ignore[attr-defined]
        return client

    return make
