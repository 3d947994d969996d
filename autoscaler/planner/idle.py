"""How long a whole cluster has been idle, and whether `auto_stop_minutes` says stop it."""

from __future__ import annotations

from collections.abc import Sequence

from autoscaler.planner.model import Demand, HeadNode, WorkerNode


def cluster_idle_s(*, head: HeadNode | None, nodes: Sequence[WorkerNode], demand: Demand) -> float | None:
    """Seconds the Ray cluster has done nothing: the least idle time over the head and ready
    workers. 0 while demand is pending or any node is busy; None while unknown (no head, or
    a node whose idle time Ray has not reported). Launching and draining workers are not
    Ray's work and do not count."""
    if demand.units:
        return 0.0
    if head is None:
        return None
    idle: list[float | None] = [head.idle_s]
    for node in nodes:
        if node.state == "ready":
            idle.append(0.0 if node.running_tasks else node.idle_s)
    if any(s is None for s in idle):
        return None
    return min(s for s in idle if s is not None)


def auto_stop_due(idle_s_of_cluster: float | None, has_running_job: bool, auto_stop_minutes: float | None) -> bool:
    """True when a cluster with auto-stop on, no running job, has been idle longer than
    `auto_stop_minutes` (strictly longer, as for node idle timeouts)."""
    if auto_stop_minutes is None or has_running_job or idle_s_of_cluster is None:
        return False
    return idle_s_of_cluster > auto_stop_minutes * 60.0
