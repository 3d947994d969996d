"""Workspaces, members and the caller's API tokens."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane import services
from controlplane.api.base import DEFAULT_ROLE_MAP, WorkspaceScopedViewSet, actor_from, membership_for
from controlplane.api.schema import ERRORS, errors
from controlplane.api.serializers import (
    MemberAddInput,
    MemberRoleInput,
    MemberSerializer,
    TokenCreatedSerializer,
    TokenCreateInput,
    TokenSerializer,
    WorkspaceCreateInput,
    WorkspaceSerializer,
    WorkspaceUpdateInput,
)
from controlplane.choices import Role, owner_role_change_allowed, role_at_least
from controlplane.models import ApiToken, Membership, Workspace


class WorkspaceViewSet(viewsets.GenericViewSet):
    """Workspaces the caller belongs to. The creator becomes the owner."""

    serializer_class = WorkspaceSerializer
    lookup_field = "slug"
    lookup_url_kwarg = "ws"
    queryset = Workspace.objects.none()

    def _roles(self) -> dict[int, str]:
        return dict(Membership.objects.filter(user=self.request.user).values_list("workspace_id", "role"))

    def _out(self, workspace: Workspace, **kwargs) -> Response:
        data = WorkspaceSerializer(workspace, context={"roles": self._roles()}).data
        return Response(data, **kwargs)

    @extend_schema(responses={200: WorkspaceSerializer(many=True), **errors(400, 401, 404)})
    def list(self, request: Request) -> Response:
        roles = self._roles()
        qs = Workspace.objects.filter(pk__in=roles).order_by("slug")
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(WorkspaceSerializer(page, many=True, context={"roles": roles}).data)

    @extend_schema(request=WorkspaceCreateInput, responses={201: WorkspaceSerializer, **errors(400, 401)})
    def create(self, request: Request) -> Response:
        data = WorkspaceCreateInput.validated(request.data)
        workspace = services.workspace_create(slug=data["slug"], name=data["name"], owner=request.user,
                                              actor=actor_from(request))
        return self._out(workspace, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: WorkspaceSerializer, **errors(401, 404)})
    def retrieve(self, request: Request, ws: str) -> Response:
        return self._out(membership_for(request.user, ws).workspace)

    @extend_schema(request=WorkspaceUpdateInput, responses={200: WorkspaceSerializer, **errors(400, 401, 403, 404)})
    def partial_update(self, request: Request, ws: str) -> Response:
        membership = self._require(ws, Role.ADMIN)
        data = WorkspaceUpdateInput.validated(request.data)
        if "name" not in data:  # PATCH semantics: nothing asked, nothing changed
            return self._out(membership.workspace)
        workspace = services.workspace_update(workspace=membership.workspace, name=data["name"],
                                              actor=actor_from(request))
        return self._out(workspace)

    @extend_schema(responses={204: None, **errors(401, 403, 404, 409)})
    def destroy(self, request: Request, ws: str) -> Response:
        membership = self._require(ws, Role.OWNER)
        services.workspace_delete(workspace=membership.workspace, actor=actor_from(request))
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _require(self, ws: str, role: str) -> Membership:
        membership = membership_for(self.request.user, ws)
        if not role_at_least(membership.role, role):
            raise exceptions.PermissionDenied(f"Your role in {ws} is {membership.role}; this needs {role} or above.")
        return membership


class MemberViewSet(WorkspaceScopedViewSet):
    """Members of a workspace and their roles. Admins manage members; only owners manage owners."""

    queryset = Membership.objects.all()
    serializer_class = MemberSerializer
    lookup_url_kwarg = "user"
    lookup_field = "user_id"
    lookup_value_regex = r"[0-9]+"
    role_map = {**DEFAULT_ROLE_MAP, "POST": Role.ADMIN, "PATCH": Role.ADMIN, "DELETE": Role.ADMIN}

    def scope_queryset(self, queryset):
        return queryset.select_related("user").order_by("created_at", "id")

    @extend_schema(responses={200: MemberSerializer(many=True), **errors(400, 401, 404)})
    def list(self, request: Request, ws: str) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(MemberSerializer(page, many=True).data)

    @extend_schema(request=MemberAddInput, responses={201: MemberSerializer, **errors(400, 401, 403, 404, 409)})
    def create(self, request: Request, ws: str) -> Response:
        data = MemberAddInput.validated(request.data)
        self._guard_owner_change(data["role"])
        membership = services.member_add(workspace=self.workspace, email=data["email"], role=data["role"],
                                         actor=self.actor)
        return Response(MemberSerializer(membership).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=MemberRoleInput, responses={200: MemberSerializer, **errors(400, 401, 403, 404, 409)})
    def partial_update(self, request: Request, ws: str, user: str) -> Response:
        membership = self.get_object()
        data = MemberRoleInput.validated(request.data)
        if "role" not in data:  # PATCH semantics: nothing asked, nothing changed
            return Response(MemberSerializer(membership).data)
        self._guard_owner_change(data["role"], membership)
        membership = services.member_change_role(membership=membership, role=data["role"], actor=self.actor)
        return Response(MemberSerializer(membership).data)

    @extend_schema(responses={204: None, **errors(401, 403, 404, 409)})
    def destroy(self, request: Request, ws: str, user: str) -> Response:
        membership = self.get_object()
        if membership.user_id != request.user.pk:  # anyone may leave; removing others is for admins
            self._guard_owner_change(None, membership)
        services.member_remove(membership=membership, actor=self.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _guard_owner_change(self, new_role: str | None, membership: Membership | None = None) -> None:
        current = membership.role if membership is not None else None
        if not owner_role_change_allowed(actor_role=self.membership.role, new_role=new_role, current_role=current):
            raise exceptions.PermissionDenied("Only an owner can grant, change or remove the owner role.")

    def initial(self, request: Request, *args, **kwargs) -> None:
        # Leaving a workspace needs no admin role: let the DELETE of one's own membership through.
        if request.method == "DELETE" and kwargs.get("user") == str(getattr(request.user, "pk", "")):
            self.action_roles = {"destroy": Role.VIEWER}
        super().initial(request, *args, **kwargs)


class TokenViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """The caller's own API tokens. The token itself is returned once, at creation."""

    serializer_class = TokenSerializer
    queryset = ApiToken.objects.none()
    lookup_value_regex = r"[0-9]+"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ApiToken.objects.none()
        return ApiToken.objects.filter(user=self.request.user).order_by("-created_at", "-id")

    @extend_schema(responses={200: TokenSerializer(many=True), **errors(400, 401, 404)})
    def list(self, request: Request, *args, **kwargs) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(request=TokenCreateInput, responses={201: TokenCreatedSerializer, **errors(400, 401)})
    def create(self, request: Request) -> Response:
        data = TokenCreateInput.validated(request.data)
        token, raw = services.token_create(user=request.user, name=data["name"], expires_at=data["expires_at"],
                                           actor=actor_from(request))
        token.token = raw  # type: ignore[attr-defined]
        return Response(TokenCreatedSerializer(token).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={204: None, **errors(401, 404)})
    def destroy(self, request: Request, pk: str) -> Response:
        token = self.get_queryset().filter(pk=pk).first()
        if token is None:
            raise Http404
        services.token_revoke(token=token, actor=actor_from(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


__all__ = ["ERRORS", "MemberViewSet", "TokenViewSet", "WorkspaceViewSet"]
