"""`decide()`: one cluster's pending demand and nodes in, an explained `Decision` out.

Order of work, each step on plain values:
1. Groups over `max_workers` (it was lowered) give up surplus nodes: idle ones first.
2. Capacity: free resources of the head and ready workers (busy ones first, then the
   least idle, so that the longest-idle nodes are left empty and can go), then nodes on
   their way at their type's full capacity, then nodes launched for `min_workers`.
3. Placement groups, then task/actor shapes, largest first (GPU, then resource kinds, then
   size), onto that capacity and then onto new nodes of the best-fitting group, within
   `max_workers` and the workspace quotas. Nothing can ever hold it: infeasible.
4. Idle ready workers beyond their group's timeout are drained, longest idle first, unless
   pending demand was placed on them, they are new, or `min_workers` needs them.
5. Targets: nodes that stay plus nodes launched, within [min_workers, max_workers].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from autoscaler.planner.model import Decision, Demand, Gang, Group, HeadNode, Quotas, WorkerNode
from autoscaler.planner.packing import Bin, Need, Packer, describe_units, fit, need_of, total_of
from autoscaler.planner.text import duration, number, plural, resource_order, shape

NEW_NODE_GRACE_S = 5.0
"""Shortest life of a new node before idle removal, whatever the idle timeout.

