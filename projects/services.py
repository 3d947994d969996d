"""Project-sync services: store a blob (hash verified), say which blobs are missing, record a snapshot."""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings
from django.db import IntegrityError, transaction

from controlplane.errors import DomainError, ValidationFailed
from controlplane.models import User, Workspace
from controlplane.services import Actor, audit_record
from projects.models import Blob, Snapshot, SnapshotFile
from projects.storage import blob_key, blob_store

IN_BATCH = 500  # hashes per `IN (...)` query: SQLite caps the number of bound parameters


class HashMismatch(DomainError):
    status_code = 400
    code = "hash_mismatch"


class TooLarge(DomainError):
    status_code = 413
    code = "too_large"


def existing_hashes(workspace: Workspace, hashes: Iterable[str]) -> dict[str, int]:
    """{sha256: size} of those of `hashes` that are uploaded blobs of `workspace`."""
    wanted = list(dict.fromkeys(hashes))
    found: dict[str, int] = {}
    for i in range(0, len(wanted), IN_BATCH):
        found.update(Blob.objects.for_workspace(workspace).filter(sha256__in=wanted[i:i + IN_BATCH])
                     .values_list("sha256", "size"))
    return found


def blobs_missing(*, workspace: Workspace, hashes: list[str]) -> list[str]:
    """Those of `hashes` (in order, once each) that this workspace does not have."""
    found = existing_hashes(workspace, hashes)
    return [h for h in dict.fromkeys(hashes) if h not in found]


def blob_upload(*, workspace: Workspace, sha256: str, chunks: Iterable[bytes], actor: Actor,
                max_bytes: int | None = None) -> tuple[Blob, bool]:
    """Stream `chunks` into the store, verify they hash to `sha256`, record the blob once.

    Returns (blob, created). On a mismatch or an oversized body nothing is kept.
    """
    limit = settings.CUMULUS_BLOB_MAX_BYTES if max_bytes is None else max_bytes
    store = blob_store()
    key = blob_key(workspace.pk, sha256)
    with store.open_write(key) as writer:
        for chunk in chunks:
            if writer.size + len(chunk) > limit:
                raise TooLarge(f"The blob is larger than the limit of {limit} bytes.")
            writer.write(chunk)
        digest = writer.hexdigest()
        if digest != sha256:
            raise HashMismatch(f"The body hashes to {digest}, not to {sha256}; nothing was stored.",
                               {"sha256": [f"The body's SHA-256 is {digest}."]})
        existing = Blob.objects.for_workspace(workspace).filter(sha256=sha256).first()
        if existing is not None and store.exists(key):
            return existing, False  # the temporary copy is dropped on leaving the block
        writer.commit()
    if existing is not None:  # the row outlived its file: the file is back now
        return existing, False
    try:
        with transaction.atomic():
            blob = Blob.objects.create(workspace=workspace, sha256=sha256, size=writer.size)
            audit_record(actor=actor, action="blob.upload", target_type="blob", target_id=sha256,
                         workspace=workspace, data={"size": writer.size})
    except IntegrityError:  # a concurrent upload of the same bytes won the race
        return Blob.objects.for_workspace(workspace).get(sha256=sha256), False
    return blob, True


@transaction.atomic
def snapshot_create(*, workspace: Workspace, files: list[dict], actor: Actor) -> Snapshot:
    """Record a manifest whose entries are already well-formed (projects.api.serializers.SnapshotCreate).

    Every hash must be an uploaded blob of this workspace and every size must be that blob's.
    """
    found = existing_hashes(workspace, (f["sha256"] for f in files))
    errors: dict[str, dict[str, list[str]]] = {}
    missing: list[str] = []
    for i, f in enumerate(files):
        if f["sha256"] not in found:
            errors[str(i)] = {"sha256": ["Not an uploaded blob of this workspace: upload it first."]}
            missing.append(f["sha256"])
        elif found[f["sha256"]] != f["size"]:
            errors[str(i)] = {"size": [f"The blob {f['sha256']} is {found[f['sha256']]} bytes, not {f['size']}."]}
    if errors:
        fields: dict = {"files": errors}
        if missing:
            fields["missing"] = list(dict.fromkeys(missing))
        raise ValidationFailed(fields, message=f"The manifest is not valid ({len(errors)} bad entries, "
                                               f"{len(set(missing))} blobs missing).")
    snapshot = Snapshot.objects.create(
        workspace=workspace,
        created_by=actor.user if isinstance(actor.user, User) else None,
        total_size=sum(f["size"] for f in files),
        file_count=len(files),
    )
    SnapshotFile.objects.bulk_create(
        (SnapshotFile(snapshot=snapshot, path=f["path"], sha256=f["sha256"], size=f["size"], mode=f["mode"])
         for f in files),
        batch_size=2000,
    )
    audit_record(actor=actor, action="snapshot.create", target_type="snapshot", target_id=snapshot.pk,
                 workspace=workspace, data={"file_count": snapshot.file_count, "total_size": snapshot.total_size})
    return snapshot
