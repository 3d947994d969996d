"""The Ray cluster's load, read on the head from the GCS and turned into plain JSON.

Source: the GCS RPC `AutoscalerStateService.GetClusterResourceState`, the exact input of
Ray's own v2 autoscaler, called the way `ray.autoscaler.v2.sdk.get_cluster_resource_state`
calls it but with a timeout (the sdk function has none, and a stuck GCS must not stall the
agent's loop). One reused `GcsClient`; well under 1 ms a call. The GCS pulls every raylet's
load once a second, so the data is at most about 1 s old.

The JSON (the contract the control plane validates and the planner consumes)::

    {"nodes": [{"node_id": hex, "status": "RUNNING"|"IDLE"|"DRAINING"|"DEAD",
                "total": {res: float}, "available": {res: float}, "idle_ms": int, "labels": {str: str}}],
     "pending": [{"shape": {res: float}, "count": int}],        # waiting tasks and actors
     "gangs": [{"id": pg_id_hex, "strategy": "PACK"|"SPREAD"|"STRICT_PACK"|"STRICT_SPREAD",
                "bundles": [{res: float}, ...]}],               # pending placement groups
     "constraints": [{"shape": {res: float}, "count": int}],    # request_resources()
     "collected_at": unix_seconds}

Resource maps hold only resources a node type can provide. Ray's implicit resources are
removed everywhere: `node:<ip>` / `node:__internal_head__` (one per node, pins work to it)
and the per-placement-group ones (`CPU_group_<pg>`, `CPU_group_<i>_<pg>`,
`bundle_group_<pg>`; they re-label capacity a placed group already holds). A pending
request that *needs* an implicit resource is pinned to an existing node or to an already
placed group, so no new node can serve it: it is left out of `pending`. Memory and
`object_store_memory` are in bytes, as Ray reports them.

Placement groups: the strategy and id come from the gang's `details`, which the GCS
formats as "<pg_id_hex>:<STRATEGY>|<STATE>" (STATE: PENDING or RESCHEDULING). If that ever
fails to parse they are derived from the bundles' constraints: anti-affinity on the label
`_PG_<pg_id>` is STRICT_SPREAD, affinity is STRICT_PACK, neither is PACK.

`request_resources()` lands in `cluster_resource_constraints` only when the head runs
with the autoscaler v2 flag; otherwise Ray keeps it in the GCS KV key
`autoscaler_resource_request` as a JSON list of bundles. Both are read.

Only the standard library here; `ray` is imported lazily.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from typing import Any

logger = logging.getLogger(__name__)

# Bounds the control plane enforces on the payload (clusters/agent_api/views.py mirrors
# them; a test checks that they agree). The agent trims to them so that a big cluster
# never turns its own heartbeat into a 400.
MAX_NODES = 2000
MAX_SHAPES = 1000  # distinct shapes in `pending`, and in `constraints`
MAX_GANGS = 1000
MAX_BUNDLES_PER_GANG = 1000
MAX_BUNDLES_TOTAL = 10000
MAX_RESOURCES = 256  # keys in one resource map
MAX_LABELS = 128
MAX_KEY_LEN = 128
MAX_LABEL_VALUE_LEN = 256
MAX_RESOURCE_VALUE = 1e18
MAX_COUNT = 10**9

NODE_STATUSES = ("RUNNING", "IDLE", "DRAINING", "DEAD")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# ray._private.ray_constants.AUTOSCALER_RESOURCE_REQUEST_CHANNEL
KV_RESOURCE_REQUEST_KEY = b"autoscaler_resource_request"

_PG_RESOURCE = re.compile(r"_group_(\d+_)?[0-9a-f]{36}$")  # ray's placement-group resource names (pg id: 18 bytes)
_DETAILS = re.compile(r"^([0-9a-f]+):([A-Z_]+)\|([A-Z_]+)$")
_PG_LABEL_PREFIX = "_PG_"


def is_implicit(resource: str) -> bool:
    """A resource Ray adds on its own, that no node type can be asked to provide."""
    return resource.startswith("node:") or bool(_PG_RESOURCE.search(resource))


def _number(value: float) -> float:
    return min(float(value), MAX_RESOURCE_VALUE)


def resource_map(entries: Any) -> dict[str, float]:
    """A protobuf map (or dict) of resources without Ray's implicit ones; zero amounts dropped."""
    out: dict[str, float] = {}
    for name, value in entries.items():
        if is_implicit(name) or len(name) > MAX_KEY_LEN or not value > 0:
            continue
        out[name] = _number(value)
        if len(out) >= MAX_RESOURCES:
            break
    return out


