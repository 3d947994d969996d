"""Clusters, their nodes and events, and the instance-type catalog."""

from __future__ import annotations

from dataclasses import asdict

from django.conf import settings
from django.db.models import Case, IntegerField, Prefetch, Value, When
from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clusters import services
from clusters.api.serializers import ClusterEventSerializer, ClusterSerializer, InstanceTypeSerializer, NodeSerializer
from clusters.choices import ClusterStatus, NodeState
from clusters.models import Cluster, ClusterEvent, Node, NodeGroup
from clusters.providers.catalog import CATALOG
from clusters.spec import ClusterPatch, ClusterSpec
from controlplane.api.base import WorkspaceScopedViewSet
from controlplane.api.schema import errors

NAME_REGEX = r"[a-z][a-z0-9-]{0,62}"
ALL_PARAM = OpenApiParameter("all", bool, description="Include terminated ones too.")


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


class ClusterViewSet(WorkspaceScopedViewSet):
    """A workspace's clusters, addressed by name. DELETE terminates."""

    queryset = Cluster.objects.all()
    serializer_class = ClusterSerializer
    lookup_url_kwarg = "name"
    lookup_value_regex = NAME_REGEX

    def scope_queryset(self, queryset):
        return queryset.prefetch_related(
            Prefetch("groups", queryset=NodeGroup.objects.order_by("position", "id")), "nodes"
        )

    def get_object(self) -> Cluster:
        """The live cluster with this name, or else the most recently terminated one."""
        live_first = Case(When(status=ClusterStatus.TERMINATED, then=Value(1)), default=Value(0),
                          output_field=IntegerField())
        cluster = (
            self.get_queryset().filter(name=self.kwargs["name"]).order_by(live_first, "-created_at").first()
        )
        if cluster is None:
            raise Http404
        return cluster

    @extend_schema(parameters=[ALL_PARAM], responses={200: ClusterSerializer(many=True), **errors(400, 401, 404)})
    def list(self, request: Request, ws: str) -> Response:
        qs = self.get_queryset().order_by("-created_at", "-id")
        if not _flag(request, "all"):
            qs = qs.exclude(status=ClusterStatus.TERMINATED)
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(ClusterSerializer(page, many=True, context={}).data)

    @extend_schema(request=ClusterSpec, responses={201: ClusterSerializer, **errors(400, 401, 403, 404)})
    def create(self, request: Request, ws: str) -> Response:
        spec = ClusterSpec.validated(request.data)
        cluster = services.cluster_create(workspace=self.workspace, spec=spec, actor=self.actor)
        return Response(ClusterSerializer(self._fresh(cluster)).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: ClusterSerializer, **errors(401, 404)})
    def retrieve(self, request: Request, ws: str, name: str) -> Response:
        return Response(ClusterSerializer(self.get_object()).data)

    @extend_schema(request=ClusterPatch, responses={200: ClusterSerializer, **errors(400, 401, 403, 404, 409)})
    def partial_update(self, request: Request, ws: str, name: str) -> Response:
        cluster = self.get_object()
        changes = ClusterPatch.validated(request.data, cluster=cluster)
        cluster = services.cluster_update(cluster=cluster, changes=changes, actor=self.actor)
        return Response(ClusterSerializer(self._fresh(cluster)).data)

    @extend_schema(responses={202: ClusterSerializer, **errors(401, 403, 404)})
    def destroy(self, request: Request, ws: str, name: str) -> Response:
        cluster = services.cluster_delete(cluster=self.get_object(), actor=self.actor)
        return Response(ClusterSerializer(self._fresh(cluster)).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: ClusterSerializer, **errors(401, 403, 404, 409)})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, ws: str, name: str) -> Response:
        cluster = services.cluster_start(cluster=self.get_object(), actor=self.actor)
        return Response(ClusterSerializer(self._fresh(cluster)).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: ClusterSerializer, **errors(401, 403, 404, 409)})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, ws: str, name: str) -> Response:
        cluster = services.cluster_stop(cluster=self.get_object(), actor=self.actor)
        return Response(ClusterSerializer(self._fresh(cluster)).data, status=status.HTTP_202_ACCEPTED)

    def _fresh(self, cluster: Cluster) -> Cluster:
        return self.get_queryset().get(pk=cluster.pk)


class _ClusterChildViewSet(WorkspaceScopedViewSet):
    """Rows that hang off a cluster; the cluster is resolved by name inside the caller's workspace."""

    def cluster(self) -> Cluster:
        cluster = (
            Cluster.objects.for_workspace(self.workspace).filter(name=self.kwargs["name"])
            .order_by(Case(When(status=ClusterStatus.TERMINATED, then=Value(1)), default=Value(0),
                           output_field=IntegerField()), "-created_at")
            .first()
        )
        if cluster is None:
            raise Http404
        return cluster


class NodeViewSet(_ClusterChildViewSet):
    queryset = Node.objects.none()  # scoped through the cluster below
    serializer_class = NodeSerializer

    @extend_schema(parameters=[ALL_PARAM], responses={200: NodeSerializer(many=True), **errors(400, 401, 404)})
    def list(self, request: Request, ws: str, name: str) -> Response:
        qs = Node.objects.filter(cluster=self.cluster()).order_by("id")
        if not _flag(request, "all"):
            qs = qs.exclude(state=NodeState.TERMINATED)
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(NodeSerializer(page, many=True).data)


class ClusterEventViewSet(_ClusterChildViewSet):
    queryset = ClusterEvent.objects.none()
    serializer_class = ClusterEventSerializer

    @extend_schema(responses={200: ClusterEventSerializer(many=True), **errors(400, 401, 404)})
    def list(self, request: Request, ws: str, name: str) -> Response:
        qs = ClusterEvent.objects.filter(cluster=self.cluster()).select_related("node").order_by("-created_at", "-id")
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(ClusterEventSerializer(page, many=True).data)


class InstanceTypesView(APIView):
    """The catalog of node types per provider, with prices."""

    @extend_schema(
        parameters=[OpenApiParameter("provider", str, enum=sorted(CATALOG), description="Only this provider's types.")],
        responses={200: InstanceTypeSerializer(many=True), **errors(400, 401)},
    )
    def get(self, request: Request) -> Response:
        provider = request.query_params.get("provider")
        providers = [p for p in settings.CUMULUS_ENABLED_PROVIDERS if p in CATALOG]
        if provider is not None:
            if provider not in providers:
                raise ValidationError({"provider": [f"Unknown or disabled provider; enabled: {', '.join(providers)}."]})
            providers = [provider]
        types = [asdict(t) for p in providers for t in CATALOG[p]]
        return Response(InstanceTypeSerializer(types, many=True).data)
