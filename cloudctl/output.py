"""Human output: tables and short renderings of API objects.

`out` and `err`, the rich consoles on stdout and stderr, are made on first use: rich takes about
30 ms to import, and `cloudctl sync` in a script prints one plain line.
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `cloudctl sync` pays for every import
if TYPE_CHECKING:
    from datetime import datetime
    from typing import Any

    from rich.console import Console
    from rich.table import Table

    out: Console
    err: Console


def _console(name: str) -> Console:
    from rich.console import Console

    console = Console(highlight=False, stderr=name == "err")
    globals()[name] = console
    return console


def __getattr__(name: str) -> Any:
    if name in ("out", "err"):
        return _console(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stderr_is_terminal() -> bool:
    """`err.is_terminal`, without importing rich where the answer is plainly no (no TTY, nothing forcing one)."""
    if "err" not in globals() and os.environ.get("TTY_COMPATIBLE") != "1" and os.environ.get("FORCE_COLOR") is None:
        isatty = getattr(sys.stderr, "isatty", None)
        try:
            if isatty is None or not isatty():
                return False
        except ValueError:  # closed
            return False
    return (globals().get("err") or _console("err")).is_terminal

STATUS_STYLE = {
    "RUNNING": "green", "FAILED": "red", "TERMINATED": "dim", "STOPPED": "yellow",
    "TERMINATING": "yellow", "STOPPING": "yellow",
}


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def age(timestamp: str | None, now: datetime | None = None) -> str:
    from datetime import UTC, datetime

    if not timestamp:
        return "-"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def nodes_summary(nodes: dict[str, int] | None) -> str:
    if not nodes:
        return "0"
    total = sum(nodes.values())
    parts = ", ".join(f"{count} {state.lower()}" for state, count in sorted(nodes.items()))
    return f"{total} ({parts})"


def cost(value: Any) -> str:
    try:
        amount = float(value or 0)
    except (TypeError, ValueError):
        return "-"
    return "<$0.01" if 0 < amount < 0.01 else f"${amount:.2f}"


def status_text(status: str) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def clusters_table(clusters: list[dict]) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "STATUS", "NODES", "COST", "AGE"):
        table.add_column(column, justify="right" if column == "COST" else "left")
    for c in clusters:
        table.add_row(c.get("name", ""), status_text(c.get("status", "")), nodes_summary(c.get("nodes")),
                      cost(c.get("cost_so_far")), age(c.get("created_at")))
    return table


def cluster_detail(c: dict) -> Table:
    from rich.table import Table

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    groups = ", ".join(
        f"{g.get('name')}: {g.get('instance_type')} x{g.get('min_workers', 0)}-{g.get('max_workers', 0)}"
        + (" spot" if g.get("spot") else "")
        for g in c.get("worker_groups") or []
    ) or "none"
    rows = [
        ("name", c.get("name")), ("status", status_text(c.get("status", ""))),
        ("message", c.get("status_message") or ""), ("provider", c.get("provider")),
        ("head", (c.get("head") or {}).get("instance_type")), ("workers", groups),
        ("nodes", nodes_summary(c.get("nodes"))), ("cost", cost(c.get("cost_so_far"))),
        ("dashboard", c.get("dashboard_url") or ""), ("age", age(c.get("created_at"))), ("id", c.get("id")),
    ]
    for key, value in rows:
        if value not in (None, ""):
            table.add_row(key, str(value))
    return table


def workspaces_table(workspaces: list[dict], current: str) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("", "SLUG", "NAME", "ROLE"):
        table.add_column(column)
    for w in workspaces:
        table.add_row("*" if w.get("slug") == current else "", w.get("slug", ""), w.get("name", ""),
                      w.get("role", ""))
    return table
