"""The one way into tenant-owned rows over the API.

`WorkspaceScopedViewSet` resolves the workspace from the URL (`workspaces/{ws}/…`),
checks that the caller is a member (a non-member gets 404: we never reveal that a
workspace exists) and that their role is high enough for the method (403 otherwise).
Subclasses narrow the queryset with `scope_queryset()`; overriding `get_queryset` is
refused at class creation, so a missing filter cannot leak another workspace's rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.conf import settings
from django.http import Http404
from rest_framework import exceptions, viewsets
from rest_framework.request import Request

from controlplane.choices import Role, role_at_least
from controlplane.models import Membership, Workspace
from controlplane.services import Actor

# The minimum role per HTTP method, unless a view says otherwise for an action.
DEFAULT_ROLE_MAP: dict[str, str] = {
    "GET": Role.VIEWER,
    "HEAD": Role.VIEWER,
    "OPTIONS": Role.VIEWER,
    "POST": Role.MEMBER,
    "PUT": Role.MEMBER,
    "PATCH": Role.MEMBER,
    "DELETE": Role.MEMBER,
}


def client_ip(meta: dict) -> str | None:
    """The caller's address. X-Forwarded-For is believed only for as many hops as we have proxies
    (CUMULUS_TRUSTED_PROXIES): anyone can send the header, so by default it is ignored."""
    hops = settings.CUMULUS_TRUSTED_PROXIES
    forwarded = [part.strip() for part in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
    if hops and forwarded:
        return forwarded[-min(hops, len(forwarded))]
    return meta.get("REMOTE_ADDR")


def actor_from(request: Request) -> Actor:
    ip = client_ip(request.META)
    token = request.auth if getattr(request.auth, "token_hash", None) else None
    return Actor(user=request.user, token=token, ip_address=ip or None,
                 user_agent=request.META.get("HTTP_USER_AGENT", ""))


def membership_for(user: Any, slug: str) -> Membership:
    """The caller's membership in workspace `slug`, or 404 whether it does not exist or they are not in it."""
    membership = (
        Membership.objects.select_related("workspace").filter(workspace__slug=slug, user=user).first()
        if user is not None and getattr(user, "is_authenticated", False)
        else None
    )
    if membership is None:
        raise Http404
    return membership


class WorkspaceScopedViewSet(viewsets.GenericViewSet):
    """Base for every view of workspace-owned rows. Set `queryset`; narrow with `scope_queryset`."""

    role_map: ClassVar[dict[str, str]] = DEFAULT_ROLE_MAP
    action_roles: ClassVar[dict[str, str]] = {}  # e.g. {"start": Role.MEMBER}
    workspace: Workspace
    membership: Membership

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "get_queryset" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: override scope_queryset() instead of get_queryset()")

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # authentication, throttling
        self.membership = membership_for(request.user, self.kwargs["ws"])
        self.workspace = self.membership.workspace
        needed = self.action_roles.get(self.action or "", self.role_map.get(request.method or "GET", Role.OWNER))
        if not role_at_least(self.membership.role, needed):
            raise exceptions.PermissionDenied(
                f"Your role in {self.workspace.slug} is {self.membership.role}; this needs {needed} or above."
            )

    def get_queryset(self):
        model = self.queryset.model  # type: ignore[union-attr]
        if getattr(self, "swagger_fake_view", False):  # schema generation: no request, no workspace
            return model.objects.none()
        return self.scope_queryset(model.objects.for_workspace(self.workspace))

    def scope_queryset(self, queryset):
        return queryset

    @property
    def actor(self) -> Actor:
        return actor_from(self.request)
