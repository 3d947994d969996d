"""The create-cluster form: HTML form fields in, a cluster spec (API.md) out, the spec's own errors back.

There is no second set of rules here. The form only turns what a browser posts (strings) into the
JSON the REST API takes, hands that to `clusters.spec.ClusterSpec`, and places each of its error
messages beside the field it names. A number a person typed that is not a number is passed on as
the string it is, so the message is the API's "A valid integer is required.", word for word.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.http import QueryDict

from clusters.providers.base import InstanceTypeInfo
from clusters.providers.catalog import CATALOG, instance_types

ROW_FIELDS = ("name", "instance_type", "min_workers", "max_workers", "spot")
GROUP_FIELD = re.compile(r"^wg-(\d+)-(" + "|".join(ROW_FIELDS) + ")$")
MAX_GROUPS = 20  # the spec's own limit; the add button hides beyond it (a forged post still gets the spec's message)
DEFAULT_IDLE_TIMEOUT = "5"
DEFAULT_AUTO_STOP = "60"


def enabled_providers() -> list[str]:
    """Providers a person can choose: enabled in settings and known to the catalog, as the catalog API lists them."""
    return [p for p in settings.CUMULUS_ENABLED_PROVIDERS if p in CATALOG]


def type_label(t: InstanceTypeInfo) -> str:
    """'local.small: 1 CPU, 2 GB, no GPU, $0.010/h (spot $0.004/h)': what an option of a type select reads."""
    gpus = f"{t.gpus} GPU" + (f" ({t.gpu_type})" if t.gpu_type else "") if t.gpus else "no GPU"
    spot = f" (spot ${t.spot_price_per_hour:.3f}/h)" if t.spot_price_per_hour is not None else ""
    return f"{t.name}: {t.cpus} CPU, {t.memory_gb:g} GB, {gpus}, ${t.price_per_hour:.3f}/h{spot}"


def json_number(raw: str) -> Any:
    """'3' → 3, '2.5' → 2.5; anything else stays the string it was, for the spec to refuse in its own words."""
    text = raw.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return raw


@dataclass
class GroupRow:
    """One worker group as the form shows it; `key` names its inputs and survives adding and removing rows."""

    key: int
    name: str = "cpu"
    instance_type: str = ""
    min_workers: str = "0"
    max_workers: str = "2"
    spot: bool = False
    errors: dict[str, list[str]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """What this row's input names and ids start with: `wg-<key>-`."""
        return f"wg-{self.key}-"

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "instance_type": self.instance_type, "spot": self.spot}
        for name in ("min_workers", "max_workers"):
            value = getattr(self, name)
            if value.strip():  # empty: leave it out, so the spec's default or "This field is required." applies
                out[name] = json_number(value)
        return out


