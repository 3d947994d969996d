"""The agent API: nodes connect outward to register and heartbeat. Nothing here is per user."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle
from rest_framework.views import APIView

from clusters import agent_service
from clusters.reconciler import node_for_bootstrap_token
from controlplane.api.fields import StrictCharField, StrictIntegerField, StrictSerializer
from controlplane.api.schema import errors


class NodeTokenAuthentication(BaseAuthentication):
    """`Authorization: Bearer cun_…`: a node token speaks for its one node only."""

    def authenticate(self, request):
        header = get_authorization_header(request).decode("latin-1")
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            return None
        node = agent_service.node_for_token(raw.strip())
        if node is None:
            raise exceptions.AuthenticationFailed("Invalid node token.")
        return None, node

    def authenticate_header(self, request) -> str:
        return "Bearer"


class RegisterInput(StrictSerializer):
    bootstrap_token = StrictCharField(max_length=200)
    hostname = StrictCharField(max_length=255, required=False, allow_blank=True, default="")
    address = StrictCharField(max_length=64, required=False, allow_blank=True, default="")
    agent_pid = StrictIntegerField(min_value=0, required=False, allow_null=True, default=None)
    ray_version = StrictCharField(max_length=32, required=False, allow_blank=True, default="")

    def validate_address(self, value: str) -> str:
        import ipaddress

        if value:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise serializers.ValidationError("Must be an IP address.") from None
        return value


class RayParams(serializers.Serializer):
    num_cpus = serializers.IntegerField()
    num_gpus = serializers.IntegerField()
    memory_bytes = serializers.IntegerField()
    resources = serializers.DictField(child=serializers.FloatField())
    labels = serializers.DictField(child=serializers.CharField())


class RegisterOutput(serializers.Serializer):
    node_id = serializers.UUIDField()
    node_token = serializers.CharField()
    role = serializers.CharField()
    cluster = serializers.CharField()
    ray = RayParams()
    heartbeat_interval_s = serializers.FloatField()


class RayReport(StrictSerializer):
    node_id = StrictCharField(max_length=64, required=False, allow_null=True, allow_blank=True, default=None)
    gcs_address = StrictCharField(max_length=100, required=False, allow_null=True, allow_blank=True, default=None)
    dashboard_url = StrictCharField(max_length=300, required=False, allow_null=True, allow_blank=True, default=None)
    alive_node_ids = serializers.ListField(child=StrictCharField(max_length=64), required=False, allow_null=True,
                                           max_length=10000, default=None)
    load = serializers.JSONField(required=False, allow_null=True, default=None)


class HeartbeatInput(StrictSerializer):
    state = serializers.ChoiceField(choices=agent_service.AGENT_STATES)
    message = StrictCharField(max_length=2000, required=False, allow_blank=True, default="")
    ray = RayReport(required=False, default=dict)


class Command(serializers.Serializer):
    type = serializers.ChoiceField(choices=["join", "stop", "drain"])
    gcs_address = serializers.CharField(required=False)
    reason = serializers.CharField(required=False)


class HeartbeatOutput(serializers.Serializer):
    commands = Command(many=True)
    heartbeat_interval_s = serializers.FloatField()


class AgentThrottle(AnonRateThrottle):
    rate = "600/min"


class RegisterView(APIView):
    """A new node exchanges its one-time bootstrap token for a node token."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes = [AgentThrottle]

    def get_authenticate_header(self, request: Request) -> str:
        # Without authenticators DRF turns 401 into 403; a bad bootstrap token is a 401 (API.md).
        return "Bearer"

    @extend_schema(request=RegisterInput, responses={200: RegisterOutput, **errors(400, 401)}, tags=["agent"],
                   auth=[])
    def post(self, request: Request) -> Response:
        data = RegisterInput.validated(request.data)
        node = node_for_bootstrap_token(data["bootstrap_token"])
        if node is None:
            raise exceptions.AuthenticationFailed("Unknown bootstrap token.")
        try:
            node, raw = agent_service.node_register(node=node, address=data["address"], hostname=data["hostname"])
        except agent_service.RegistrationRefused as refused:
            raise exceptions.AuthenticationFailed(f"Registration refused: {refused}.") from None
        return Response({
            "node_id": str(node.key),
            "node_token": raw,
            "role": node.role,
            "cluster": node.cluster.name,
            "ray": agent_service.ray_params(node.cluster, node),
            "heartbeat_interval_s": agent_service._interval(node.cluster, node),
        })


class HeartbeatView(APIView):
    """A node reports its health and Ray state; the reply carries its commands."""

    authentication_classes = [NodeTokenAuthentication]
    permission_classes = [AllowAny]  # authentication above is mandatory: checked in post()
    throttle_classes: list = []

    @extend_schema(request=HeartbeatInput, responses={200: HeartbeatOutput, **errors(400, 401, 403, 404)},
                   tags=["agent"])
    def post(self, request: Request, node_id: str) -> Response:
        node = request.auth
        if node is None:
            raise exceptions.NotAuthenticated("A node token is required.")
        if str(node.key) != str(node_id).lower():
            raise exceptions.PermissionDenied("This node token speaks only for its own node.")
        data = HeartbeatInput.validated(request.data)
        reply = agent_service.node_heartbeat(node=node, state=data["state"], message=data["message"],
                                             ray=data.get("ray") or {})
        return Response({"commands": reply.commands, "heartbeat_interval_s": reply.heartbeat_interval_s})
