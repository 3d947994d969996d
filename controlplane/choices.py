from django.db import models


class Role(models.TextChoices):
    """A member's role in a workspace; each role can do everything the ones below it can."""

    OWNER = "owner", "Owner"  # everything, including deleting the workspace and managing owners
    ADMIN = "admin", "Admin"  # manage members (not owners), tokens, settings
    MEMBER = "member", "Member"  # create and operate clusters and jobs
    VIEWER = "viewer", "Viewer"  # read only


ROLE_RANK: dict[str, int] = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


def role_at_least(role: str, minimum: str) -> bool:
    return ROLE_RANK[role] >= ROLE_RANK[minimum]


def owner_role_change_allowed(*, actor_role: str, new_role: str | None, current_role: str | None) -> bool:
    """Only an owner may grant, change or remove the owner role: the members API and the console ask here."""
    touches_owner = new_role == Role.OWNER or current_role == Role.OWNER
    return actor_role == Role.OWNER or not touches_owner