A node joins Ray idle and its first task starts ~0.4 s later, while the pending demand that
keeps it reaches us up to ~1 s late (ray-anchor §B2/§B3). Ray v1 with `idle_timeout 0`
removed nodes in the very update that launched them (§B2); a node also stays at least its
group's idle timeout after joining.
"""


def decide(*, groups: Sequence[Group], nodes: Sequence[WorkerNode], demand: Demand, head: HeadNode | None = None,
           quotas: Quotas | None = None, new_node_grace_s: float = NEW_NODE_GRACE_S) -> Decision:
    """Plan one cluster: new desired worker counts, nodes to drain, and why, in sentences.

    Pure: no I/O and no clock. Nodes of groups not in `groups` are ignored (the reconciler
    removes them); draining nodes count for nothing.
    """
    decision = Decision()
    group_list = list(groups)
    members: dict[str, list[WorkerNode]] = {g.name: [] for g in group_list}
    for node in nodes:
        if node.state != "draining" and node.group in members:
            members[node.group].append(node)

    leaving = _drain_surplus(group_list, members, decision)
    caps = {g.name: _capacity(g, members[g.name]) for g in group_list}
    staying = [n for g in group_list for n in members[g.name] if n.key not in leaving]
    packer = Packer(
        group_list, caps,
        planned={g.name: sum(1 for n in members[g.name] if n.key not in leaving) for g in group_list},
        quotas=quotas, workers_here=len(staying),
        gpus_here=sum((n.total or caps[n.group]).get("GPU", 0.0) for n in staying),
    )
    node_bins = _existing_bins(packer, head, staying, caps)
    min_launched: dict[str, int] = {}
    for g in group_list:
        short = g.min_workers - packer.planned[g.name]
        min_launched[g.name] = max(0, short)
        if short > 0:
            packer.launch(g, short, dict(caps[g.name]), "min")

    holders = [dict(head.total)] if head else []
    holders += [dict(n.total or caps[n.group]) for n in staying]
    _place_demand(packer, demand, holders, decision)
    drained = _drain_idle(group_list, members, leaving, node_bins, decision, new_node_grace_s)

    for g in group_list:
        before = len(members[g.name])
        stay = before - sum(1 for n in members[g.name] if n.key in leaving or n.key in drained)
        target = min(max(stay + packer.new[g.name], g.min_workers), g.max_workers)
        decision.targets[g.name] = target
        if target > before:
            parts = [f"min_workers {g.min_workers}"] if min_launched[g.name] else []
            parts += [describe_units(label, units) for label, units in packer.reasons[g.name].items()]
            decision.launch_reasons[g.name] = f"{g.name}: {before} → {target} for {', '.join(parts)}"
    return decision


# --- capacity ---------------------------------------------------------------------------


def _capacity(group: Group, members: list[WorkerNode]) -> dict[str, float]:
    """What a new node of `group` will advertise: a ready member's Ray totals when there is
    one (the truth, should the configured type differ), else the configured type.

    `node:<ip>` resources are per node and do not carry over to a new one.
    """
    for node in members:
        if node.state == "ready" and node.total:
            return {k: float(v) for k, v in node.total.items() if not k.startswith("node:")}
    return {k: float(v) for k, v in group.node_type.resources.items()}


def _existing_bins(packer: Packer, head: HeadNode | None, staying: list[WorkerNode],
                   caps: dict[str, dict[str, float]]) -> dict[str, Bin]:
    ready = [n for n in staying if n.state == "ready"]
    # Busy nodes first, then the least idle: demand lands where it keeps the fewest nodes
    # alive, and the longest-idle nodes are the ones left empty to go.
    ready.sort(key=lambda n: (1, n.idle_s) if n.idle_s else (0, 0.0))
    by_key: dict[str, Bin] = {}
    if head is not None:
        packer.bins.append(Bin({k: float(v) for k, v in head.available.items()}, 1, None, None, 0))
    for rank, node in enumerate(ready):
        free = {k: float(v) for k, v in node.available.items()}
        by_key[node.key] = Bin(free, 1, node, None, 1 if node.idle_s else 0, rank if node.idle_s else 0)
        packer.bins.append(by_key[node.key])
    for node in staying:
        if node.state == "launching":
            by_key[node.key] = Bin(dict(node.total or caps[node.group]), 1, node, None, 2)
            packer.bins.append(by_key[node.key])
    return by_key


# --- demand -----------------------------------------------------------------------------


def _size_key(need: Need, scale: dict[str, float]) -> tuple[bool, int, float]:
    """First-fit-decreasing order: GPU shapes first, then more resource kinds, then bigger."""
    return (any(k == "GPU" for k, _ in need), len(need), sum(v / scale.get(k, 1.0) for k, v in need))


def _place_demand(packer: Packer, demand: Demand, holders: list[dict[str, float]], decision: Decision) -> None:
    tally = decision.tally
    caps = list(packer.caps.values())
    scale: dict[str, float] = {}
    for cap in caps + holders:
        for k, v in cap.items():
            scale[k] = max(scale.get(k, 0.0), v) or 1.0

    def feasible(need: Need) -> str:
        """"type" if a node type holds it, "existing" if only a node that exists does, else ""."""
        if any(fit(c, need) for c in caps):
            return "type"
        return "existing" if any(fit(h, need) for h in holders) else ""

    gangs = [(g, [need_of(b) for b in g.bundles]) for g in demand.gangs]
    gangs.sort(key=lambda item: _size_key(total_of(item[1]), scale), reverse=True)
    failed: dict[tuple[str, tuple[Need, ...]], tuple[str, str]] = {}
    for gang, needs in gangs:
        _place_gang(packer, gang, needs, feasible, failed, decision)

    merged: dict[Need, int] = {}
    originals: dict[Need, dict[str, float]] = {}
    for resources, count in demand.pending:
        if count <= 0:
            continue
        need = need_of(resources)
        merged[need] = merged.get(need, 0) + int(count)
        originals.setdefault(need, {k: float(v) for k, v in resources.items() if v > 0})
    for need in sorted(merged, key=lambda n: _size_key(n, scale), reverse=True):
        count = merged[need]
        label = shape(originals[need])
        if not need:  # asks for nothing: runs anywhere
            tally.placed += count
            continue
        where = feasible(need)
        if not where:
            decision.infeasible.append((originals[need], count, _infeasible_reason(packer, need, originals[need])))
            tally.infeasible += count
            continue
        packer.limits, packer.gpu_note = [], ""
        placed = packer.fill(need, count, label, may_launch=where == "type")
        tally.placed += placed
        left = count - placed
        if not left:
            continue
        if where == "existing":
            decision.waiting.append(f"{left} of {count} pending {label} wait: no worker type can hold it, "
                                    "only a node that is full now (the head)")
            tally.waiting += left
        else:
            decision.capped.append(f"{left} of {count} pending {label} not placed: {_limits(packer)}")
            tally.capped += left


def _place_gang(packer: Packer, gang: Gang, needs: list[Need], feasible_of: Callable[[Need], str],
                failed: dict[tuple[str, tuple[Need, ...]], tuple[str, str]], decision: Decision) -> None:
    tally = decision.tally
    units = len(needs)
    if not needs:
        return
    strategy = gang.strategy
    shapes = sorted({shape(dict(n)) for n in needs})
    label = f"placement group {gang.name + ' ' if gang.name else ''}({strategy})"
    summary = f"{label}, {units} x {shapes[0]}" if len(shapes) == 1 else f"{label}, bundles {', '.join(shapes)}"
    total = total_of(needs)
    required = [total] if strategy == "STRICT_PACK" else needs
    where = [feasible_of(n) for n in required]
    if not all(where):
        bad = next(n for n, w in zip(required, where, strict=True) if not w)
        reason = _infeasible_reason(packer, bad, dict(bad))
        decision.infeasible.append((dict(total), 1, f"{summary}: {reason}"))
        tally.infeasible += units
        return
    may_launch = all(w == "type" for w in where)
    signature = (strategy, tuple(sorted(needs)))
    if signature in failed:  # an identical gang just failed; state only fills up since
        kind, why = failed[signature]
        (decision.capped if kind == "capped" else decision.waiting).append(f"{summary} not placed: {why}")
        setattr(tally, kind, getattr(tally, kind) + units)
        return
    packer.limits, packer.gpu_note = [], ""
    ordered = sorted(needs, key=lambda n: sum(v for _, v in n), reverse=True)
    packer.begin()
    if _try_gang(packer, strategy, ordered, total, label, may_launch):
        packer.commit()
        tally.placed += units
        return
    packer.rollback()
    if not may_launch:
        why = "only existing nodes can hold its bundles, and they are full"
        kind = "waiting"
    else:
        spread = f"needs {units} distinct nodes; " if strategy == "STRICT_SPREAD" else ""
        why = spread + _limits(packer)
        kind = "capped"
    failed[signature] = (kind, why)
    (decision.capped if kind == "capped" else decision.waiting).append(f"{summary} not placed: {why}")
    setattr(tally, kind, getattr(tally, kind) + units)


def _try_gang(packer: Packer, strategy: str, needs: list[Need], total: Need, label: str, may_launch: bool) -> bool:
    if strategy == "STRICT_PACK":
        return packer.place_one(total, label, may_launch=may_launch) is not None
    if strategy == "PACK" and packer.place_one(total, label, may_launch=False) is not None:
        return True  # one existing node holds it all
    used: set[int] = set()
    for need in needs:
        if strategy == "STRICT_SPREAD":
            b = packer.place_one(need, label, exclude=used, may_launch=may_launch)
        elif strategy == "SPREAD":  # distinct if an existing node allows, shared before launching
            b = (packer.place_one(need, label, exclude=used, may_launch=False, spare_gpu=False)
                 or packer.place_one(need, label, may_launch=may_launch))
        else:  # PACK that no single existing node holds: first fit packs bundles together
            b = packer.place_one(need, label, may_launch=may_launch)
        if b is None:
            return False
        used.add(id(b))
    return True


def _limits(packer: Packer) -> str:
    return "; ".join([*packer.limits, *([packer.gpu_note] if packer.gpu_note else [])]) or "no group has room"


def _infeasible_reason(packer: Packer, need: Need, resources: dict[str, float]) -> str:
    """ "no worker type can ever fit {CPU: 64}: largest is local.medium {CPU: 2}" """
    label = shape(resources)
    if not packer.groups:
        return f"no worker type can ever fit {label}: the cluster has no worker groups"
    # The resource that falls furthest short, and the group richest in it.
    short_by: list[tuple[float, str]] = []
    for k, v in sorted(need, key=lambda kv: resource_order(kv[0])):
        most = max(packer.caps[g.name].get(k, 0.0) for g in packer.groups)
        short_by.append((most / v, k))
    ratio, resource = min(short_by)
    if ratio <= 0:
        return f"no worker type can ever fit {label}: no type has {resource}"
    best = max(packer.groups, key=lambda g: packer.caps[g.name].get(resource, 0.0))
    return (f"no worker type can ever fit {label}: largest is {best.node_type.name} "
            f"{shape(packer.caps[best.name], only=resources)}")


# --- scale-down -------------------------------------------------------------------------


def _drain_surplus(groups: list[Group], members: dict[str, list[WorkerNode]], decision: Decision) -> set[str]:
    """Nodes over a lowered max_workers: idle first (longest idle first), then nodes still
    launching (newest first), then busy ones."""
    leaving: set[str] = set()
    for g in groups:
        extra = len(members[g.name]) - g.max_workers
        if extra <= 0:
            continue

        def order(n: WorkerNode) -> tuple[int, float]:
            if n.state == "ready" and n.idle_s and not n.running_tasks:
                return (0, -n.idle_s)
            if n.state == "launching":
                return (1, n.launched_at_s)
            return (2, -(n.ready_for_s or n.launched_at_s))

        for node in sorted(members[g.name], key=order)[:extra]:
            leaving.add(node.key)
            decision.drain.append((node.key, f"node {node.name}: {g.name} has {len(members[g.name])} nodes, "
                                             f"over max_workers {g.max_workers} → draining"))
    return leaving


def _drain_idle(groups: list[Group], members: dict[str, list[WorkerNode]], leaving: set[str],
                node_bins: dict[str, Bin], decision: Decision, grace_s: float) -> set[str]:
    drained: set[str] = set()
    for g in groups:
        staying = [n for n in members[g.name] if n.key not in leaving]
        count = len(staying)
        staying.sort(key=lambda n: -(n.idle_s or 0.0))  # the longest idle goes first
        for node in staying:
            reason = _keep_reason(g, node, node_bins.get(node.key), grace_s)
            if reason is None and count <= g.min_workers:
                reason = f"kept: min_workers {g.min_workers} (idle {duration(node.idle_s or 0.0)})"
            if reason is not None:
                decision.keep.append((node.key, reason))
                continue
            count -= 1
            drained.add(node.key)
            decision.drain.append(
                (node.key, f"node {node.name} idle {duration(node.idle_s or 0.0)} > {duration(g.idle_timeout_s)} "
                           "→ draining"))
    return drained


def _keep_reason(group: Group, node: WorkerNode, b: Bin | None, grace_s: float) -> str | None:
    """Why `node` stays; None if it is idle past its group's timeout and may be drained."""
    if node.state == "launching":
        if b is not None and b.label is not None:
            return f"kept: launching, pending {b.label} will run on it"
        return f"kept: launching ({duration(node.launched_at_s)} ago)"
    if node.running_tasks:
        return f"kept: {plural(node.running_tasks, 'task')} running"
    if node.idle_s is None:
        return "kept: Ray has not reported its idle time"
    if node.idle_s <= 0:
        used = [f"{k} {number(node.total.get(k, 0.0) - v)} of {number(node.total.get(k, 0.0))}"
                for k, v in sorted(node.available.items(), key=lambda kv: resource_order(kv[0]))
                if k in ("CPU", "GPU") and node.total.get(k, 0.0) - v > 0]
        return f"kept: busy ({', '.join(used)} in use)" if used else "kept: busy (Ray reports it in use)"
    if b is not None and b.label is not None:
        return f"kept: pending {b.label} fits on it"
    if node.idle_s <= group.idle_timeout_s:
        return f"kept: idle {duration(node.idle_s)} of {duration(group.idle_timeout_s)}"
    age = node.ready_for_s if node.ready_for_s is not None else node.launched_at_s
    grace = max(group.idle_timeout_s, grace_s)
    if age < grace:
        return f"kept: launched {duration(age)} ago for pending demand (grace {duration(grace)})"
    return None