def demand_shape(entries: Any) -> dict[str, float] | None:
    """The shape a new node must provide, or None when the demand needs an implicit resource (pinned)."""
    out: dict[str, float] = {}
    for name, value in entries.items():
        if not value > 0:
            continue
        if is_implicit(name) or len(name) > MAX_KEY_LEN:
            return None
        out[name] = _number(value)
    if not out or len(out) > MAX_RESOURCES:
        return None
    return out


def _shape_key(shape: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(shape.items()))


def _by_count(counts: Counter[tuple[tuple[str, float], ...]]) -> list[dict[str, Any]]:
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_SHAPES]
    return [{"shape": dict(key), "count": min(count, MAX_COUNT)} for key, count in ordered]


def _requests_by_count(requests: Any) -> list[dict[str, Any]]:
    counts: Counter[tuple[tuple[str, float], ...]] = Counter()
    for by_count in requests:
        shape = demand_shape(by_count.request.resources_bundle)
        if shape is not None and by_count.count > 0:
            counts[_shape_key(shape)] += int(by_count.count)
    return _by_count(counts)


def _gang(gang: Any) -> dict[str, Any] | None:
    requests = gang.bundle_selectors[0].resource_requests if gang.bundle_selectors else gang.requests
    bundles = []
    for request in requests:
        shape = demand_shape(request.resources_bundle)
        if shape is None:
            return None  # pinned: the whole group waits on something no new node provides
        bundles.append(shape)
    if not bundles or len(bundles) > MAX_BUNDLES_PER_GANG:
        return None
    match = _DETAILS.match(gang.details or "")
    if match and match.group(2) in STRATEGIES:
        pg_id, strategy = match.group(1), match.group(2)
    else:
        pg_id, strategy = "", "PACK"
        for request in requests:
            for constraint in request.placement_constraints:
                if constraint.HasField("anti_affinity"):
                    strategy, label = "STRICT_SPREAD", constraint.anti_affinity.label_name
                elif constraint.HasField("affinity"):
                    strategy, label = "STRICT_PACK", constraint.affinity.label_name
                else:
                    continue
                pg_id = label.removeprefix(_PG_LABEL_PREFIX)
    return {"id": pg_id[:MAX_KEY_LEN], "strategy": strategy, "bundles": bundles}


def _node(state: Any, status_names: dict[int, str]) -> dict[str, Any] | None:
    status = status_names.get(state.status)
    if status not in NODE_STATUSES:
        return None
    labels = {
        k: v for k, v in list(state.labels.items())[:MAX_LABELS]
        if len(k) <= MAX_KEY_LEN and len(v) <= MAX_LABEL_VALUE_LEN
    }
    return {
        "node_id": state.node_id.hex(),
        "status": status,
        "total": resource_map(state.total_resources),
        "available": resource_map(state.available_resources),
        "idle_ms": max(0, int(state.idle_duration_ms)),
        "labels": labels,
    }


def kv_constraints(raw: bytes | None) -> list[dict[str, Any]]:
    """`request_resources()` bundles as Ray stores them in the GCS KV without the v2 flag."""
    if not raw:
        return []
    try:
        bundles = json.loads(raw)
    except ValueError:
        return []
    counts: Counter[tuple[tuple[str, float], ...]] = Counter()
    for bundle in bundles if isinstance(bundles, list) else []:
        if isinstance(bundle, dict) and isinstance(bundle.get("resources"), dict):
            bundle = bundle["resources"]  # the {"resources": ..., "label_selector": ...} form
        if not isinstance(bundle, dict):
            continue
        try:
            shape = demand_shape({str(k): float(v) for k, v in bundle.items()})
        except (TypeError, ValueError):
            continue
        if shape is not None:
            counts[_shape_key(shape)] += 1
    return _by_count(counts)


