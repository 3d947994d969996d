"""How long the autoscaler's policy takes: a round over many clusters, and one big burst.

    .venv/bin/python bench/autoscaler_round.py [--clusters 1000] [--rounds 25] [--runs 60]

(a) one planner round: `decide()` for each of 1,000 synthetic clusters (2-3 groups of
    CPU and GPU types, 0-20 workers in mixed states, random pending shapes and placement
    groups), repeated; (b) one decision for one cluster with 10,000 pending tasks of six
    shapes (GPU ones among them) plus placement groups, as Ray reports them (shape, count),
    and again with every task listed on its own. Inputs are built before timing; only
    `decide()` is timed. Prints a markdown table of medians and p99s.
Targets (issue 3): (a) < 1 s, (b) < 0.5 s. Ray's v2 planner hung on 4,000 pending tasks
(kuberay#3794) and stalled on 8,000 (ray#46473).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoscaler.planner import Decision, Demand, Gang, Group, HeadNode, NodeType, Quotas, WorkerNode, decide

GIB = float(1 << 30)
TYPES = [
    NodeType("cpu.small", {"CPU": 2, "memory": 8 * GIB}),
    NodeType("cpu.large", {"CPU": 16, "memory": 64 * GIB}),
    NodeType("mem.large", {"CPU": 8, "memory": 128 * GIB}),
    NodeType("gpu.1", {"CPU": 8, "GPU": 1, "memory": 32 * GIB}),
    NodeType("gpu.8", {"CPU": 96, "GPU": 8, "memory": 768 * GIB}),
]
SHAPES = [
    {"CPU": 1}, {"CPU": 2}, {"CPU": 0.5}, {"CPU": 4, "memory": 16 * GIB}, {"GPU": 1}, {"CPU": 1, "GPU": 1},
    {"CPU": 8, "GPU": 4}, {"memory": 4 * GIB}, {"CPU": 200},
]
STRATEGIES = ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]

Inputs = tuple[list[Group], list[WorkerNode], Demand, HeadNode, Quotas | None]


def synthetic_cluster(rng: random.Random, index: int) -> Inputs:
    groups = []
    for i, node_type in enumerate(rng.sample(TYPES, rng.randint(2, 3))):
        lo = rng.randint(0, 2)
        groups.append(Group(f"g{i}", node_type, lo, lo + rng.randint(1, 30), rng.choice([60.0, 300.0, 600.0])))
    nodes = []
    for j in range(rng.randint(0, 20)):
        g = rng.choice(groups)
        total = dict(g.node_type.resources)
        state = rng.choices(["ready", "launching", "draining"], [8, 2, 1])[0]
        busy = rng.random() < 0.5
        available = {k: (rng.uniform(0, v) if busy else v) for k, v in total.items()}
        nodes.append(WorkerNode(
            f"c{index}-n{j}", f"{g.name}-{j}", g.name, state, total, available if state == "ready" else total,
            ray_node_id=f"{index:04x}{j:04x}", idle_s=0.0 if busy else rng.uniform(0, 1200),
            launched_at_s=rng.uniform(0, 3600), ready_for_s=rng.uniform(0, 3000)))
    demand = Demand(
        pending=[(rng.choice(SHAPES), rng.randint(1, 200)) for _ in range(rng.randint(0, 6))],
        gangs=[Gang(rng.choice(STRATEGIES), [rng.choice(SHAPES[:7]) for _ in range(rng.randint(1, 4))], f"pg{k}")
               for k in range(rng.choice([0, 0, 0, 1, 2]))],
    )
    head = HeadNode({"CPU": 4, "memory": 16 * GIB}, {"CPU": rng.choice([0, 1, 4]), "memory": 8 * GIB})
    quotas = rng.choice([None, Quotas(max_workers_total=50, max_gpus=16, workers_elsewhere=rng.randint(0, 30),
                                      gpus_elsewhere=rng.randint(0, 8))])
    return groups, nodes, demand, head, quotas


def burst_cluster(separate: bool) -> Inputs:
    """One cluster, 10,000 pending tasks of six shapes and five placement groups."""
    groups = [
        Group("cpu", TYPES[0], 0, 3000, 300.0),
        Group("big", TYPES[1], 0, 500, 300.0),
        Group("mem", TYPES[2], 0, 200, 300.0),
        Group("gpu", TYPES[3], 0, 400, 300.0),
        Group("gpu8", TYPES[4], 0, 50, 300.0),
    ]
    rng = random.Random(3794)
    nodes = []
    for j in range(60):
        g = groups[j % len(groups)]
        total = dict(g.node_type.resources)
        nodes.append(WorkerNode(f"n{j}", f"{g.name}-{j}", g.name, "ready" if j % 4 else "launching", total,
                                {k: v * rng.random() for k, v in total.items()}, idle_s=0.0,
                                launched_at_s=600.0, ready_for_s=500.0))
    counts = [({"CPU": 1}, 4000), ({"CPU": 2}, 2000), ({"CPU": 4, "memory": 16 * GIB}, 1500),
              ({"CPU": 1, "GPU": 1}, 1200), ({"GPU": 1}, 800), ({"CPU": 0.5}, 500)]
    assert sum(c for _, c in counts) == 10_000
    pending = [(s, 1) for s, c in counts for _ in range(c)] if separate else counts
    gangs = [Gang("STRICT_SPREAD", [{"CPU": 2}] * 8, "spread"), Gang("STRICT_PACK", [{"GPU": 1}] * 8, "pack8"),
             Gang("PACK", [{"CPU": 4}] * 4, "pack"), Gang("SPREAD", [{"CPU": 1, "GPU": 1}] * 6, "spread-gpu"),
             Gang("STRICT_SPREAD", [{"GPU": 4, "CPU": 8}] * 3, "trainer")]
    head = HeadNode({"CPU": 8, "memory": 32 * GIB}, {"CPU": 2, "memory": 16 * GIB})
    return groups, nodes, Demand(pending=pending, gangs=gangs), head, None


def run(inputs: Inputs) -> Decision:
    groups, nodes, demand, head, quotas = inputs
    return decide(groups=groups, nodes=nodes, demand=demand, head=head, quotas=quotas)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()

    rng = random.Random(46473)
    fleet = [synthetic_cluster(rng, i) for i in range(args.clusters)]
    units = sum(c[2].units for c in fleet)
    nodes = sum(len(c[1]) for c in fleet)

    def round_() -> None:
        for cluster in fleet:
            run(cluster)

    grouped, separate = burst_cluster(separate=False), burst_cluster(separate=True)
    rows = [
        (f"(a) one round over {args.clusters:,} clusters ({nodes:,} workers, {units:,} pending units)",
         timed(round_, args.rounds), 1.0),
        ("(b) one decision, 10,000 pending tasks (6 shapes, as Ray reports them) + 5 placement groups",
         timed(lambda: run(grouped), args.runs), 0.5),
        ("(b') the same 10,000 tasks listed one by one",
         timed(lambda: run(separate), args.runs), 0.5),
    ]
    decision = run(grouped)
    print(f"autoscaler planner, Python {platform.python_version()}, {os.cpu_count()} CPUs, one thread")
    print()
    print("| what | median | p99 | runs | target |")
    print("|---|---|---|---|---|")
    for label, samples, target in rows:
        print(f"| {label} | {statistics.median(samples) * 1000:.1f} ms | {p99(samples) * 1000:.1f} ms | "
              f"{len(samples)} | < {target:g} s |")
    print()
    print(f"(b) decides: targets {decision.targets}, placed {decision.tally.placed:,}, "
          f"capped {decision.tally.capped:,}, infeasible {decision.tally.infeasible:,}")


if __name__ == "__main__":
    main()
