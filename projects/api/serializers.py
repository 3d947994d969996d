"""Inputs and outputs of the blob and snapshot endpoints."""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

from django.core.validators import RegexValidator
from rest_framework import serializers

from controlplane.api.fields import StrictCharField, StrictIntegerField, StrictSerializer
from projects.models import MAX_SNAPSHOT_FILES

SHA256_REGEX = r"[0-9a-f]{64}"
MAX_MISSING_QUERY = 10_000
MAX_PATH = 4096
MAX_INLINE_BLOB_BYTES = 1024 * 1024  # blobs sent in a snapshot request, in all (decoded)

sha256_validator = RegexValidator(rf"^{SHA256_REGEX}\Z", "A SHA-256 is 64 lowercase hexadecimal characters.")


def sha256_field(**kw) -> StrictCharField:
    return StrictCharField(min_length=64, max_length=64, validators=[sha256_validator], trim_whitespace=False, **kw)


class BlobsMissingIn(StrictSerializer):
    sha256 = serializers.ListField(child=sha256_field(), max_length=MAX_MISSING_QUERY,
                                   help_text=f"Hashes to check, at most {MAX_MISSING_QUERY}.")

    def to_internal_value(self, data):
        """A list of well-formed hashes is taken as it is; any other input goes through the fields for their errors.

        The list's field runs each hash through its field and validators, about 8 microseconds a hash: most of
        the time of a `blobs/missing` of 5,000 hashes. A string that fullmatches SHA256_REGEX passes them all.
        """
        _refuse_long_list(data, "sha256", MAX_MISSING_QUERY)
        if isinstance(data, dict) and data.keys() == {"sha256"} and _plain_hashes(data["sha256"]):
            return {"sha256": data["sha256"]}
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


def _plain_hashes(hashes: object) -> bool:
    """Whether `hashes` is a list of which every item passes exactly the checks of sha256_field."""
    match = _SHA256_RE.match
    return type(hashes) is list and all(type(h) is str and match(h) for h in hashes)


def _plain_path(path: object) -> bool:
    """Whether `path` passes exactly the checks of a manifest path (check_path, its length, no surrogates)."""
    if type(path) is not str or not 0 < len(path) <= MAX_PATH or path[0] == "/" or "\x00" in path or "\\" in path:
        return False
    if not path.isascii() and _SURROGATE_RE.search(path):
        return False
    segments = path.split("/")
    return "" not in segments and "." not in segments and ".." not in segments


def _plain_entries(files: object) -> bool:
    """Whether every entry of `files` passes exactly the checks of SnapshotFileIn, and no path repeats."""
    if not isinstance(files, list):
        return False
    seen: set[str] = set()
    for f in files:
        if type(f) is not dict or f.keys() != _FILE_KEYS:
            return False
        path, sha256, size, mode = f["path"], f["sha256"], f["size"], f["mode"]
        if (type(sha256) is not str or type(size) is not int or type(mode) is not int or not _SHA256_RE.match(sha256)
                or size < 0 or not 0 <= mode <= 0o7777 or not _plain_path(path) or path in seen):
            return False
        seen.add(path)
    return True


def _plain_request(data: object) -> dict | None:
    """The request's lists as they are, if each passes exactly the checks of its field; else None.

    The nested serializer costs about 60 microseconds per entry, most of a 10,000-file sync's
    snapshot; a manifest from cloudctl is always well-formed, so it takes this path, and any
    other input takes the serializer's, which builds the per-field errors. `base`, one value,
    is left to its field.
    """
    if not isinstance(data, dict):
        return None
    if "digest" in data and not (type(data["digest"]) is str and _SHA256_RE.match(data["digest"])):
        return None
    digest = {"digest": data["digest"]} if "digest" in data else {}
    if data.keys() - {"digest"} == {"files"}:
        return {"files": data["files"], **digest} if _plain_entries(data["files"]) else None
    if "base" not in data or not data.keys() <= {"base", "changes", "removed", "digest"}:
        return None
    changes, removed = data.get("changes", []), data.get("removed", [])
    if (not _plain_entries(changes) or not isinstance(removed, list) or not all(_plain_path(p) for p in removed)
            or len(set(removed)) != len(removed)):
        return None
    return {"changes": changes, "removed": removed, **digest}


def _decode_blobs(blobs: dict[str, str]) -> dict[str, bytes]:
    """{sha256: bytes}: keys are SHA-256 hex, values strict base64, all of them at most MAX_INLINE_BLOB_BYTES."""
    decoded: dict[str, bytes] = {}
    errors: dict[str, list[str]] = {}
    for key, value in blobs.items():
        if not _SHA256_RE.match(key):
            errors[key] = ["Not a SHA-256 (64 lowercase hex digits)."]
            continue
        try:
            decoded[key] = base64.b64decode(value, validate=True)
        except ValueError:
            errors[key] = ["Not base64."]
    if errors:
        raise serializers.ValidationError(errors)
    if sum(len(data) for data in decoded.values()) > MAX_INLINE_BLOB_BYTES:
        raise serializers.ValidationError([f"Blobs sent inline total at most {MAX_INLINE_BLOB_BYTES} bytes; "
                                           f"upload larger ones first."])
    return decoded