def load_from_state(state: Any, *, collected_at: float, kv_requests: bytes | None = None) -> dict[str, Any]:
    """The JSON contract from a `ClusterResourceState` protobuf (and the KV's request_resources())."""
    from ray.core.generated import autoscaler_pb2

    status_names = {value.number: value.name for value in autoscaler_pb2.NodeStatus.DESCRIPTOR.values}
    nodes = [n for n in (_node(s, status_names) for s in state.node_states) if n is not None][:MAX_NODES]
    gangs: list[dict[str, Any]] = []
    bundles_total = 0
    for gang in state.pending_gang_resource_requests:
        item = _gang(gang)
        if item is None:
            continue
        if len(gangs) >= MAX_GANGS or bundles_total + len(item["bundles"]) > MAX_BUNDLES_TOTAL:
            break
        bundles_total += len(item["bundles"])
        gangs.append(item)
    constraints: Counter[tuple[tuple[str, float], ...]] = Counter()
    for constraint in state.cluster_resource_constraints:
        for entry in _requests_by_count(constraint.resource_requests):
            constraints[_shape_key(entry["shape"])] += entry["count"]
    for entry in kv_constraints(kv_requests):
        constraints[_shape_key(entry["shape"])] += entry["count"]
    return {
        "nodes": nodes,
        "pending": _requests_by_count(state.pending_resource_requests),
        "gangs": gangs,
        "constraints": _by_count(constraints),
        "collected_at": round(collected_at, 3),
    }


def demand_signature(state: Any) -> frozenset[Any]:
    """What is waiting, without converting the nodes: pending shapes and pending group ids."""
    keys: set[Any] = set()
    for by_count in state.pending_resource_requests:
        shape = demand_shape(by_count.request.resources_bundle)
        if shape is not None and by_count.count > 0:
            keys.add(_shape_key(shape))
    for gang in state.pending_gang_resource_requests:
        item = _gang(gang)
        if item is not None:
            keys.add(("gang", item["id"]))
    return frozenset(keys)


def load_signature(load: dict[str, Any] | None) -> frozenset[Any]:
    """`demand_signature` of a load already converted (what the last heartbeat carried)."""
    if not load:
        return frozenset()
    keys: set[Any] = {_shape_key(p["shape"]) for p in load["pending"]}
    keys.update(("gang", g["id"]) for g in load["gangs"])
    return frozenset(keys)


class LoadReader:
    """Reads the cluster's load through one reused `GcsClient` (that of the agent's GCS probe)."""

    def __init__(self, gcs_client: Any, timeout_s: float = 1.0) -> None:
        self._client = gcs_client
        self.timeout_s = timeout_s

    def state(self) -> Any:
        """The raw `ClusterResourceState` (what `sdk.get_cluster_resource_state` returns)."""
        from ray.core.generated.autoscaler_pb2 import GetClusterResourceStateReply

        reply = GetClusterResourceStateReply()
        reply.ParseFromString(self._client.get_cluster_resource_state(timeout_s=self.timeout_s))
        return reply.cluster_resource_state

    def read(self) -> dict[str, Any]:
        """The full load JSON, for a heartbeat."""
        state = self.state()
        collected_at = time.time()
        try:
            kv = self._client.internal_kv_get(KV_RESOURCE_REQUEST_KEY, None, timeout=self.timeout_s)
        except Exception as exc:  # request_resources() hints are optional; the load is not
            logger.debug("agent.load.kv_failed error=%s", exc)
            kv = None
        return load_from_state(state, collected_at=collected_at, kv_requests=kv)
