"""Tenancy: users, workspaces (the tenant), memberships, API tokens and the audit log."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from django.contrib.auth.models import AbstractUser, UserManager
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from controlplane.choices import Role

SLUG_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
slug_validator = RegexValidator(
    SLUG_PATTERN, "Use 1-63 lowercase letters, digits or hyphens, starting with a letter."
)


class CumulusUserManager(UserManager):
    def create_user(self, username=None, email=None, password=None, **extra):  # type: ignore[override]
        email = self.normalize_email(email or username)
        return super().create_user(username=email, email=email, password=password, **extra)


class User(AbstractUser):
    """A person. The e-mail address is the sign-in name."""

    email = models.EmailField(unique=True)
    objects = CumulusUserManager()

    REQUIRED_FIELDS: list[str] = []

    def __str__(self) -> str:
        return self.email


class Workspace(models.Model):
    """The tenant: every cluster, node, job, blob and bill belongs to exactly one workspace."""

    slug = models.CharField(max_length=63, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.slug


class WorkspaceQuerySet(models.QuerySet):
    def for_workspace(self, workspace: Workspace) -> WorkspaceQuerySet:
        return self.filter(workspace=workspace)


class WorkspaceOwned(models.Model):
    """Abstract base for every row owned by exactly one workspace."""

    workspace = models.ForeignKey(Workspace, on_delete=models.PROTECT, related_name="+")
    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        abstract = True


class Membership(models.Model):
    """A user's role in a workspace."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=("workspace", "user"), name="%(app_label)s_%(class)s_unique_workspace_user")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.workspace} as {self.role}"


TOKEN_PREFIX = "cu_"


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiTokenQuerySet(models.QuerySet):
    def usable(self) -> ApiTokenQuerySet:
        return self.filter(revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=timezone.now())
        )


class ApiToken(models.Model):
    """A user's API token: random, shown once, stored as SHA-256 with its last four characters."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True)
    last_four = models.CharField(max_length=4)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    def __str__(self) -> str:
        return f"{self.name} (…{self.last_four})"

    @staticmethod
    def generate() -> str:
        return TOKEN_PREFIX + secrets.token_urlsafe(32)

    def matches(self, raw: str) -> bool:
        return hmac.compare_digest(self.token_hash, hash_token(raw))

    @property
    def is_usable(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > timezone.now())


class AuditEvent(models.Model):
    """One mutation: who did what to which object, when and from where."""

    workspace = models.ForeignKey(Workspace, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor_email = models.CharField(max_length=254, blank=True)
    token = models.ForeignKey(ApiToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    action = models.CharField(max_length=64)  # e.g. "cluster.create"
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    data = models.JSONField(default=dict, blank=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["workspace", "-created_at"], name="audit_ws_created")]

    def __str__(self) -> str:
        return f"{self.actor_email} {self.action} {self.target_type}:{self.target_id}"
