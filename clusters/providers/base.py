"""The provider interface: how the reconciler creates, lists and terminates machines.

Providers exchange plain dataclasses with the reconciler, never models, so that each
cloud adapter can be tested on its own. Assumptions every implementation must honour:

- **Idempotent per node key.** `create_node` with a key that already has a live machine
  returns that machine and creates nothing. The key is the node's UUID, written to the
  database before the call, so a retry after a crash (or two workers at once) cannot
  launch a second machine.
- **Tagged.** Every machine carries the install id, cluster uid and node key as tags, so
  `list_nodes` can find it from the cloud alone and a leaked machine can be found.
- **Eventually consistent.** `list_nodes` may miss a machine created a moment ago; the
  reconciler gives a new machine a grace period before calling it lost.
- **Two classes of error.** `TransientProviderError` (throttling, 5xx, timeouts) is
  retried; `PermanentProviderError` (bad spec, quota, no capacity anywhere) fails the
  node with a reason a person can read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

InstanceStatus = Literal["pending", "running", "stopping", "terminated"]

TAG_INSTALL = "cumulus-install"
TAG_CLUSTER = "cumulus-cluster"
TAG_NODE = "cumulus-node"
TAG_ROLE = "cumulus-role"
TAG_GROUP = "cumulus-group"


class ProviderError(Exception):
    """Base class of everything a provider raises on purpose."""


class TransientProviderError(ProviderError):
    """Worth retrying: throttling, a 5xx, a timeout, a capacity blip."""


class PermanentProviderError(ProviderError):
    """Retrying the same request cannot succeed: bad spec, quota, unknown type."""


@dataclass(frozen=True)
class InstanceTypeInfo:
    """One entry of a provider's catalog."""

    provider: str
    name: str
    cpus: int
    memory_gb: float
    gpus: int = 0
    gpu_type: str | None = None
    price_per_hour: float = 0.0
    spot_price_per_hour: float | None = None
    description: str = ""


@dataclass(frozen=True)
class Bootstrap:
    """What a new machine needs to find and join the control plane (outbound only)."""

    control_plane_url: str
    bootstrap_token: str  # one-time; exchanged at registration for a node token


@dataclass(frozen=True)
class LaunchRequest:
    """Create exactly one machine for one node row."""

    node_key: str  # the node's UUID: idempotency key and tag
    cluster_uid: str
    cluster_name: str
    workspace: str
    role: Literal["head", "worker"]
    group: str  # worker group name; "head" for the head
    instance_type: InstanceTypeInfo
    bootstrap: Bootstrap
    spot: bool = False
    region: str | None = None
    zone: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Instance:
    """A machine as the provider sees it."""

    instance_id: str
    node_key: str
    cluster_uid: str
    status: InstanceStatus
    instance_type: str
    private_ip: str | None = None
    public_ip: str | None = None
    launched_at: float | None = None  # unix seconds
    tags: dict[str, str] = field(default_factory=dict)


class NodeProvider(Protocol):
    """One per cloud. Implementations are cheap to construct and hold no per-cluster state."""

    name: str

    def create_node(self, request: LaunchRequest) -> Instance:
        """Launch one machine for `request.node_key`, or return the one that already exists."""
        ...

    def terminate_nodes(self, instance_ids: list[str]) -> None:
        """Terminate these machines. Unknown or already-terminated ids are not an error."""
        ...

    def list_nodes(self, cluster_uid: str | None = None) -> list[Instance]:
        """Every non-terminated machine of this install, or of one cluster."""
        ...

    def instance_types(self) -> list[InstanceTypeInfo]:
        """The catalog of machine types this provider can launch."""
        ...
