from __future__ import annotations

from collections import Counter

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from clusters.choices import NodeState
from clusters.models import Cluster, ClusterEvent, Node, NodeGroup
from clusters.providers.catalog import find_instance_type


class WorkerGroupOut(serializers.ModelSerializer):
    class Meta:
        model = NodeGroup
        fields = ["name", "instance_type", "min_workers", "max_workers", "spot", "target_workers"]
        read_only_fields = fields


def cost_so_far(cluster: Cluster, nodes: list[Node]) -> float:
    """Node-seconds times the catalog price of each node's type and market, to the second."""
    now = timezone.now()
    total = 0.0
    for node in nodes:
        if node.launched_at is None:
            continue
        itype = find_instance_type(cluster.provider, node.instance_type)
        if itype is None:
            continue
        spot = node.market == "spot" and itype.spot_price_per_hour
        price = itype.spot_price_per_hour if spot else itype.price_per_hour
        end = node.terminated_at or now
        total += max(0.0, (end - node.launched_at).total_seconds()) / 3600 * price
    return round(total, 6)


class ClusterSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="uid", read_only=True)
    head = serializers.SerializerMethodField()
    worker_groups = WorkerGroupOut(source="groups", many=True, read_only=True)
    nodes = serializers.SerializerMethodField(help_text="Node counts by state (terminated nodes not counted).")
    cost_so_far = serializers.SerializerMethodField(help_text="US dollars, from node uptime and catalog prices.")
    cloud_account = serializers.SerializerMethodField()
    ray_address = serializers.CharField(source="gcs_address", read_only=True,
                                        help_text="The head's GCS address, for `ray.init(address=...)` on its network.")

    class Meta:
        model = Cluster
        fields = [
            "id", "name", "provider", "region", "zone", "cloud_account", "runtime", "head", "worker_groups",
            "idle_timeout_minutes", "auto_stop_minutes", "tags", "status", "status_message", "created_at",
            "updated_at", "nodes", "dashboard_url", "ray_address", "cost_so_far",
        ]
        read_only_fields = fields

    def _nodes(self, obj: Cluster) -> list[Node]:
        cache = self.context.setdefault("_nodes", {})
        if obj.pk not in cache:
            cache[obj.pk] = list(obj.nodes.all())
        return cache[obj.pk]

    def get_head(self, obj: Cluster) -> dict[str, str]:
        return {"instance_type": obj.head_instance_type}

    def get_nodes(self, obj: Cluster) -> dict[str, int]:
        return dict(Counter(n.state for n in self._nodes(obj) if n.state != NodeState.TERMINATED))

    def get_cost_so_far(self, obj: Cluster) -> float:
        return cost_so_far(obj, self._nodes(obj))

    @extend_schema_field(serializers.CharField(allow_null=True, help_text="Always null for the local provider."))
    def get_cloud_account(self, obj: Cluster) -> None:
        return None


class NodeSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="key", read_only=True)
    group = serializers.CharField(source="group_name", read_only=True)
    uptime_seconds = serializers.SerializerMethodField()
    idle_seconds = serializers.SerializerMethodField(
        help_text="How long this node has been idle (no tasks or actors running), counted from Ray's first idle "
                  "report and used for scale-down; 0 while busy; null when unknown or the node is not up.")

    class Meta:
        model = Node
        fields = [
            "id", "name", "role", "group", "instance_type", "market", "state", "state_reason", "state_changed_at",
            "instance_id", "private_ip", "public_ip", "ray_node_id", "last_heartbeat_at", "created_at",
            "launched_at", "ready_at", "terminated_at", "uptime_seconds", "idle_seconds", "scale_note",
        ]
        read_only_fields = fields

    def get_uptime_seconds(self, obj: Node) -> float | None:
        if obj.launched_at is None:
            return None
        return round(((obj.terminated_at or timezone.now()) - obj.launched_at).total_seconds(), 1)

    def get_idle_seconds(self, obj: Node) -> float | None:
        if obj.state not in (NodeState.READY, NodeState.DRAINING):
            return None
        if obj.idle_since is not None:  # what the autoscaler goes by (see Node.idle_since)
            return round((timezone.now() - obj.idle_since).total_seconds(), 1)
        return None if obj.ray_idle_ms is None else round(obj.ray_idle_ms / 1000, 1)


class ClusterEventSerializer(serializers.ModelSerializer):
    node = serializers.CharField(source="node.name", read_only=True, default=None, allow_null=True)

    class Meta:
        model = ClusterEvent
        fields = ["id", "created_at", "kind", "level", "message", "node", "data"]
        read_only_fields = fields


class InstanceTypeSerializer(serializers.Serializer):
    provider = serializers.CharField()
    name = serializers.CharField()
    cpus = serializers.IntegerField()
    memory_gb = serializers.FloatField()
    gpus = serializers.IntegerField()
    gpu_type = serializers.CharField(allow_null=True)
    price_per_hour = serializers.FloatField()
    spot_price_per_hour = serializers.FloatField(allow_null=True)
    description = serializers.CharField()