def _plain_snapshot(data: object) -> dict | None:
    """The validated snapshot request, if every part of it passes exactly the checks of its field; else None.

    The lists as _plain_request takes them; `base` a string that is a UUID (as UUIDField reads
    it); `blobs` string values that _decode_blobs accepts (base64 is ASCII without NUL, so the
    string field's own checks pass too).
    """
    if not isinstance(data, dict) or any(isinstance(data.get(key), list) and len(data[key]) > MAX_SNAPSHOT_FILES
                                         for key in ("files", "changes", "removed")):
        return None
    plain = _plain_request({k: v for k, v in data.items() if k != "blobs"} if "blobs" in data else data)
    if plain is None:
        return None
    if "base" in data:
        if type(data["base"]) is not str:
            return None
        try:
            plain["base"] = uuid.UUID(hex=data["base"])
        except ValueError:
            return None
    if "blobs" in data:
        blobs = data["blobs"]
        if type(blobs) is not dict or not all(type(value) is str for value in blobs.values()):
            return None
        try:
            plain["blobs"] = _decode_blobs(blobs)
        except serializers.ValidationError:
            return None
    return plain


def _refuse_duplicates(paths: list[str], field: str | None = "path") -> None:
    """A path given twice is an error at its second index (under `field`, for a list of entries)."""
    seen: set[str] = set()
    errors: dict[str, dict | list] = {}
    for i, path in enumerate(paths):
        if path in seen:
            message = [f"Duplicate path: {path}."]
            errors[str(i)] = {field: message} if field else message
        seen.add(path)
    if errors:
        raise serializers.ValidationError(errors)


class SnapshotCreate(StrictSerializer):
    """Either the whole manifest (`files`), or a snapshot of the workspace (`base`) and how the new one differs."""

    files = serializers.ListField(child=SnapshotFileIn(), max_length=MAX_SNAPSHOT_FILES, required=False,
                                  help_text=f"The whole manifest, at most {MAX_SNAPSHOT_FILES} files.")
    base = serializers.UUIDField(required=False,
                                 help_text="Instead of `files`: a snapshot of this workspace that the new one is "
                                           "made from, with `changes` and without `removed`.")
    changes = serializers.ListField(child=SnapshotFileIn(), max_length=MAX_SNAPSHOT_FILES, required=False,
                                    help_text="With `base`: the files added or changed since it.")
    removed = serializers.ListField(
        child=StrictCharField(max_length=MAX_PATH, trim_whitespace=False, validators=[check_path]),
        max_length=MAX_SNAPSHOT_FILES, required=False, help_text="With `base`: the paths of it that are gone.")
    digest = sha256_field(required=False,
                          help_text="Optional: the digest the manifest must have. Per file, the line `path NUL "
                                    "sha256 NUL size NUL mode LF` (decimal numbers) is hashed with SHAKE-256 to "
                                    "512 bytes, read as a little-endian number; the numbers are summed modulo "
                                    "2**4096, and the digest is the SHA-256 (hex) of the sum's 512 bytes, "
                                    "little-endian. A manifest that comes out otherwise is refused (400 naming "
                                    "`digest`).")

    blobs = serializers.DictField(
        child=StrictCharField(trim_whitespace=False, allow_blank=True), required=False,
        help_text=f"Optional: the bytes of small new blobs, base64 by SHA-256, at most {MAX_INLINE_BLOB_BYTES} bytes "
                  f"in all: stored (each hash verified) before the manifest is recorded, in the same request. "
                  f"Bytes that do not hash to their key are a 400 naming it under `blobs`, and nothing is kept.")

    def to_internal_value(self, data):
        for key in ("files", "changes", "removed"):
            _refuse_long_list(data, key, MAX_SNAPSHOT_FILES)
        blobs = data.get("blobs") if isinstance(data, dict) else None
        plain = _plain_request({k: v for k, v in data.items() if k != "blobs"} if blobs is not None else data)
        if plain is None:
            return super().to_internal_value(data)
        for key in ("base", "blobs"):
            if key in data:
                try:
                    plain[key] = getattr(self, f"validate_{key}", lambda v: v)(
                        self.fields[key].run_validation(data[key]))
                except serializers.ValidationError as error:
                    raise serializers.ValidationError({key: error.detail}) from None
        return plain

    @classmethod
    def validated(cls, data: Any, **context: Any) -> dict:
        """A request as cloudctl sends it, every value well-formed, is validated in plain Python (_plain_snapshot);
        any other goes through the serializer, which builds the errors.

        Making the serializer and its fields cost about a tenth of a millisecond even for a
        snapshot of one changed file, which is on the critical path of an incremental sync.
        """
        plain = _plain_snapshot(data)
        return plain if plain is not None else super().validated(data, **context)

    def validate_blobs(self, blobs: dict[str, str]) -> dict[str, bytes]:
        return _decode_blobs(blobs)

    def validate_files(self, files: list[dict]) -> list[dict]:
        _refuse_duplicates([f["path"] for f in files])
        return files

    def validate_changes(self, changes: list[dict]) -> list[dict]:
        _refuse_duplicates([f["path"] for f in changes])
        return changes

    def validate_removed(self, removed: list[str]) -> list[str]:
        _refuse_duplicates(removed, field=None)
        return removed

    def validate(self, attrs: dict) -> dict:
        if "files" in attrs:
            extra = sorted(key for key in ("base", "changes", "removed") if key in attrs)
            if extra:
                raise serializers.ValidationError({key: ["Give either `files`, or `base` with `changes` and "
                                                         "`removed`, not both."] for key in extra})
        elif "base" not in attrs:
            raise serializers.ValidationError({"files": ["Give the whole manifest, or `base` with `changes` and "
                                                         "`removed`."]})
        return attrs


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
