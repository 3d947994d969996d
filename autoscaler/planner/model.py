"""The planner's inputs and its output: frozen plain values, fed by the caller, no Django.

Resources are Ray's names and units: `{"CPU": 2.0, "GPU": 1.0, "memory": 4294967296.0}`
(memory in bytes), the same dictionaries Ray reports for node totals and pending shapes.
Every time is a duration in seconds, so the planner needs no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Shape = Mapping[str, float]
"""A resource dictionary: a node's capacity or one unit of demand."""

NodeState = Literal["launching", "ready", "draining"]
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
STRATEGIES: tuple[Strategy, ...] = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class NodeType:
    """A machine shape: the resources a fresh node of this type advertises to Ray."""

    name: str
    resources: Shape


@dataclass(frozen=True)
class Group:
    """A worker group: one node type, its bounds, and how long a node may sit idle."""

    name: str
    node_type: NodeType
    min_workers: int
    max_workers: int
    idle_timeout_s: float


@dataclass(frozen=True)
class WorkerNode:
    """One worker as the control plane and Ray see it.

    - `state`: "launching" (requested, provisioning or booting: on its way, counted at the
      full capacity of its type), "ready" (a Ray node), or "draining" (on its way out:
      neither capacity nor a member of its group's count).
    - `total` / `available`: Ray's view for a ready node; for a launching node, leave them
      empty or pass the type's resources (both mean "the type's full capacity").
    - `idle_s`: how long Ray reports the node idle (no tasks, actors or held objects);
      0 when busy; None when Ray has not said.
    - `launched_at_s`: seconds since its launch was requested (default: long ago, so a node
      the caller knows nothing about is never held by the new-node grace); `ready_for_s`:
      seconds since it joined Ray (None: unknown, `launched_at_s` stands in).
    - `running_tasks`: optional hint from the agent; a positive count always keeps the node.
    """

    key: str
    name: str
    group: str
    state: NodeState
    total: Shape = field(default_factory=dict)
    available: Shape = field(default_factory=dict)
    ray_node_id: str | None = None
    idle_s: float | None = None
    launched_at_s: float = math.inf
    ready_for_s: float | None = None
    running_tasks: int | None = None


@dataclass(frozen=True)
class HeadNode:
    """The head: its free resources absorb demand; it is never scaled or drained."""

    total: Shape
    available: Shape
    idle_s: float | None = None


@dataclass(frozen=True)
class Gang:
    """A pending placement group: placed all or nothing, following its strategy.

    STRICT_PACK: every bundle on one node. PACK: one node if one has room, else wherever.
    STRICT_SPREAD: each bundle on a distinct node. SPREAD: distinct where possible.
    """

    strategy: Strategy
    bundles: Sequence[Shape]
    name: str = ""


@dataclass(frozen=True)
class Demand:
    """What Ray is waiting for: task/actor shapes with counts, and placement groups."""

    pending: Sequence[tuple[Shape, int]] = ()
    gangs: Sequence[Gang] = ()

    @property
    def units(self) -> int:
        """Pending tasks/actors plus placement-group bundles."""
        return sum(max(0, int(c)) for _, c in self.pending) + sum(len(g.bundles) for g in self.gangs)


@dataclass(frozen=True)
class Quotas:
    """Workspace caps (None: unlimited) and what the workspace already uses elsewhere.

    The planner counts this cluster's non-draining workers itself; `*_elsewhere` is every
    other use the cap covers (other clusters' nodes, and this cluster's head if heads count).
    """

    max_workers_total: int | None = None
    max_gpus: float | None = None
    workers_elsewhere: int = 0
    gpus_elsewhere: float = 0.0


@dataclass
class Tally:
    """Where every pending unit (task, actor or bundle) went in one decision."""

    placed: int = 0  # onto free capacity, nodes on their way, or nodes this decision launches
    capped: int = 0  # feasible, but max_workers or a quota forbids the nodes it needs
    waiting: int = 0  # only an existing node (the head, say) can ever hold it, and it is full
    infeasible: int = 0  # nothing can ever hold it

    @property
    def total(self) -> int:
        return self.placed + self.capped + self.waiting + self.infeasible


@dataclass
class Decision:
    """One autoscaling decision for one cluster; every entry carries a sentence for its events.

    - `targets`: the new desired worker count per group, within [min_workers, max_workers].
    - `launch_reasons`: per group that grows, e.g. "cpu: 0 → 3 for 6 pending {CPU: 1}".
    - `drain`: (node key, reason) to drain through Ray and then terminate.
    - `keep`: (node key, reason) for every other non-draining worker: why it stays.
    - `infeasible`: (shape, count, reason) for demand no node type can ever hold.
    - `capped`: demand that could be served but max_workers or a quota forbids, with numbers.
    - `waiting`: demand only an existing node (the head) can hold, waiting for it to free up.
    """

    targets: dict[str, int] = field(default_factory=dict)
    launch_reasons: dict[str, str] = field(default_factory=dict)
    drain: list[tuple[str, str]] = field(default_factory=list)
    keep: list[tuple[str, str]] = field(default_factory=list)
    infeasible: list[tuple[dict[str, float], int, str]] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
