"""Sentences a person reads in a cluster's events: shapes, amounts and durations."""

from __future__ import annotations

from collections.abc import Mapping

GIB = float(1 << 30)
MIB = float(1 << 20)
BYTE_RESOURCES = frozenset({"memory", "object_store_memory"})
# Display order: the resources people look for first, then the rest alphabetically.
FIRST = {"CPU": 0, "GPU": 1, "memory": 2, "object_store_memory": 3}


def number(value: float) -> str:
    """2.0 → "2", 0.5 → "0.5", 1/3 → "0.33"."""
    if value == int(value):
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def amount(resource: str, value: float) -> str:
    """Bytes as GiB or MiB for memory resources; plain numbers otherwise."""
    if resource in BYTE_RESOURCES:
        if value >= GIB:
            return f"{number(round(value / GIB, 2))} GiB"
        return f"{number(round(value / MIB, 1))} MiB"
    return number(value)


def resource_order(resource: str) -> tuple[int, str]:
    return FIRST.get(resource, len(FIRST)), resource


def shape(resources: Mapping[str, float], only: Mapping[str, float] | None = None) -> str:
    """{"CPU": 1.0} → "{CPU: 1}"; with `only`, just the resources `only` names (0 if absent)."""
    keys = [k for k in (only if only is not None else resources) if only is not None or resources[k]]
    keys.sort(key=resource_order)
    return "{" + ", ".join(f"{k}: {amount(k, resources.get(k, 0.0))}" for k in keys) + "}"


def duration(seconds: float) -> str:
    """312 → "5m12s", 300 → "5m", 20 → "20s", 3720 → "1h2m", 0.5 → "0.5s"."""
    if seconds == float("inf"):
        return "long"
    if seconds < 10 and seconds != int(seconds):
        return f"{number(round(seconds, 1))}s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
