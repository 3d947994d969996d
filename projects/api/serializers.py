"""Inputs and outputs of the blob and snapshot endpoints."""

from __future__ import annotations

import re

from django.core.validators import RegexValidator
from rest_framework import serializers

from controlplane.api.fields import StrictCharField, StrictIntegerField, StrictSerializer

SHA256_REGEX = r"[0-9a-f]{64}"
MAX_MISSING_QUERY = 10_000
MAX_SNAPSHOT_FILES = 100_000
MAX_PATH = 4096

sha256_validator = RegexValidator(rf"^{SHA256_REGEX}\Z", "A SHA-256 is 64 lowercase hexadecimal characters.")


def sha256_field(**kw) -> StrictCharField:
    return StrictCharField(min_length=64, max_length=64, validators=[sha256_validator], trim_whitespace=False, **kw)


class BlobsMissingIn(StrictSerializer):
    sha256 = serializers.ListField(child=sha256_field(), max_length=MAX_MISSING_QUERY,
                                   help_text=f"Hashes to check, at most {MAX_MISSING_QUERY}.")

    def to_internal_value(self, data):
        _refuse_long_list(data, "sha256", MAX_MISSING_QUERY)
        return super().to_internal_value(data)


class BlobsMissingOut(serializers.Serializer):
    missing = serializers.ListField(child=serializers.CharField(), help_text="Those this workspace does not have.")


class BlobOut(serializers.Serializer):
    sha256 = serializers.CharField()
    size = serializers.IntegerField()
    created = serializers.BooleanField(help_text="False when the workspace already had this blob.")


class BlobBatchOut(serializers.Serializer):
    created = serializers.ListField(child=serializers.CharField(), help_text="Blobs stored and new to the workspace.")
    existing = serializers.ListField(child=serializers.CharField(), help_text="Blobs the workspace already had.")
    mismatched = serializers.ListField(child=serializers.CharField(),
                                       help_text="Blobs whose bytes did not hash to their SHA-256: not stored.")


def _refuse_long_list(data: object, key: str, limit: int) -> None:
    """Refuse an over-long list before validating each of its items (100,001 of them take seconds)."""
    if isinstance(data, dict) and isinstance(data.get(key), list) and len(data[key]) > limit:
        raise serializers.ValidationError({key: [f"Ensure this field has no more than {limit} elements."]})


def check_path(path: str) -> str:
    """A manifest path: relative, POSIX, normalised, with no way out of the project."""
    if "\x00" in path:
        raise serializers.ValidationError("A path may not contain NUL.")
    if path.startswith("/"):
        raise serializers.ValidationError("A path must be relative, not absolute.")
    if "\\" in path:
        raise serializers.ValidationError("A path uses '/' as its separator, not '\\'.")
    segments = path.split("/")
    if any(s == ".." for s in segments):
        raise serializers.ValidationError("A path may not contain a '..' segment.")
    if any(s in ("", ".") for s in segments):
        raise serializers.ValidationError("A path may not contain an empty or '.' segment.")
    return path


class SnapshotFileIn(StrictSerializer):
    path = StrictCharField(max_length=MAX_PATH, trim_whitespace=False, validators=[check_path],
                           help_text="Relative POSIX path, no '..' or empty segments.")
    sha256 = sha256_field()
    size = StrictIntegerField(min_value=0)
    mode = StrictIntegerField(min_value=0, max_value=0o7777, help_text="Permission bits, e.g. 420 (0o644).")


_FILE_KEYS = frozenset(("path", "sha256", "size", "mode"))
_SHA256_RE = re.compile(rf"{SHA256_REGEX}\Z")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _plain_manifest(data: object) -> list[dict] | None:
    """The manifest as it is, if every entry passes exactly the checks of SnapshotFileIn; else None.

    The nested serializer costs about 60 microseconds per entry, most of a 10,000-file sync's
    snapshot; a manifest from cloudctl is always well-formed, so it takes this path, and any
    other input takes the serializer's, which builds the per-field errors.
    """
    if not isinstance(data, dict) or data.keys() != {"files"} or not isinstance(data["files"], list):
        return None
    seen: set[str] = set()
    for f in data["files"]:
        if type(f) is not dict or f.keys() != _FILE_KEYS:
            return None
        path, sha256, size, mode = f["path"], f["sha256"], f["size"], f["mode"]
        if (type(path) is not str or type(sha256) is not str or type(size) is not int or type(mode) is not int
                or not 0 < len(path) <= MAX_PATH or not _SHA256_RE.match(sha256) or size < 0
                or not 0 <= mode <= 0o7777 or path in seen):
            return None
        if (path.startswith("/") or "\x00" in path or "\\" in path
                or (not path.isascii() and _SURROGATE_RE.search(path))
                or any(s in ("", ".", "..") for s in path.split("/"))):
            return None
        seen.add(path)
    return data["files"]


class SnapshotCreate(StrictSerializer):
    files = serializers.ListField(child=SnapshotFileIn(), max_length=MAX_SNAPSHOT_FILES,
                                  help_text=f"The manifest, at most {MAX_SNAPSHOT_FILES} files.")

    def to_internal_value(self, data):
        _refuse_long_list(data, "files", MAX_SNAPSHOT_FILES)
        plain = _plain_manifest(data)
        if plain is not None:
            return {"files": plain}
        return super().to_internal_value(data)

    def validate_files(self, files: list[dict]) -> list[dict]:
        seen: set[str] = set()
        errors: dict[str, dict[str, list[str]]] = {}
        for i, f in enumerate(files):
            if f["path"] in seen:
                errors[str(i)] = {"path": [f"Duplicate path: {f['path']}."]}
            seen.add(f["path"])
        if errors:
            raise serializers.ValidationError(errors)
        return files


class SnapshotOut(serializers.Serializer):
    id = serializers.UUIDField()
    file_count = serializers.IntegerField()
    total_size = serializers.IntegerField()
    created_at = serializers.DateTimeField()


class SnapshotFileOut(serializers.Serializer):
    path = serializers.CharField()
    sha256 = serializers.CharField()
    size = serializers.IntegerField()
    mode = serializers.IntegerField()


class SnapshotDetail(SnapshotOut):
    created_by = serializers.EmailField(source="created_by.email", allow_null=True, default=None)
    files = SnapshotFileOut(many=True)
