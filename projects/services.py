"""Project-sync services: store a blob (hash verified), say which blobs are missing, record a snapshot (whole,
or as changes to an earlier one)."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, OuterRef
from django.db.models.constants import OnConflict
from django.utils import timezone

from controlplane.errors import DomainError, ValidationFailed
from controlplane.models import User, Workspace
from controlplane.services import Actor, audit_record
from projects.models import MAX_SNAPSHOT_FILES, Blob, Snapshot, SnapshotFile
from projects.storage import CHUNK_SIZE, BlobWriter, blob_key, blob_store

IN_BATCH = 500  # hashes per `IN (...)` query: SQLite caps the number of bound parameters
# A bundle (`blobs/batch`) is, per blob, a fixed header of 64 lowercase hex digits (SHA-256) and
# the size as 16 hex digits, then the bytes. Fixed-width, so it is read without searching for a
# delimiter, and the bytes need no escaping.
BATCH_HEADER = 80
BATCH_HEADER_RE = re.compile(rb"[0-9a-f]{64}[0-9a-f]{16}")
MAX_BATCH_BLOBS = 2_000
# A commit waits on the disk (fsync) or on S3; a bundle commits this many blobs at once while it
# reads the next ones, holding at most COMMITS_IN_FLIGHT writers (open files, buffered parts).
COMMIT_WORKERS = 4
COMMITS_IN_FLIGHT = 32


class HashMismatch(DomainError):
    status_code = 400
    code = "hash_mismatch"


class TooLarge(DomainError):
    status_code = 413
    code = "too_large"


class BadBundle(DomainError):
    status_code = 400
    code = "invalid_bundle"


def existing_hashes(workspace: Workspace, hashes: Iterable[str]) -> dict[str, int]:
    """{sha256: size} of those of `hashes` that are uploaded blobs of `workspace`."""
    wanted = list(dict.fromkeys(hashes))
    found: dict[str, int] = {}
    for i in range(0, len(wanted), IN_BATCH):
        found.update(Blob.objects.for_workspace(workspace).filter(sha256__in=wanted[i:i + IN_BATCH])
                     .values_list("sha256", "size"))
    return found


def blobs_missing(*, workspace: Workspace, hashes: list[str]) -> list[str]:
    """Those of `hashes` (in order, once each) that this workspace does not have: no row, or a row whose
    bytes the store no longer holds (projects.storage: a crash may cost a file its row kept)."""
    rows = existing_hashes(workspace, hashes)
    keys = {blob_key(workspace.pk, h): h for h in rows}
    held = {keys[k] for k in blob_store().present({k: rows[h] for k, h in keys.items()})}
    return [h for h in dict.fromkeys(hashes) if h not in held]


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
        if existing is not None and store.exists(key) and store.present({key: existing.size}):
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


@dataclass
class BatchResult:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # bodies that did not hash to their header's SHA-256


class _BundleReader:
    """Reads a request body in large pieces and hands out exact slices of it.

    A bundle of a thousand small blobs would otherwise cost two reads per blob through the
    WSGI input's layers (Django's LimitedStream, the server's body reader); this costs one
    per CHUNK_SIZE of body. It holds at most about CHUNK_SIZE bytes.
    """

    def __init__(self, stream: BinaryIO | None) -> None:
        self.stream = stream
        self.buffer = b""
        self.offset = 0

    def _fill(self) -> bool:
        chunk = self.stream.read(CHUNK_SIZE) if self.stream is not None else b""
        if not chunk:
            return False
        self.buffer = self.buffer[self.offset:] + chunk if self.offset < len(self.buffer) else chunk
        self.offset = 0
        return True

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (at least one unless the body has ended), at most what is buffered."""
        if self.offset >= len(self.buffer) and not self._fill():
            return b""
        piece = self.buffer[self.offset:self.offset + n]
        self.offset += len(piece)
        return piece

    def read_exact(self, n: int) -> bytes:
        """`n` bytes, or fewer only where the body ends."""
        while len(self.buffer) - self.offset < n and self._fill():
            pass
        piece = self.buffer[self.offset:self.offset + n]
        self.offset += len(piece)
        return piece


