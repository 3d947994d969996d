"""The cluster spec of API.md and its complete validation.

One set of serializers validates the spec for the REST API, the CLI and the console, so
every client gets the same per-field messages, and nothing is written unless all of it
is valid.
"""

from __future__ import annotations

import re
from typing import Any

import ray
from django.conf import settings
from rest_framework import serializers

from clusters.providers.catalog import find_instance_type, instance_types
from controlplane.api.fields import (
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
    StrictSerializer,
)
from controlplane.models import SLUG_PATTERN

NAME_MESSAGE = "Use 1-63 lowercase letters, digits or hyphens, starting with a letter."
MAX_IDLE_TIMEOUT_MINUTES = 7 * 24 * 60
MAX_AUTO_STOP_MINUTES = 30 * 24 * 60
TAG_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _string_map(value: Any, *, key_pattern: re.Pattern[str], max_items: int, max_value: int, what: str) -> dict:
    if not isinstance(value, dict):
        raise serializers.ValidationError(f"Expected an object of {what}.")
    if len(value) > max_items:
        raise serializers.ValidationError(f"At most {max_items} {what}.")
    for key, item in value.items():
        if not key_pattern.match(key):
            raise serializers.ValidationError(f"{key!r} is not a valid key.")
        if not isinstance(item, str) or len(item) > max_value or "\x00" in item:
            raise serializers.ValidationError(
                f"The value of {key!r} must be a string of at most {max_value} characters."
            )
    return value


class TagsField(serializers.JSONField):
    def to_internal_value(self, data: Any) -> dict:
        return _string_map(data, key_pattern=TAG_KEY, max_items=50, max_value=255, what="tags")


class EnvField(serializers.JSONField):
    def to_internal_value(self, data: Any) -> dict:
        return _string_map(data, key_pattern=ENV_KEY, max_items=200, max_value=8192, what="environment variables")


class PipField(serializers.ListField):
    child = StrictCharField(max_length=200)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_length=200, **kwargs)


class RuntimeSpec(StrictSerializer):
    ray_version = StrictCharField(required=False, allow_null=True, max_length=32)
    pip = PipField(required=False, default=list)
    env = EnvField(required=False, default=dict)

    def validate_ray_version(self, value: str | None) -> str:
        if value not in (None, "", ray.__version__):
            raise serializers.ValidationError(
                f"Only the bundled Ray {ray.__version__} is available; omit the field or use it."
            )
        return ray.__version__


class HeadSpec(StrictSerializer):
    instance_type = StrictCharField(max_length=64)


class WorkerGroupSpec(StrictSerializer):
    name = StrictCharField(max_length=63)
    instance_type = StrictCharField(max_length=64)
    min_workers = StrictIntegerField(min_value=0, default=0)
    max_workers = StrictIntegerField(min_value=0)
    spot = StrictBooleanField(default=False)

    def validate_name(self, value: str) -> str:
        if not re.match(SLUG_PATTERN, value) or value == "head":
            raise serializers.ValidationError(NAME_MESSAGE + ' "head" is reserved.')
        return value

    def validate_max_workers(self, value: int) -> int:
        cap = settings.CUMULUS_MAX_WORKERS_PER_GROUP
        if value > cap:
            raise serializers.ValidationError(f"Ensure this value is less than or equal to {cap}.")
        return value

    def validate(self, attrs: dict) -> dict:
        if attrs["min_workers"] > attrs["max_workers"]:
            raise serializers.ValidationError({"min_workers": ["min_workers must not exceed max_workers."]})
        return attrs


class ClusterSpec(StrictSerializer):
    """The whole spec, as POSTed. Cross-field checks (instance types per provider) live in validate()."""

    name = StrictCharField(max_length=63)
    provider = StrictCharField(max_length=32, default="local")
    region = StrictCharField(max_length=64, required=False, allow_null=True, default=None)
    zone = StrictCharField(max_length=64, required=False, allow_null=True, default=None)
    cloud_account = serializers.JSONField(required=False, allow_null=True, default=None)
    runtime = RuntimeSpec(required=False)
    head = HeadSpec()
    worker_groups = WorkerGroupSpec(many=True, required=False, default=list, max_length=20)
    idle_timeout_minutes = StrictFloatField(min_value=0, max_value=MAX_IDLE_TIMEOUT_MINUTES, default=5)
    auto_stop_minutes = StrictFloatField(min_value=1, max_value=MAX_AUTO_STOP_MINUTES, required=False,
                                         allow_null=True, default=None)
    tags = TagsField(required=False, default=dict)

    def validate_name(self, value: str) -> str:
        if not re.match(SLUG_PATTERN, value):
            raise serializers.ValidationError(NAME_MESSAGE)
        return value

    def validate_provider(self, value: str) -> str:
        if value not in settings.CUMULUS_ENABLED_PROVIDERS:
            enabled = ", ".join(settings.CUMULUS_ENABLED_PROVIDERS)
            raise serializers.ValidationError(f"Unknown or disabled provider {value!r}; enabled: {enabled}.")
        return value

    def validate_cloud_account(self, value: Any) -> None:
        if value is not None:
            raise serializers.ValidationError("Cloud accounts are not available for this provider.")
        return None

    def to_internal_value(self, data: Any) -> Any:
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError as error:
            # Field errors stop DRF before validate(); report unknown instance types and duplicate
            # group names too, so one round trip shows everything that is wrong.
            if isinstance(error.detail, dict) and isinstance(data, dict):
                raise serializers.ValidationError(_merge(dict(error.detail), catalog_errors(data))) from None
            raise

    def validate(self, attrs: dict) -> dict:
        errors = catalog_errors(attrs)
        if errors:
            raise serializers.ValidationError(errors)
        attrs.setdefault("runtime", {"ray_version": ray.__version__, "pip": [], "env": {}})
        attrs["runtime"].setdefault("ray_version", ray.__version__)
        return attrs


