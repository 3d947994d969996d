"""First-fit-decreasing bin packing over nodes that exist, are on their way, or may be launched.

Work is per distinct shape with a count, never per task: "how many units of this shape fit
in this node" is one division per resource, and identical new nodes are one `Bin` with a
multiplicity that splits only where a shape leaves some of them partly filled. So a burst
of 10,000 tasks of six shapes costs six passes over the bins, not 10,000 (Ray's v2 planner
placed requests one by one and hung on 4,000 pending tasks: kuberay#3794, ray#46473).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from autoscaler.planner.model import Group, Quotas, Shape, WorkerNode
from autoscaler.planner.text import number, plural

Need = tuple[tuple[str, float], ...]
"""A shape reduced to its positive resources, sorted by name: hashable, quick to test."""

EPS = 1e-9
UNBOUNDED = 1 << 62  # how many units of an empty shape fit anywhere


def need_of(resources: Shape) -> Need:
    return tuple(sorted((str(k), float(v)) for k, v in resources.items() if v > 0))


def total_of(needs: list[Need]) -> Need:
    summed: dict[str, float] = {}
    for need in needs:
        for k, v in need:
            summed[k] = summed.get(k, 0.0) + v
    return tuple(sorted(summed.items()))


def fit(free: Mapping[str, float], need: Need) -> int:
    """How many units of `need` fit in `free`: the minimum over resources of floor(free / need)."""
    best = UNBOUNDED
    for k, v in need:
        n = int(free.get(k, 0.0) / v + EPS)
        if n < best:
            if n <= 0:
                return 0
            best = n
    return best


def _wants_gpu(need: Need) -> bool:
    return any(k == "GPU" for k, _ in need)


def minus(free: Mapping[str, float], need: Need, times: int) -> dict[str, float]:
    left = dict(free)
    for k, v in need:
        left[k] = left.get(k, 0.0) - v * times
    return left


class Bin:
    """Free capacity of one node, or of `count` identical nodes this decision launches.

    `tier` orders where demand goes: 0 the head and busy ready workers, 1 idle ready workers
    (by `rank`: least idle first), 2 nodes on their way, 3 nodes launched by this decision.
    `node` is the worker (None for the head and new nodes); `group` is None for the head;
    `opened` is "min" or "demand" for nodes launched now; `label` is the first demand
    placed on the bin, for its keep reason.
    """

    __slots__ = ("count", "free", "group", "label", "node", "opened", "rank", "tier")

    def __init__(self, free: dict[str, float], count: int, node: WorkerNode | None, group: Group | None,
                 tier: int, rank: int = 0, opened: str = "") -> None:
        self.free = free
        self.count = count
        self.node = node
        self.group = group
        self.tier = tier
        self.rank = rank
        self.opened = opened
        self.label: str | None = None

    def copy(self, free: dict[str, float], count: int) -> Bin:
        return Bin(free, count, None, self.group, self.tier, self.rank, self.opened)


class Packer:
    """The mutable state of one decision's packing: bins, planned node counts, quota room.

    Gangs (placement groups) are all or nothing: `begin()` starts a journal, `rollback()`
    undoes every change since, `commit()` keeps them.
    """

    def __init__(self, groups: list[Group], caps: dict[str, dict[str, float]], planned: dict[str, int],
                 quotas: Quotas | None, workers_here: int, gpus_here: float) -> None:
        self.groups = groups
        self.caps = caps
        self.planned = dict(planned)  # nodes per group once this decision is carried out
        self.new = {g.name: 0 for g in groups}  # of which launched by this decision
        self.quotas = quotas or Quotas()
        self.workers_here = workers_here
        self.gpus_here = gpus_here
        q = self.quotas
        self.workers_room = (math.inf if q.max_workers_total is None
                             else q.max_workers_total - q.workers_elsewhere - workers_here)
        self.gpu_room = math.inf if q.max_gpus is None else q.max_gpus - q.gpus_elsewhere - gpus_here
        self.bins: list[Bin] = []
        # group -> label -> units that nodes launched for demand took at launch, for launch reasons
        self.reasons: dict[str, dict[str, int]] = {g.name: {} for g in groups}
        self.limits: list[str] = []  # what stopped growth during the current placement
        self.gpu_note = ""  # GPU groups passed over for CPU-only work in the current placement
        self._journal: dict[int, tuple[Bin, dict[str, float], int, str | None]] | None = None
        self._saved: tuple[list[Bin], dict[str, int], dict[str, int], float, float, dict[str, dict[str, int]]] | None
        self._saved = None

    # --- growth -------------------------------------------------------------------------

    def gpus_of(self, group: Group) -> float:
        return self.caps[group.name].get("GPU", 0.0)

    def room(self, group: Group) -> int:
        """How many more nodes `group` may launch; records the limit that says no."""
        room = float(group.max_workers - self.planned[group.name])
        limit = f"{group.name} at max_workers {group.max_workers}"
        if self.workers_room < room:
            room = self.workers_room
            q = self.quotas
            limit = (f"workspace quota max_workers_total {q.max_workers_total} reached ({q.workers_elsewhere} "
                     f"elsewhere, {self.workers_here + sum(self.new.values())} in this cluster)")
        gpus = self.gpus_of(group)
        if gpus > 0 and self.gpu_room != math.inf and int(self.gpu_room / gpus + EPS) < room:
            room = int(self.gpu_room / gpus + EPS)
            q = self.quotas
            here = self.gpus_here + sum(self.new[g.name] * self.gpus_of(g) for g in self.groups)
            limit = (f"workspace quota max_gpus {number(q.max_gpus or 0)} reached ({number(q.gpus_elsewhere)} "
                     f"elsewhere, {number(here)} in this cluster; a {group.name} node has {number(gpus)})")
        if room <= 0:
            if limit not in self.limits:
                self.limits.append(limit)
            return 0
        return int(room)

    def launch(self, group: Group, count: int, free: dict[str, float], opened: str) -> Bin:
        b = Bin(free, count, None, group, 3, opened=opened)
        self.bins.append(b)
        self.planned[group.name] += count
        self.new[group.name] += count
        self.workers_room -= count
        self.gpu_room -= count * self.gpus_of(group)
        return b

    def candidates(self, need: Need, left: int) -> list[tuple[Group, int]]:
        """Groups whose node type holds `need`, best first, with how many units one node holds.

        GPU types take CPU-only work only when no CPU type can hold it at all (Ray's
        AUTOSCALER_CONSERVE_GPU_NODES). Then, as Ray's utilization scorer: the highest
        utilisation of the requested resources, then of all the type's resources (least
        waste), then the most units per node (fewer launches), then the groups' order.
        """
        fitting = [(g, per) for g in self.groups if (per := fit(self.caps[g.name], need))]
        if not _wants_gpu(need):
            cpu_only = [(g, per) for g, per in fitting if self.gpus_of(g) <= 0]
            if cpu_only:
                if len(cpu_only) < len(fitting):
                    skipped = ", ".join(g.name for g, _ in fitting if self.gpus_of(g) > 0)
                    self.gpu_note = f"GPU group {skipped} is kept for GPU work"
                fitting = cpu_only

        def score(item: tuple[Group, int]) -> tuple[float, float, int]:
            group, per = item
            cap = self.caps[group.name]
            units = min(per, left)
            requested = min(units * v / cap[k] for k, v in need) if need else 0.0
            amounts = dict(need)
            kinds = [units * amounts.get(k, 0.0) / c for k, c in cap.items() if c > 0]
            mean = sum(kinds) / len(kinds) if kinds else 0.0
            return (-requested, -mean, -per)

        return sorted(fitting, key=score)  # stable: ties keep the groups' order

    def grow(self, need: Need, left: int, label: str) -> int:
        """Launch nodes for `left` units of `need`, best group first; returns units placed."""
        placed = 0
        for group, per in self.candidates(need, left):
            room = self.room(group)
            if not room:
                continue
            cap = self.caps[group.name]
            nodes = min(room, -(-left // per))
            full = min(nodes, left // per)
            took = 0
            if full:
                self.launch(group, full, minus(cap, need, per), "demand")
                took = full * per
            if nodes > full:  # one node with the rest, fewer than a full node's worth
                self.launch(group, 1, minus(cap, need, left - took), "demand")
                took = left
            reasons = self.reasons[group.name]
            reasons[label] = reasons.get(label, 0) + took
            placed += took
            left -= took
            if not left:
                break
        if left:  # say what stopped the rest
            for group, _ in self.candidates(need, left):
                self.room(group)
        return placed

    # --- placement ----------------------------------------------------------------------

    def fill(self, need: Need, count: int, label: str, *, may_launch: bool = True) -> int:
        """Place `count` units onto the bins, then onto new nodes. Returns units placed.

        Tier by tier (see `Bin`), and within a tier best fit: the bin that holds the fewest
        units of this shape first, so big holes stay for big shapes and the next decision,
        which sees this one's launches as nodes on their way, packs them the same way.
        CPU-only work takes the spare room of GPU nodes last, so it leaves GPU work its room.
        """
        if _wants_gpu(need):
            left = self._fit_into(need, count, label, None)
        else:
            left = self._fit_into(need, count, label, False)
            if left:
                left = self._fit_into(need, left, label, True)
        if left and may_launch:
            left -= self.grow(need, left, label)
        return count - left

    def _ranked(self, need: Need, gpu: bool | None, exclude: set[int] | None = None) -> list[tuple[int, Bin]]:
        """Bins with room for one unit, in placement order, with how many units each holds."""
        ranked = []
        for seq, b in enumerate(self.bins):
            if exclude and id(b) in exclude:
                continue
            if gpu is not None and (b.free.get("GPU", 0.0) > 0) != gpu:
                continue
            per = fit(b.free, need)
            if per:
                ranked.append((b.tier, b.rank, per, seq, b))
        ranked.sort(key=lambda r: r[:4])
        return [(r[2], r[4]) for r in ranked]

    def _fit_into(self, need: Need, left: int, label: str, gpu: bool | None) -> int:
        """Place up to `left` units on existing bins (with free GPU or without, unless `gpu` is
        None); returns how many are left."""
        for per, b in self._ranked(need, gpu):
            if b.label is None:
                b.label = label
            if b.count == 1:
                take = min(per, left)
                b.free = minus(b.free, need, take)
                left -= take
            else:  # identical new nodes: split into filled ones, one partly filled one, untouched ones
                full = min(b.count, left // per)
                if full:
                    self.bins.append(b.copy(minus(b.free, need, per), full))
                    b.count -= full
                    left -= full * per
                if left and b.count and left < per:
                    self.bins.append(b.copy(minus(b.free, need, left), 1))
                    b.count -= 1
                    left = 0
                if not b.count:
                    b.free = {}  # stands for no node now; fits nothing
            if not left:
                break
        return left

    def place_one(self, need: Need, label: str, *, exclude: set[int] | None = None, may_launch: bool = True,
                  spare_gpu: bool = True) -> Bin | None:
        """One unit onto the best bin with room (not one in `exclude`), else onto one new node.

        CPU-only work takes a GPU node's spare room last, and not at all if not `spare_gpu`.
        """
        for gpu in (None,) if _wants_gpu(need) else (False, True) if spare_gpu else (False,):
            ranked = self._ranked(need, gpu, exclude)
            if not ranked:
                continue
            b = ranked[0][1]
            self._touch(b)
            if b.count > 1:  # take one node out of identical new ones
                b.count -= 1
                b = b.copy(dict(b.free), 1)
                self.bins.append(b)
            b.free = minus(b.free, need, 1)
            if b.label is None:
                b.label = label
            return b
        if not may_launch:
            return None
        for group, _ in self.candidates(need, 1):
            if self.room(group):
                reasons = self.reasons[group.name]
                reasons[label] = reasons.get(label, 0) + 1
                return self.launch(group, 1, minus(self.caps[group.name], need, 1), "demand")
        return None

    # --- all or nothing -----------------------------------------------------------------

    def begin(self) -> None:
        self._journal = {}
        self._saved = (list(self.bins), dict(self.planned), dict(self.new), self.workers_room, self.gpu_room,
                       {g: dict(r) for g, r in self.reasons.items()})

    def commit(self) -> None:
        self._journal = None
        self._saved = None

    def rollback(self) -> None:
        assert self._journal is not None and self._saved is not None
        for b, free, count, label in self._journal.values():
            b.free, b.count, b.label = free, count, label
        self.bins, self.planned, self.new, self.workers_room, self.gpu_room, self.reasons = self._saved
        self.commit()

    def _touch(self, b: Bin) -> None:
        if self._journal is not None and id(b) not in self._journal:
            self._journal[id(b)] = (b, b.free, b.count, b.label)


def describe_units(label: str, units: int) -> str:
    """A launch reason's part: "6 pending {CPU: 1}" or "3 bundles of placement group pg (STRICT_SPREAD)"."""
    if label.startswith("placement group"):
        return f"{plural(units, 'bundle')} of {label}"
    return f"{units} pending {label}"