def _insert_blobs(workspace: Workspace, blobs: dict[str, int]) -> None:
    """INSERT a Blob row per {sha256: size}, skipping any that a concurrent upload recorded first.

    One executemany: bulk_create spent about 70 microseconds per row building statements.
    """
    if not blobs:
        return
    meta = Blob._meta
    quote = connection.ops.quote_name
    columns = ", ".join(quote(meta.get_field(name).column) for name in ("workspace", "sha256", "size", "created_at"))
    created_at = meta.get_field("created_at").get_db_prep_save(timezone.now(), connection)
    insert = connection.ops.insert_statement(on_conflict=OnConflict.IGNORE)
    suffix = connection.ops.on_conflict_suffix_sql([], OnConflict.IGNORE, None, None)
    sql = f"{insert} {quote(meta.db_table)} ({columns}) VALUES (%s, %s, %s, %s) {suffix}"
    with connection.cursor() as cursor:
        cursor.executemany(sql, [(workspace.pk, h, size, created_at) for h, size in blobs.items()])


def _commit(writer: BlobWriter) -> None:
    try:
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def blobs_upload_batch(*, workspace: Workspace, stream: BinaryIO | None, actor: Actor,
                       max_bytes: int | None = None) -> BatchResult:
    """Store a bundle of blobs (see BATCH_HEADER), each hash-verified as it streams in; record them in one go.

    One request per blob costs a project of 10,000 small files 10,000 round trips, each with
    authentication and a transaction; a bundle costs one. A blob whose bytes do not match its
    hash is dropped and reported in `mismatched`, the others are kept: a stored blob is always
    exactly its hash's bytes, so keeping it can never be wrong. A malformed bundle (a bad
    header, a body cut short) or an oversized blob fails the request and records nothing.
    """
    limit = settings.CUMULUS_BLOB_MAX_BYTES if max_bytes is None else max_bytes
    store = blob_store()
    result = BatchResult()
    stored: dict[str, int] = {}
    in_flight: deque[Future] = deque()
    reader = _BundleReader(stream)
    with ThreadPoolExecutor(COMMIT_WORKERS, thread_name_prefix="blob-commit") as pool:
        count = 0
        while True:
            header = reader.read_exact(BATCH_HEADER)
            if not header:
                break
            count += 1
            if len(header) < BATCH_HEADER or not BATCH_HEADER_RE.fullmatch(header):
                raise BadBundle(f"Blob {count} of the bundle has no valid header (64 lowercase hexadecimal digits "
                                f"of SHA-256, then the size as 16 hexadecimal digits).")
            if count > MAX_BATCH_BLOBS:
                raise BadBundle(f"A bundle holds at most {MAX_BATCH_BLOBS} blobs.")
            sha256, size = header[:64].decode("ascii"), int(header[64:], 16)
            if size > limit:
                raise TooLarge(f"Blob {sha256} is {size} bytes, over the limit of {limit} bytes.")
            writer = store.open_write(blob_key(workspace.pk, sha256))
            try:
                remaining = size
                while remaining:
                    chunk = reader.read(remaining)
                    if not chunk:
                        raise BadBundle(f"The bundle ends inside blob {count} ({sha256}).")
                    writer.write(chunk)
                    remaining -= len(chunk)
            except BaseException:
                writer.abort()
                raise
            if writer.hexdigest() != sha256:
                writer.abort()
                result.mismatched.append(sha256)
                continue
            in_flight.append(pool.submit(_commit, writer))
            stored[sha256] = size
            while len(in_flight) > COMMITS_IN_FLIGHT:
                in_flight.popleft().result()
        for future in in_flight:  # every blob is in the store before a row says so
            future.result()
    if not stored:
        return result
    found = existing_hashes(workspace, stored)
    new = {h: size for h, size in stored.items() if h not in found}
    with transaction.atomic():
        _insert_blobs(workspace, new)
        if new:
            audit_record(actor=actor, action="blob.upload_batch", target_type="blob", target_id=next(iter(new)),
                         workspace=workspace, data={"count": len(new), "size": sum(new.values()), "sha256": list(new)})
    result.created = list(new)
    result.existing = [h for h in stored if h in found]
    return result


# -- snapshots --------------------------------------------------------------------------------------


