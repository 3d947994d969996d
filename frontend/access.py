"""Who may see and do what in the console: the API's own role tables, read from the API's viewsets.

The console never keeps a role table of its own: a page asks `api_role()` what the REST API
demands for the same operation, so a rule changed there changes here too. Workspace lookup is
the API's `membership_for` (a non-member gets 404, never a hint that the workspace exists).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest

from clusters.api.jobs import ClusterJobViewSet
from clusters.api.views import ClusterViewSet
from controlplane.api.base import WorkspaceScopedViewSet, client_ip, membership_for
from controlplane.api.views import MemberViewSet
from controlplane.choices import Role, role_at_least
from controlplane.models import Membership, User, Workspace
from controlplane.services import Actor


def api_role(viewset: type[WorkspaceScopedViewSet], method: str, action: str = "") -> str:
    """The minimum role the API demands for `method` (and `action`) on `viewset`, as its `initial()` decides."""
    return viewset.action_roles.get(action, viewset.role_map.get(method, Role.OWNER))


# What each console operation needs: the same operation's role over the API.
READ = api_role(ClusterViewSet, "GET", "list")
CLUSTER_CREATE = api_role(ClusterViewSet, "POST", "create")
CLUSTER_VERBS: dict[str, str] = {
    "start": api_role(ClusterViewSet, "POST", "start"),
    "stop": api_role(ClusterViewSet, "POST", "stop"),
    "terminate": api_role(ClusterViewSet, "DELETE", "destroy"),
}
JOB_STOP = api_role(ClusterJobViewSet, "POST", "stop")
MEMBERS_MANAGE = api_role(MemberViewSet, "POST", "create")
# The audit log has no API route yet. It shows addresses and user agents of every member, so it is
# for those who manage the workspace's people: the members API's managers.
AUDIT_READ = MEMBERS_MANAGE


@dataclass(frozen=True)
class Scope:
    """The signed-in user's membership in the workspace named by the URL: what every workspace page works in."""

    membership: Membership

    @property
    def workspace(self) -> Workspace:
        return self.membership.workspace

    @property
    def role(self) -> str:
        return self.membership.role

    def can(self, needed: str) -> bool:
        return role_at_least(self.role, needed)

    def require(self, needed: str) -> None:
        """Refuse (403) below `needed`, with the API's wording."""
        if not self.can(needed):
            raise PermissionDenied(
                f"Your role in {self.workspace.slug} is {self.role}; this needs {needed} or above."
            )

    @classmethod
    def resolve(cls, user: User, slug: str) -> Scope:
        return cls(membership=membership_for(user, slug))


def actor_for(request: HttpRequest) -> Actor:
    """The audit identity of a console request: the session's user, from where it came; no token."""
    user = request.user
    assert isinstance(user, User)  # every console view that writes is behind sign-in
    return Actor(user=user, ip_address=client_ip(request.META) or None,
                 user_agent=request.META.get("HTTP_USER_AGENT", ""))