def catalog_errors(data: dict) -> dict[str, Any]:
    """Instance types unknown to the provider and duplicate group names, from clean or raw input."""
    provider = data.get("provider", "local")
    if not isinstance(provider, str) or provider not in settings.CUMULUS_ENABLED_PROVIDERS:
        return {}  # the provider itself is the error, reported on its own field
    known = ", ".join(t.name for t in instance_types(provider))
    unknown = [f"Unknown instance type for {provider}; choose one of: {known}."]
    errors: dict[str, Any] = {}
    head = data.get("head")
    head_type = head.get("instance_type") if isinstance(head, dict) else None
    if isinstance(head_type, str) and not find_instance_type(provider, head_type):
        errors["head"] = {"instance_type": unknown}
    # Keyed by the group's index, like DRF's own errors for a list, so a client reads one
    # shape whichever check failed.
    group_errors: dict[int, dict] = {}
    seen: set[str] = set()
    groups = data.get("worker_groups")
    for index, group in enumerate(groups if isinstance(groups, list) else []):
        if not isinstance(group, dict):
            continue
        err: dict[str, list[str]] = {}
        itype = group.get("instance_type")
        if isinstance(itype, str) and not find_instance_type(provider, itype):
            err["instance_type"] = unknown
        name = group.get("name")
        if isinstance(name, str):
            if name in seen:
                err["name"] = ["Worker group names must be unique."]
            seen.add(name)
        if err:
            group_errors[index] = err
    if group_errors:
        errors["worker_groups"] = group_errors
    return errors


def _merge(errors: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Add `more` to DRF's `errors` without replacing a message DRF already gave for a field."""
    for key, extra in more.items():
        have = errors.get(key)
        if have is None:
            errors[key] = extra
        elif key == "head" and isinstance(have, dict):
            errors[key] = {**extra, **have}
        elif key == "worker_groups" and isinstance(extra, dict):
            if isinstance(have, list):  # DRF's list shape: one entry per group, {} when fine
                have = {i: e for i, e in enumerate(have) if e}
            if isinstance(have, dict):
                merged = {int(i): dict(e) for i, e in have.items()}
                for index, err in extra.items():
                    merged[index] = {**err, **merged.get(index, {})}
                errors[key] = dict(sorted(merged.items()))
    return errors


class ClusterPatch(StrictSerializer):
    """What may change on a live cluster. Provider, region and head type are fixed at creation."""

    worker_groups = WorkerGroupSpec(many=True, required=False, max_length=20)
    idle_timeout_minutes = StrictFloatField(min_value=0, max_value=MAX_IDLE_TIMEOUT_MINUTES, required=False)
    auto_stop_minutes = StrictFloatField(min_value=1, max_value=MAX_AUTO_STOP_MINUTES, required=False,
                                         allow_null=True)
    tags = TagsField(required=False)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            fixed = sorted(set(data) & {"name", "provider", "region", "zone", "head", "runtime", "cloud_account"})
            if fixed:
                raise serializers.ValidationError(
                    {key: ["Cannot be changed on an existing cluster; create a new one."] for key in fixed}
                )
        return super().to_internal_value(data)

    def validate(self, attrs: dict) -> dict:
        provider = self.context["cluster"].provider
        groups = attrs.get("worker_groups")
        if groups is not None:
            known = ", ".join(t.name for t in instance_types(provider))
            existing = {g.name: g for g in self.context["cluster"].groups.all()}
            group_errors: dict[int, dict] = {}  # by index, as in ClusterSpec.validate
            seen: set[str] = set()
            for index, group in enumerate(groups):
                err: dict[str, list[str]] = {}
                if not find_instance_type(provider, group["instance_type"]):
                    err["instance_type"] = [f"Unknown instance type for {provider}; choose one of: {known}."]
                elif group["name"] in existing and existing[group["name"]].instance_type != group["instance_type"]:
                    err["instance_type"] = ["The instance type of an existing group cannot change; add a new group."]
                if group["name"] in seen:
                    err["name"] = ["Worker group names must be unique."]
                seen.add(group["name"])
                if err:
                    group_errors[index] = err
            if group_errors:
                raise serializers.ValidationError({"worker_groups": group_errors})
        return attrs