def manifest_digest(files: Iterable[tuple[str, str, int, int]]) -> str:
    """The SHA-256 that names a manifest of (path, sha256, size, mode), whatever the order it comes in.

    The canonical manifest is a line per file, `path NUL sha256 NUL size NUL mode LF` (decimal
    numbers), sorted by path. No manifest path holds a NUL, so the text reads back one way only,
    and sorting the lines sorts by path: a NUL sorts before any character a longer path goes on with.
    """
    return _digest_of_lines([f"{path}\0{sha256}\0{size}\0{mode}\n" for path, sha256, size, mode in files])


def _digest_of_lines(lines: list[str]) -> str:
    lines.sort()
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _insert_snapshot_files(snapshot: Snapshot, files: list[dict]) -> None:
    """INSERT the manifest's rows with one parameterised executemany.

    bulk_create builds a model instance per row, about 30 microseconds each: a third of a
    second for a 10,000-file project, which every sync pays. The statement and its values are
    the ones bulk_create would send.
    """
    meta = SnapshotFile._meta
    quote = connection.ops.quote_name
    columns = ", ".join(quote(meta.get_field(name).column) for name in ("snapshot", "path", "sha256", "size", "mode"))
    snapshot_ref = meta.get_field("snapshot").get_db_prep_save(snapshot.pk, connection)
    sql = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES (%s, %s, %s, %s, %s)"  # noqa: S608 - names only
    with connection.cursor() as cursor:
        for i in range(0, len(files), 5_000):
            cursor.executemany(sql, [(snapshot_ref, f["path"], f["sha256"], f["size"], f["mode"])
                                     for f in files[i:i + 5_000]])


def _copy_snapshot_files(source: Snapshot, snapshot: Snapshot, leave_out: list[str]) -> None:
    """Give `snapshot` the rows of `source` but those at `leave_out`: one INSERT ... SELECT, then the few deletes."""
    meta = SnapshotFile._meta
    quote = connection.ops.quote_name
    ref = meta.get_field("snapshot")
    columns = ", ".join(quote(meta.get_field(name).column) for name in ("path", "sha256", "size", "mode"))
    table, snapshot_column = quote(meta.db_table), quote(ref.column)
    sql = (f"INSERT INTO {table} ({snapshot_column}, {columns}) "  # noqa: S608 - names only
           f"SELECT %s, {columns} FROM {table} WHERE {snapshot_column} = %s")
    with connection.cursor() as cursor:
        cursor.execute(sql, [ref.get_db_prep_save(snapshot.pk, connection),
                             ref.get_db_prep_save(source.pk, connection)])
    for i in range(0, len(leave_out), IN_BATCH):
        SnapshotFile.objects.filter(snapshot=snapshot, path__in=leave_out[i:i + IN_BATCH]).delete()


def _manifest_of(workspace: Workspace, snapshot: Snapshot) -> tuple[dict[str, tuple[str, int, int]], set[str]]:
    """{path: (sha256, size, mode)} of a recorded snapshot, and the hashes in it that are no longer uploaded blobs
    of `workspace`: one query, a join on the blobs' unique index (the ORM's EXISTS per row takes twice as long)."""
    files, blobs = SnapshotFile._meta, Blob._meta
    quote = connection.ops.quote_name

    def column(meta, name: str) -> str:
        return quote(meta.get_field(name).column)

    sha256 = column(files, "sha256")
    sql = (f"SELECT f.{column(files, 'path')}, f.{sha256}, f.{column(files, 'size')}, f.{column(files, 'mode')}, "  # noqa: S608 - names only
           f"b.{column(blobs, 'id')} FROM {quote(files.db_table)} f LEFT JOIN {quote(blobs.db_table)} b "
           f"ON b.{column(blobs, 'workspace')} = %s AND b.{column(blobs, 'sha256')} = f.{sha256} "
           f"WHERE f.{column(files, 'snapshot')} = %s")
    manifest: dict[str, tuple[str, int, int]] = {}
    lost: set[str] = set()
    with connection.cursor() as cursor:
        cursor.execute(sql, [workspace.pk, files.get_field("snapshot").get_db_prep_save(snapshot.pk, connection)])
        for path, digest, size, mode, blob in cursor.fetchall():
            manifest[path] = (digest, size, mode)
            if blob is None:
                lost.add(digest)
    return manifest, lost


