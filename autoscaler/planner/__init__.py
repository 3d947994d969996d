"""The autoscaler's policy: pure functions from plain values to an explained decision.

    from autoscaler.planner import Demand, Group, NodeType, WorkerNode, decide
    decision = decide(groups=[...], nodes=[...], demand=Demand(pending=[({"CPU": 1}, 6)]))
    decision.targets          # {"cpu": 3}
    decision.launch_reasons   # {"cpu": "cpu: 0 → 3 for 6 pending {CPU: 1}"}

No I/O, no clock, no Django: the caller turns rows and Ray's report into these values and
the decision into desired counts, drains and events (issue 3).
"""

from autoscaler.planner.decide import NEW_NODE_GRACE_S, decide
from autoscaler.planner.idle import auto_stop_due, cluster_idle_s
from autoscaler.planner.model import (
    STRATEGIES,
    Decision,
    Demand,
    Gang,
    Group,
    HeadNode,
    NodeState,
    NodeType,
    Quotas,
    Shape,
    Strategy,
    Tally,
    WorkerNode,
)

__all__ = [
    "NEW_NODE_GRACE_S",
    "STRATEGIES",
    "Decision",
    "Demand",
    "Gang",
    "Group",
    "HeadNode",
    "NodeState",
    "NodeType",
    "Quotas",
    "Shape",
    "Strategy",
    "Tally",
    "WorkerNode",
    "auto_stop_due",
    "cluster_idle_s",
    "decide",
]
