"""Tenancy services: workspaces, memberships, tokens and the audit log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import IntegrityError, transaction
from django.utils import timezone

from controlplane.choices import Role
from controlplane.errors import Conflict, ValidationFailed
from controlplane.models import ApiToken, AuditEvent, Membership, User, Workspace, hash_token


@dataclass(frozen=True)
class Actor:
    """Who is acting and from where: what every audit row records."""

    user: User | None
    token: ApiToken | None = None
    ip_address: str | None = None
    user_agent: str = ""

    @classmethod
    def system(cls) -> Actor:
        return cls(user=None)


def audit_record(
    *, actor: Actor, action: str, target_type: str, target_id: object, workspace: Workspace | None = None,
    data: dict | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        workspace=workspace,
        actor=actor.user,
        actor_email=actor.user.email if actor.user else "system",
        token=actor.token,
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        data=data or {},
        ip_address=actor.ip_address,
        user_agent=(actor.user_agent or "")[:300],
    )


@transaction.atomic
def user_create(*, email: str, password: str | None = None, is_staff: bool = False) -> User:
    user = User.objects.create_user(email=email, password=password)
    if is_staff:
        user.is_staff = user.is_superuser = True
        user.save(update_fields=["is_staff", "is_superuser"])
    return user


def token_create(*, user: User, name: str, expires_at: datetime | None = None, actor: Actor | None = None) -> tuple[
    ApiToken, str
]:
    """Create a token; returns the row and the raw token, which is never stored and shown once."""
    raw = ApiToken.generate()
    token = ApiToken.objects.create(
        user=user, name=name, token_hash=hash_token(raw), last_four=raw[-4:], expires_at=expires_at
    )
    audit_record(actor=actor or Actor(user=user), action="token.create", target_type="token", target_id=token.pk,
                 data={"name": name})
    return token, raw


def token_revoke(*, token: ApiToken, actor: Actor) -> None:
    if token.revoked_at is None:
        ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        audit_record(actor=actor, action="token.revoke", target_type="token", target_id=token.pk)


@transaction.atomic
def workspace_create(*, slug: str, name: str, owner: User, actor: Actor) -> Workspace:
    try:
        with transaction.atomic():
            workspace = Workspace.objects.create(slug=slug, name=name or slug)
    except IntegrityError:
        raise ValidationFailed({"slug": ["A workspace with this slug already exists."]}) from None
    Membership.objects.create(workspace=workspace, user=owner, role=Role.OWNER)
    audit_record(actor=actor, action="workspace.create", target_type="workspace", target_id=workspace.slug,
                 workspace=workspace)
    return workspace


@transaction.atomic
def workspace_update(*, workspace: Workspace, name: str, actor: Actor) -> Workspace:
    workspace.name = name
    workspace.save(update_fields=["name", "updated_at"])
    audit_record(actor=actor, action="workspace.update", target_type="workspace", target_id=workspace.slug,
                 workspace=workspace, data={"name": name})
    return workspace


@transaction.atomic
def workspace_delete(*, workspace: Workspace, actor: Actor) -> None:
    from clusters.models import Cluster
    from projects.services import workspace_purge

    if Cluster.objects.for_workspace(workspace).exclude(status="TERMINATED").exists():
        raise Conflict("The workspace still has clusters; delete them first.")
    audit_record(actor=actor, action="workspace.delete", target_type="workspace", target_id=workspace.slug)
    Cluster.objects.for_workspace(workspace).delete()  # and their jobs
    workspace_purge(workspace)
    workspace.delete()


def _owners_left(workspace: Workspace, excluding: Membership) -> int:
    return workspace.memberships.filter(role=Role.OWNER).exclude(pk=excluding.pk).count()


@transaction.atomic
def member_add(*, workspace: Workspace, email: str, role: str, actor: Actor) -> Membership:
    """Add a person by e-mail; an unknown address gets an account without a password (it signs in by token)."""
    email = User.objects.normalize_email(email).lower()
    user = User.objects.filter(email__iexact=email).first() or User.objects.create_user(email=email)
    membership, created = Membership.objects.get_or_create(workspace=workspace, user=user, defaults={"role": role})
    if not created:
        raise Conflict(f"{email} is already a member of this workspace.")
    audit_record(actor=actor, action="member.add", target_type="user", target_id=user.pk, workspace=workspace,
                 data={"email": email, "role": role})
    return membership


@transaction.atomic
def member_change_role(*, membership: Membership, role: str, actor: Actor) -> Membership:
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    if membership.role == Role.OWNER and role != Role.OWNER and _owners_left(membership.workspace, membership) == 0:
        raise Conflict("A workspace needs at least one owner.")
    old = membership.role
    membership.role = role
    membership.save(update_fields=["role"])
    audit_record(actor=actor, action="member.role", target_type="user", target_id=membership.user_id,
                 workspace=membership.workspace, data={"from": old, "to": role})
    return membership


@transaction.atomic
def member_remove(*, membership: Membership, actor: Actor) -> None:
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    if membership.role == Role.OWNER and _owners_left(membership.workspace, membership) == 0:
        raise Conflict("A workspace needs at least one owner.")
    audit_record(actor=actor, action="member.remove", target_type="user", target_id=membership.user_id,
                 workspace=membership.workspace)
    membership.delete()