def _lost_blobs(workspace: Workspace, snapshot: Snapshot) -> list[str]:
    """The hashes in `snapshot` that are no longer uploaded blobs of `workspace` (one query, an index probe per row)."""
    held = Blob.objects.for_workspace(workspace).filter(sha256=OuterRef("sha256"))
    return list(SnapshotFile.objects.filter(snapshot=snapshot).filter(~Exists(held))
                .values_list("sha256", flat=True).distinct())


def _same_snapshot(workspace: Workspace, digest: str) -> Snapshot | None:
    """The workspace's snapshot of the manifest named `digest`, if it has one and still holds all its blobs."""
    snapshot = Snapshot.objects.for_workspace(workspace).filter(digest=digest).order_by("created_at").first()
    if snapshot is None or _lost_blobs(workspace, snapshot):
        return None  # a lost blob makes the request fail below, naming it, so that it is uploaded again
    return snapshot


def _blob_errors(workspace: Workspace, files: list[dict]) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """Per-entry errors of `files` whose hash is not an uploaded blob of `workspace` or whose size is not its blob's;
    and those hashes, in order, once each."""
    found = existing_hashes(workspace, (f["sha256"] for f in files))
    errors: dict[str, dict[str, list[str]]] = {}
    missing: list[str] = []
    for i, f in enumerate(files):
        if f["sha256"] not in found:
            errors[str(i)] = {"sha256": ["Not an uploaded blob of this workspace: upload it first."]}
            missing.append(f["sha256"])
        elif found[f["sha256"]] != f["size"]:
            errors[str(i)] = {"size": [f"The blob {f['sha256']} is {found[f['sha256']]} bytes, not {f['size']}."]}
    return errors, list(dict.fromkeys(missing))


def _invalid(fields: dict, bad: int, missing: list[str]) -> ValidationFailed:
    if missing:
        fields["missing"] = missing
    return ValidationFailed(fields, message=f"The manifest is not valid ({bad} bad entries, {len(missing)} blobs "
                                            f"missing).")


def _check_digest(digest: str, expected: str | None) -> None:
    if expected is not None and digest != expected:
        raise ValidationFailed({"digest": [f"The manifest would be {digest}, not {expected}."]},
                               message="The manifest is not the one expected (`digest`); nothing was recorded.")


def _new_snapshot(workspace: Workspace, actor: Actor, digest: str, total_size: int, file_count: int) -> Snapshot:
    return Snapshot.objects.create(workspace=workspace, created_by=actor.user if isinstance(actor.user, User) else None,
                                   total_size=total_size, file_count=file_count, digest=digest)


def _audit_snapshot(actor: Actor, snapshot: Snapshot, **data: object) -> None:
    audit_record(actor=actor, action="snapshot.create", target_type="snapshot", target_id=snapshot.pk,
                 workspace=snapshot.workspace,
                 data={"file_count": snapshot.file_count, "total_size": snapshot.total_size, **data})


def snapshot_create(*, workspace: Workspace, files: list[dict], actor: Actor) -> Snapshot:
    """Record the manifest `files` (see snapshot_record); the snapshot, new or the workspace's of the same manifest."""
    return snapshot_record(workspace=workspace, actor=actor, files=files)[0]


@transaction.atomic
def snapshot_record(*, workspace: Workspace, actor: Actor, files: list[dict] | None = None,
                    base: uuid.UUID | str | None = None, changes: list[dict] | None = None,
                    removed: list[str] | None = None, digest: str | None = None) -> tuple[Snapshot, bool]:
    """Record a manifest whose entries are already well-formed (projects.api.serializers.SnapshotCreate).

    The manifest is `files`, whole, or the snapshot `base` of this workspace with `changes` (files
    added or changed) and without `removed` (paths of `base`): a sync that changed one file of
    10,000 sends one entry, and the other rows are copied in the database. Every hash must be an
    uploaded blob of this workspace and every size must be that blob's. `digest`, if given, is
    what the manifest's digest must be (manifest_digest): a caller that computes a delta from
    what it believes `base` holds learns so if it is wrong, instead of recording another tree.

    Returns (snapshot, created): if the workspace already has a snapshot of exactly this manifest
    whose blobs it still holds, that one, and nothing is written; else a new one.
    """
    if files is not None:
        return _record_whole(workspace, actor, files, digest)
    if base is None:
        raise ValidationFailed({"base": ["Give `files`, or `base` with `changes` and `removed`."]})
    return _record_delta(workspace, actor, base, changes or [], removed or [], digest)


