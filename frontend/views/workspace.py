"""Workspace pages: members and their roles, and the audit log.

Adding and changing members goes through `controlplane.services` after the members API's own
input serializers, so the console's messages are the API's; who may touch the owner role is
`owner_role_change_allowed`, which the API asks too.
"""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST
from rest_framework.exceptions import ValidationError

from controlplane import services
from controlplane.api.serializers import MemberAddInput, MemberRoleInput
from controlplane.choices import Role, owner_role_change_allowed
from controlplane.errors import Conflict
from controlplane.models import AuditEvent, Membership, User
from frontend.access import AUDIT_READ, MEMBERS_MANAGE, READ, Scope, actor_for
from frontend.views.base import page, workspace_page

AUDIT_PAGE_SIZE = 50


def _field_errors(detail: object) -> dict[str, list[str]]:
    if isinstance(detail, dict):
        return {key: [str(m) for m in (value if isinstance(value, list) else [value])] for key, value in detail.items()}
    return {"non_field_errors": [str(detail)]}


def _members_page(request: HttpRequest, scope: Scope, *, invite: dict | None = None,
                  errors: dict[str, list[str]] | None = None, status: int = 200) -> HttpResponse:
    members = Membership.objects.for_workspace(scope.workspace).select_related("user").order_by("created_at", "id")
    manager = scope.can(MEMBERS_MANAGE)
    grantable = [(value, label) for value, label in Role.choices
                 if owner_role_change_allowed(actor_role=scope.role, new_role=value, current_role=None)]
    rows = [{
        "membership": m,
        "is_me": m.user_id == request.user.pk,
        "editable": manager and owner_role_change_allowed(actor_role=scope.role, new_role=None, current_role=m.role),
    } for m in members]
    return page(request, "frontend/members.html", {
        "title": "Members", "rows": rows, "can_manage": manager, "roles": grantable,
        "invite": invite or {"email": "", "role": Role.MEMBER}, "errors": errors or {},
    }, scope=scope, status=status)


@workspace_page(write=MEMBERS_MANAGE)
def members(request: HttpRequest, scope: Scope) -> HttpResponse:
    """GET: who is in the workspace, with which role. POST (admins): add an existing user by e-mail."""
    if request.method != "POST":
        return _members_page(request, scope)
    invite = {"email": request.POST.get("email", ""), "role": request.POST.get("role", "")}
    try:
        data = MemberAddInput.validated(invite)
    except ValidationError as error:
        return _members_page(request, scope, invite=invite, errors=_field_errors(error.detail), status=400)
    if not owner_role_change_allowed(actor_role=scope.role, new_role=data["role"], current_role=None):
        raise PermissionDenied("Only an owner can grant, change or remove the owner role.")
    # The console adds people who can already sign in; the API also creates password-less accounts
    # (they use tokens), which a person in a browser could never use.
    if not User.objects.filter(email__iexact=data["email"]).exists():
        errors = {"email": ["No account uses this address; an operator creates one with `manage.py create_user`."]}
        return _members_page(request, scope, invite=invite, errors=errors, status=400)
    try:
        membership = services.member_add(workspace=scope.workspace, email=data["email"], role=data["role"],
                                         actor=actor_for(request))
    except Conflict as conflict:
        return _members_page(request, scope, invite=invite, errors={"email": [conflict.message]}, status=409)
    messages.success(request, f"{membership.user.email} joined as {membership.role}.")
    return redirect("frontend:members", ws=scope.workspace.slug)


@workspace_page(write=MEMBERS_MANAGE)  # outermost: a stranger gets 404 before a method check says anything
@require_POST
def member_role(request: HttpRequest, scope: Scope, user_id: int) -> HttpResponse:
    membership = get_object_or_404(Membership.objects.for_workspace(scope.workspace).select_related("user"),
                                   user_id=user_id)
    try:
        data = MemberRoleInput.validated({"role": request.POST.get("role", "")})
    except ValidationError as error:
        messages.error(request, "; ".join(m for ms in _field_errors(error.detail).values() for m in ms))
        return redirect("frontend:members", ws=scope.workspace.slug)
    if not owner_role_change_allowed(actor_role=scope.role, new_role=data["role"], current_role=membership.role):
        raise PermissionDenied("Only an owner can grant, change or remove the owner role.")
    try:
        services.member_change_role(membership=membership, role=data["role"], actor=actor_for(request))
    except Conflict as conflict:
        messages.error(request, conflict.message)
    else:
        messages.success(request, f"{membership.user.email} is now {data['role']}.")
    return redirect("frontend:members", ws=scope.workspace.slug)


@workspace_page(write=READ)  # leaving needs no role; removing someone else needs the managers' role, below
@require_http_methods(["GET", "POST"])
def member_remove(request: HttpRequest, scope: Scope, user_id: int) -> HttpResponse:
    """GET: confirm. POST: remove the member (or leave the workspace, when it is oneself)."""
    membership = get_object_or_404(Membership.objects.for_workspace(scope.workspace).select_related("user"),
                                   user_id=user_id)
    myself = membership.user_id == request.user.pk
    if not myself:
        scope.require(MEMBERS_MANAGE)
        if not owner_role_change_allowed(actor_role=scope.role, new_role=None, current_role=membership.role):
            raise PermissionDenied("Only an owner can grant, change or remove the owner role.")
    who = "yourself" if myself else membership.user.email
    if request.method != "POST":
        return page(request, "frontend/confirm.html", {
            "title": "Leave workspace" if myself else "Remove member",
            "question": f"Remove {who} from {scope.workspace.slug}? "
                        "Their API tokens stop working in this workspace at once.",
            "action": "Leave" if myself else "Remove", "danger": True,
            "cancel_url": reverse("frontend:members", args=[scope.workspace.slug]),
        }, scope=scope)
    try:
        services.member_remove(membership=membership, actor=actor_for(request))
    except Conflict as conflict:
        messages.error(request, conflict.message)
        return redirect("frontend:members", ws=scope.workspace.slug)
    if myself:
        messages.success(request, f"You left {scope.workspace.slug}.")
        return redirect("frontend:home")
    messages.success(request, f"{membership.user.email} was removed.")
    return redirect("frontend:members", ws=scope.workspace.slug)


@workspace_page()
def audit_log(request: HttpRequest, scope: Scope) -> HttpResponse:
    """Who did what in this workspace, newest first, 50 to a page."""
    scope.require(AUDIT_READ)
    events = AuditEvent.objects.filter(workspace=scope.workspace).order_by("-created_at", "-id")
    page_obj = Paginator(events, AUDIT_PAGE_SIZE).get_page(request.GET.get("page"))
    return page(request, "frontend/audit.html", {"title": "Audit log", "page_obj": page_obj}, scope=scope)
