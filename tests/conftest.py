"""Fixtures for the fast test layer: rows from factories, an authenticated API client, a fake provider.

Generic on purpose: the end-to-end fixtures live in tests/e2e/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from rest_framework.test import APIClient

from clusters.providers import register_provider
from controlplane.choices import Role
from controlplane.models import User, Workspace
from controlplane.services import token_create
from tests.factories import MembershipFactory, UserFactory, WorkspaceFactory
from tests.fakes import FakeProvider


class Api:
    """An APIClient that speaks JSON with a real Bearer token, made by `token_create`."""

    def __init__(self, user: User | None = None, raw_token: str | None = None) -> None:
        self.user = user
        self.token = raw_token
        self.client = APIClient()
        if raw_token:
            self.client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_token}")

    def request(self, method: str, path: str, data: Any = None, *, raw: str | bytes | None = None,
                **extra: Any) -> Any:
        path = path if path.startswith("/") else f"/api/v1/{path}"
        call = getattr(self.client, method.lower())
        if raw is not None:
            return call(path, data=raw, content_type="application/json", **extra)
        if data is None:
            return call(path, **extra)
        return call(path, data=data, format="json", **extra)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, data, **kw)

    def patch(self, path: str, data: Any = None, **kw: Any) -> Any:
        return self.request("PATCH", path, data, **kw)

    def put(self, path: str, data: Any = None, **kw: Any) -> Any:
        return self.request("PUT", path, data, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)


def api_for(user: User) -> Api:
    _, raw = token_create(user=user, name="test")
    return Api(user, raw)


@pytest.fixture
def user(db: None) -> User:
    return UserFactory()


@pytest.fixture
def workspace(db: None, user: User) -> Workspace:
    """A workspace that `user` owns."""
    ws = WorkspaceFactory()
    MembershipFactory(workspace=ws, user=user, role=Role.OWNER)
    return ws


@pytest.fixture
def api(user: User) -> Api:
    """The API as `user`, authenticated with a real token."""
    return api_for(user)


@pytest.fixture
def anon_api() -> Api:
    return Api()


@pytest.fixture
def member_api(db: None) -> Callable[[Workspace, str], Api]:
    """`member_api(ws, role)`: the API as a new user with that role in `ws`."""

    def make(workspace: Workspace, role: str = Role.MEMBER) -> Api:
        membership = MembershipFactory(workspace=workspace, role=role)
        return api_for(membership.user)

    return make


@pytest.fixture
def fake_provider() -> Iterator[FakeProvider]:
    """An in-memory provider installed as `local` for the test, removed afterwards."""
    fake = FakeProvider()
    register_provider("local", fake)
    yield fake
    register_provider("local", None)
