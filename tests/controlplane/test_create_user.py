"""`manage.py create_user`: what an operator types to let someone in."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from controlplane.choices import Role
from controlplane.models import ApiToken, Membership, User, Workspace, hash_token

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command("create_user", *args, stdout=out)
    return out.getvalue()


def token_of(output: str) -> str:
    return next(line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("API token: "))


def test_first_member_of_a_new_workspace_is_its_owner_and_gets_a_working_token() -> None:
    output = run("ada@example.com", "--workspace", "ml")

    membership = Membership.objects.get(user__email="ada@example.com", workspace__slug="ml")
    assert membership.role == Role.OWNER
    assert ApiToken.objects.usable().filter(token_hash=hash_token(token_of(output)), user=membership.user).exists()


def test_joining_an_existing_workspace_takes_the_given_role() -> None:
    run("ada@example.com", "--workspace", "ml")

    run("grace@example.com", "--workspace", "ml", "--role", "viewer")

    assert Membership.objects.get(user__email="grace@example.com").role == Role.VIEWER


def test_a_non_owner_role_for_a_new_workspace_is_refused_and_writes_nothing() -> None:
    with pytest.raises(CommandError, match="first member becomes its owner"):
        run("grace@example.com", "--workspace", "ml", "--role", "member")

    assert not User.objects.exists() and not Workspace.objects.exists()


def test_demoting_the_last_owner_is_refused_with_a_sentence_not_a_traceback() -> None:
    run("ada@example.com", "--workspace", "ml")

    with pytest.raises(CommandError, match="at least one owner"):
        run("ada@example.com", "--workspace", "ml", "--role", "viewer")

    assert Membership.objects.get(user__email="ada@example.com").role == Role.OWNER