@dataclass
class ClusterForm:
    """What the create page shows and posts. `spec()` is what the API would have been sent."""

    name: str = ""
    provider: str = "local"
    head_instance_type: str = ""
    groups: list[GroupRow] = field(default_factory=list)
    idle_timeout_minutes: str = DEFAULT_IDLE_TIMEOUT
    auto_stop_minutes: str = DEFAULT_AUTO_STOP
    errors: dict[str, list[str]] = field(default_factory=dict)
    focus: str = "name"  # the input that gets the keyboard focus when the form is shown again

    @classmethod
    def initial(cls) -> ClusterForm:
        providers = enabled_providers()
        provider = providers[0] if providers else ""
        types = instance_types(provider)
        first = types[0].name if types else ""
        return cls(provider=provider, head_instance_type=first, groups=[GroupRow(key=0, instance_type=first)])

    @classmethod
    def from_post(cls, data: QueryDict) -> ClusterForm:
        rows: dict[int, GroupRow] = {}
        for key in data.getlist("wg"):  # one hidden input per row, in the order the page shows them
            if key.isdigit() and int(key) not in rows:
                rows[int(key)] = GroupRow(key=int(key), name="", instance_type="", min_workers="", max_workers="")
        for name, value in data.items():
            match = GROUP_FIELD.match(name)
            if match and int(match[1]) in rows:
                row = rows[int(match[1])]
                if match[2] == "spot":
                    row.spot = True
                else:
                    setattr(row, match[2], value)
        return cls(
            name=data.get("name", ""),
            provider=data.get("provider", ""),
            head_instance_type=data.get("head_instance_type", ""),
            groups=list(rows.values()),
            idle_timeout_minutes=data.get("idle_timeout_minutes", ""),
            auto_stop_minutes=data.get("auto_stop_minutes", ""),
        )

    # --- editing the form itself (add or remove a worker group) ---------------------------------------------
    def add_group(self) -> GroupRow:
        types = instance_types(self.provider)
        taken = {g.name for g in self.groups}
        names = itertools.chain(["cpu"], (f"group-{i}" for i in itertools.count(2)))
        name = next(n for n in names if n not in taken)
        row = GroupRow(key=max((g.key for g in self.groups), default=-1) + 1, name=name,
                       instance_type=types[0].name if types else "")
        self.groups.append(row)
        return row

    def remove_group(self, key: int) -> None:
        self.groups = [g for g in self.groups if g.key != key]

    @property
    def can_add_group(self) -> bool:
        return len(self.groups) < MAX_GROUPS

    # --- to the spec and back ------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": self.name,
            "provider": self.provider,
            "head": {"instance_type": self.head_instance_type},
            "worker_groups": [g.spec() for g in self.groups],
            "auto_stop_minutes": json_number(self.auto_stop_minutes) if self.auto_stop_minutes.strip() else None,
        }
        if self.idle_timeout_minutes.strip():
            spec["idle_timeout_minutes"] = json_number(self.idle_timeout_minutes)
        return spec

    def set_errors(self, detail: Any) -> None:
        """Place the spec's errors (the API's `fields`) beside the inputs they name."""
        self.errors = {}
        for group in self.groups:
            group.errors = {}
        if not isinstance(detail, dict):
            self._add("non_field_errors", detail)
            return
        for key, value in detail.items():
            if key == "head" and isinstance(value, dict):
                for sub, messages in value.items():
                    self._add("head_instance_type" if sub == "instance_type" else "non_field_errors", messages)
            elif key == "worker_groups":
                self._group_errors(value)
            elif key in ("name", "provider", "idle_timeout_minutes", "auto_stop_minutes"):
                self._add(key, value)
            else:
                self._add("non_field_errors", value)

    def _group_errors(self, value: Any) -> None:
        # DRF reports a list of groups as a list (one entry per group, {} when fine); the spec's own
        # checks report a dict keyed by index; a problem with the list itself is a list of strings
        # or {"non_field_errors": [...]}.
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            value = dict(enumerate(value))
        if not isinstance(value, dict):
            self._add("worker_groups", value)
            return
        for index, errors in value.items():
            position = int(index) if str(index).isdigit() else None
            if position is None or position >= len(self.groups) or not isinstance(errors, dict):
                self._add("worker_groups", errors)
                continue
            row = self.groups[position]
            for name, messages in errors.items():
                if name in ROW_FIELDS:
                    row.errors.setdefault(name, []).extend(_messages(messages))
                else:
                    self._add("worker_groups", messages)

    def _add(self, key: str, messages: Any) -> None:
        self.errors.setdefault(key, []).extend(_messages(messages))

    @property
    def has_errors(self) -> bool:
        return bool(self.errors) or any(g.errors for g in self.groups)


def _messages(value: Any) -> list[str]:
    """Every message in a DRF error detail, flattened to strings."""
    if isinstance(value, dict):
        return [m for v in value.values() for m in _messages(v)]
    if isinstance(value, (list, tuple)):
        return [m for v in value for m in _messages(v)]
    return [str(value)]
