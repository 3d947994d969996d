"""Small formatting helpers for the console's templates: status chips, durations, money."""

from __future__ import annotations

from datetime import datetime, timedelta

from django import template
from django.utils import timezone

register = template.Library()

# A chip's colour family per status or state; the word itself is always shown too, never colour alone.
CHIP_TONE: dict[str, str] = {
    "RUNNING": "ok", "READY": "ok", "SUCCEEDED": "ok",
    "PENDING": "busy", "PROVISIONING": "busy", "STARTING": "busy", "UPDATING": "busy", "REQUESTED": "busy",
    "BOOTING": "busy", "DRAINING": "busy", "STOPPING": "busy", "TERMINATING": "busy",
    "STOPPED": "idle", "TERMINATED": "idle",
    "FAILED": "bad", "LOST": "bad", "error": "bad", "warning": "warn", "info": "idle",
}
SETTLED = frozenset({"RUNNING", "STOPPED", "TERMINATED", "FAILED", "READY"})


@register.filter
def chip_tone(status: str) -> str:
    return CHIP_TONE.get(str(status), "idle")


@register.filter
def settled(status: str) -> bool:
    """Whether a status is where it will stay without anyone acting: no spinner for those."""
    return str(status) in SETTLED


@register.filter
def duration(value: timedelta | float | int | None) -> str:
    """'3d 4h', '2h 5m', '4m 10s', '12s': the two largest units, which is what a glance needs."""
    if value is None:
        return "—"
    seconds = int(value.total_seconds() if isinstance(value, timedelta) else value)
    seconds = max(0, seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


@register.filter
def age(moment: datetime | None) -> str:
    """How long ago `moment` was, as a duration."""
    return "—" if moment is None else duration(timezone.now() - moment)


@register.simple_tag
def span(start: datetime | None, end: datetime | None) -> str:
    """From `start` until `end` (or now); '—' if it never started."""
    if start is None:
        return "—"
    return duration((end or timezone.now()) - start)


@register.filter
def money(value: float | None) -> str:
    """US dollars: cents for sums that have them, four places for the fractions a short local run costs."""
    if value is None:
        return "—"
    return f"${value:,.2f}" if value >= 1 else f"${value:.4f}"


@register.filter
def minutes(value: float | None) -> str:
    """A setting in minutes as a person says it: '5 min', '2 h', 'off' (None)."""
    if value is None:
        return "off"
    if value >= 60 and value % 60 == 0:
        return f"{value / 60:g} h"
    return f"{value:g} min"