def _record_whole(workspace: Workspace, actor: Actor, files: list[dict], expected: str | None
                  ) -> tuple[Snapshot, bool]:
    digest = manifest_digest((f["path"], f["sha256"], f["size"], f["mode"]) for f in files)
    _check_digest(digest, expected)
    same = _same_snapshot(workspace, digest)
    if same is not None:
        return same, False
    errors, missing = _blob_errors(workspace, files)
    if errors:
        raise _invalid({"files": errors}, len(errors), missing)
    snapshot = _new_snapshot(workspace, actor, digest, sum(f["size"] for f in files), len(files))
    _insert_snapshot_files(snapshot, files)
    _audit_snapshot(actor, snapshot)
    return snapshot, True


def _record_delta(workspace: Workspace, actor: Actor, base: uuid.UUID | str, changes: list[dict],
                  removed: list[str], expected: str | None) -> tuple[Snapshot, bool]:
    source = Snapshot.objects.for_workspace(workspace).filter(pk=base).first()
    if source is None:
        raise ValidationFailed({"base": [f"No snapshot {base} in this workspace."]},
                               message="The base is not a snapshot of this workspace.")
    if not changes and not removed and source.digest:  # the base itself, if it still holds its blobs
        _check_digest(source.digest, expected)
        same = _same_snapshot(workspace, source.digest)
        if same is not None:
            return same, False
    rows, lost_in_base = _manifest_of(workspace, source)
    changed = {f["path"] for f in changes}
    refused = {}
    for i, path in enumerate(removed):
        if path not in rows:
            refused[str(i)] = [f"{path} is not a file of the base snapshot."]
        elif path in changed:
            refused[str(i)] = [f"{path} is in `changes` too."]
    if refused:
        raise ValidationFailed({"removed": refused}, message=f"The manifest is not valid ({len(refused)} bad "
                                                             f"removed paths).")
    replaced = changed.union(removed)  # the paths of the base not copied as they are
    file_count = len(rows) - len(removed) + len(changed - rows.keys())
    if file_count > MAX_SNAPSHOT_FILES:
        raise ValidationFailed({"changes": [f"The snapshot would hold {file_count} files; a snapshot holds at "
                                            f"most {MAX_SNAPSHOT_FILES}."]})
    # the canonical lines straight from the rows: 10,000 of them take a few ms, more with any detour
    lines = [f"{path}\0{sha256}\0{size}\0{mode}\n" for path, (sha256, size, mode) in rows.items()
             if path not in replaced]
    lines += [f"{f['path']}\0{f['sha256']}\0{f['size']}\0{f['mode']}\n" for f in changes]
    digest = _digest_of_lines(lines)
    _check_digest(digest, expected)
    same = _same_snapshot(workspace, digest)
    if same is not None:
        return same, False
    errors, missing = _blob_errors(workspace, changes)
    fields: dict = {"changes": errors} if errors else {}
    lost: list[str] = []
    if lost_in_base:
        kept = {sha256 for path, (sha256, _, _) in rows.items() if path not in replaced}
        lost = sorted(lost_in_base & kept)
        if lost:
            fields["base"] = [f"{len(lost)} of the base snapshot's blobs are no longer uploaded blobs of this "
                              f"workspace: upload them again."]
    if fields:
        raise _invalid(fields, len(errors), list(dict.fromkeys(missing + lost)))
    total_size = (sum(size for _, size, _ in rows.values()) - sum(rows[path][1] for path in replaced if path in rows)
                  + sum(f["size"] for f in changes))
    snapshot = _new_snapshot(workspace, actor, digest, total_size, file_count)
    _copy_snapshot_files(source, snapshot, [path for path in replaced if path in rows])
    _insert_snapshot_files(snapshot, changes)
    _audit_snapshot(actor, snapshot, base=str(source.pk))
    return snapshot, True
