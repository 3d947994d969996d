"""The agent API: nodes connect outward to register and heartbeat. Nothing here is per user."""

from __future__ import annotations

import math
from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle
from rest_framework.views import APIView

from clusters import agent_service
from clusters.models import Node
from clusters.reconciler import node_for_bootstrap_token
from controlplane.api.fields import StrictCharField, StrictFloatField, StrictIntegerField, StrictSerializer
from controlplane.api.schema import errors
from runtime_agent import load as limits


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


class ResourceMap(serializers.DictField):
    """{resource name: amount}: names of 1-128 characters, finite amounts >= 0 (memory in bytes)."""

    child = StrictFloatField(min_value=0, max_value=limits.MAX_RESOURCE_VALUE)

    def __init__(self, **kwargs: Any) -> None:
        self.allow_empty_map = kwargs.pop("allow_empty", True)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> dict[str, float]:
        if not isinstance(data, dict):
            self.fail("not_a_dict", input_type=type(data).__name__)
        if len(data) > limits.MAX_RESOURCES:
            raise serializers.ValidationError(f"At most {limits.MAX_RESOURCES} resources.")
        if not data and not self.allow_empty_map:
            raise serializers.ValidationError("Must name at least one resource.")
        for key, value in data.items():
            if not 0 < len(key) <= limits.MAX_KEY_LEN:
                raise serializers.ValidationError(f"Resource names have 1 to {limits.MAX_KEY_LEN} characters.")
            if isinstance(value, float) and not math.isfinite(value):
                raise serializers.ValidationError({key: ["Must be a finite number."]})
        return super().to_internal_value(data)


class LabelMap(serializers.DictField):
    child = StrictCharField(max_length=limits.MAX_LABEL_VALUE_LEN, allow_blank=True)

    def to_internal_value(self, data: Any) -> dict[str, str]:
        if not isinstance(data, dict):
            self.fail("not_a_dict", input_type=type(data).__name__)
        if len(data) > limits.MAX_LABELS:
            raise serializers.ValidationError(f"At most {limits.MAX_LABELS} labels.")
        if any(not 0 < len(key) <= limits.MAX_KEY_LEN for key in data):
            raise serializers.ValidationError(f"Label keys have 1 to {limits.MAX_KEY_LEN} characters.")
        return super().to_internal_value(data)


class RayNodeLoad(StrictSerializer):
    node_id = serializers.RegexField(r"^[0-9a-f]{1,64}$", max_length=64)
    status = serializers.ChoiceField(choices=limits.NODE_STATUSES)
    total = ResourceMap()
    available = ResourceMap()
    idle_ms = StrictIntegerField(min_value=0, max_value=2**62)
    labels = LabelMap()


class RayDemand(StrictSerializer):
    shape = ResourceMap(allow_empty=False)
    count = StrictIntegerField(min_value=1, max_value=limits.MAX_COUNT)


class RayGang(StrictSerializer):
    id = StrictCharField(max_length=limits.MAX_KEY_LEN, allow_blank=True)
    strategy = serializers.ChoiceField(choices=limits.STRATEGIES)
    bundles = serializers.ListField(child=ResourceMap(allow_empty=False), min_length=1,
                                    max_length=limits.MAX_BUNDLES_PER_GANG)


class RayLoad(StrictSerializer):
    """The Ray cluster's load, as the head's agent reads it from the GCS (runtime_agent/load.py)."""

    nodes = serializers.ListField(child=RayNodeLoad(), max_length=limits.MAX_NODES)
    pending = serializers.ListField(child=RayDemand(), max_length=limits.MAX_SHAPES,
                                    help_text="Waiting tasks and actors by shape.")
    gangs = serializers.ListField(child=RayGang(), max_length=limits.MAX_GANGS,
                                  help_text="Pending placement groups.")
    constraints = serializers.ListField(child=RayDemand(), max_length=limits.MAX_SHAPES,
                                        help_text="request_resources() minimums.")
    collected_at = StrictFloatField(min_value=0, help_text="Unix time the agent read the GCS.")

    def validate_gangs(self, gangs: list[dict]) -> list[dict]:
        if sum(len(g["bundles"]) for g in gangs) > limits.MAX_BUNDLES_TOTAL:
            raise serializers.ValidationError(f"At most {limits.MAX_BUNDLES_TOTAL} bundles in all.")
        return gangs

    def validate_collected_at(self, value: float) -> float:
        if not math.isfinite(value):
            raise serializers.ValidationError("Must be a finite number.")
        return value


class RayReport(StrictSerializer):
    node_id = StrictCharField(max_length=64, required=False, allow_null=True, allow_blank=True, default=None)
    gcs_address = StrictCharField(max_length=100, required=False, allow_null=True, allow_blank=True, default=None)
    dashboard_url = StrictCharField(max_length=300, required=False, allow_null=True, allow_blank=True, default=None)
    alive_node_ids = serializers.ListField(child=StrictCharField(max_length=64), required=False, allow_null=True,
                                           max_length=10000, default=None)
    load = RayLoad(required=False, allow_null=True, default=None)


class HeartbeatInput(StrictSerializer):
    state = serializers.ChoiceField(choices=agent_service.AGENT_STATES)
    message = StrictCharField(max_length=2000, required=False, allow_blank=True, default="")
    ray = RayReport(required=False, default=dict)


class JobCommand(serializers.Serializer):
    id = serializers.UUIDField()
    snapshot_id = serializers.UUIDField()
    entrypoint = serializers.CharField()
    env = serializers.DictField(child=serializers.CharField())
    pip = serializers.ListField(child=serializers.CharField())
    status = serializers.CharField()
    log_offset = serializers.IntegerField(help_text="Bytes of the log the control plane has.")
    stop = serializers.BooleanField()


class Command(serializers.Serializer):
    type = serializers.ChoiceField(choices=["join", "stop", "drain", "run_job"])
    gcs_address = serializers.CharField(required=False)
    reason = serializers.CharField(required=False)
    job = JobCommand(required=False, help_text="run_job: an unfinished job of this head (sent every heartbeat).")


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


class NodeView(APIView):
    """Authenticated as one node: the URL's node id must be the token's node."""

    authentication_classes = [NodeTokenAuthentication]
    permission_classes = [AllowAny]  # the node token is mandatory: checked in node()
    throttle_classes: list = []

    def node(self, request: Request, node_id) -> Node:
        node = request.auth
        if node is None:
            raise exceptions.NotAuthenticated("A node token is required.")
        if str(node.key) != str(node_id).lower():
            raise exceptions.PermissionDenied("This node token speaks only for its own node.")
        return node


class HeartbeatView(NodeView):
    """A node reports its health and Ray state; the reply carries its commands."""

    @extend_schema(request=HeartbeatInput, responses={200: HeartbeatOutput, **errors(400, 401, 403, 404)},
                   tags=["agent"])
    def post(self, request: Request, node_id: str) -> Response:
        node = self.node(request, node_id)
        data = HeartbeatInput.validated(request.data)
        reply = agent_service.node_heartbeat(node=node, state=data["state"], message=data["message"],
                                             ray=data.get("ray") or {})
        return Response({"commands": reply.commands, "heartbeat_interval_s": reply.heartbeat_interval_s})
