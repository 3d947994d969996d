"""Snapshot manifests: how they are named (a multiset digest) and read (a snapshot may be a layer over another).

**The digest.** A manifest is a set of entries (path, sha256, size, mode). Each entry is hashed on
its own, as the 4096-bit number read little-endian from SHAKE-256 of the line
`path NUL sha256 NUL size NUL mode LF` (decimal numbers), and the manifest's *state* is the sum of
its entries' numbers modulo 2**4096 (Bellare and Micciancio's AdHash; at 4096 bits Wagner's
generalised birthday attack costs about 2**128). The digest is the SHA-256 of the state's 512
bytes, little-endian, in hex. A sum does not care about order, and it changes with one file by one
subtraction and one addition: a snapshot made from another with one file changed is named from
the other's state without reading its 10,000 entries, by the server and by `cloudctl` alike.

**Layers.** A snapshot whose `root` is null holds its whole manifest as rows. One made from
another as a few changes holds only rows that differ from its root's manifest: an entry at a path
replaces the root's, and an entry with an empty sha256 (a *tombstone*) removes it. A layer is
always over a whole snapshot, never over another layer; when a layer would grow past a share of
its manifest, the snapshot is written whole instead (projects.services).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from django.db import connection

from projects.models import Blob, Snapshot, SnapshotFile

STATE_BYTES = 512
MODULUS = 1 << (8 * STATE_BYTES)
IN_BATCH = 500  # paths per `IN (...)` query: SQLite caps the number of bound parameters

Entry = tuple[str, int, int]  # (sha256, size, mode) at a path
TOMBSTONE = ("", 0, 0)


def entry_number(path: str, sha256: str, size: int, mode: int) -> int:
    """One entry's term of the manifest state."""
    line = f"{path}\0{sha256}\0{size}\0{mode}\n".encode()
    return int.from_bytes(hashlib.shake_256(line).digest(STATE_BYTES), "little")


def state_of(files: Iterable[tuple[str, str, int, int]]) -> int:
    """The state of the manifest of `files`, (path, sha256, size, mode) each, in any order."""
    return sum(entry_number(*f) for f in files) % MODULUS


def digest_of(state: int) -> str:
    return hashlib.sha256(state.to_bytes(STATE_BYTES, "little")).hexdigest()


def manifest_digest(files: Iterable[tuple[str, str, int, int]]) -> str:
    """The digest that names the manifest of `files`, whatever the order they come in."""
    return digest_of(state_of(files))


def state_bytes(state: int) -> bytes:
    return state.to_bytes(STATE_BYTES, "little")


def stored_state(snapshot: Snapshot) -> int:
    """The manifest state of `snapshot` (computed and kept if it has none stored)."""
    if snapshot.manifest_state is not None:
        return int.from_bytes(bytes(snapshot.manifest_state), "little")
    state = state_of((path, *entry) for path, entry in manifest(snapshot).items())
    Snapshot.objects.filter(pk=snapshot.pk).update(manifest_state=state_bytes(state))
    return state


# -- reading ----------------------------------------------------------------------------------------


def _quote(name: str) -> str:
    return connection.ops.quote_name(name)


def _column(name: str) -> str:
    return _quote(SnapshotFile._meta.get_field(name).column)


def _ref(snapshot_id: object) -> object:
    return SnapshotFile._meta.get_field("snapshot").get_db_prep_save(snapshot_id, connection)


def layers(snapshot: Snapshot) -> list[object]:
    """The snapshots whose rows make `snapshot`'s manifest, the root first."""
    return [snapshot.root_id, snapshot.pk] if snapshot.root_id is not None else [snapshot.pk]


def _rows(snapshot: Snapshot, paths: Sequence[str] | None = None) -> Iterable[tuple]:
    """(snapshot id, path, sha256, size, mode) of the rows of `snapshot`'s layers, only at `paths` if given."""
    ids = layers(snapshot)
    where = f"{_column('snapshot')} IN ({', '.join(['%s'] * len(ids))})"
    select = (f"SELECT {_column('snapshot')}, {_column('path')}, {_column('sha256')}, {_column('size')}, "  # noqa: S608 - names only
              f"{_column('mode')} FROM {_quote(SnapshotFile._meta.db_table)} WHERE {where}")
    params = [_ref(i) for i in ids]
    with connection.cursor() as cursor:
        if paths is None:
            cursor.execute(select, params)
            yield from cursor.fetchall()
            return
        for i in range(0, len(paths), IN_BATCH):
            batch = list(paths[i:i + IN_BATCH])
            cursor.execute(f"{select} AND {_column('path')} IN ({', '.join(['%s'] * len(batch))})", params + batch)
            yield from cursor.fetchall()


def _overlay(snapshot: Snapshot, rows: Iterable[tuple]) -> dict[str, Entry]:
    root: dict[str, Entry] = {}
    own: dict[str, Entry] = {}
    top = _ref(snapshot.pk)  # as the database gives it back
    for snapshot_id, path, sha256, size, mode in rows:
        (own if snapshot_id == top else root)[path] = (sha256, size, mode)
    for path, entry in own.items():
        if entry[0]:
            root[path] = entry
        else:
            root.pop(path, None)
    return root


def manifest(snapshot: Snapshot) -> dict[str, Entry]:
    """{path: (sha256, size, mode)} of the whole manifest of `snapshot`, in path order."""
    return dict(sorted(_overlay(snapshot, _rows(snapshot)).items()))


def entries_at(snapshot: Snapshot, paths: Sequence[str]) -> dict[str, Entry]:
    """The entries of `snapshot`'s manifest at `paths` (those it has): an index lookup per path, not a read of all."""
    return _overlay(snapshot, _rows(snapshot, paths)) if paths else {}


def own_rows(snapshot: Snapshot) -> dict[str, Entry]:
    """The rows of a layer (tombstones included); {} for a whole snapshot, whose rows are all its manifest."""
    if snapshot.root_id is None:
        return {}
    select = (f"SELECT {_column('path')}, {_column('sha256')}, {_column('size')}, {_column('mode')} "  # noqa: S608 - names only
              f"FROM {_quote(SnapshotFile._meta.db_table)} WHERE {_column('snapshot')} = %s")
    with connection.cursor() as cursor:
        cursor.execute(select, [_ref(snapshot.pk)])
        return {path: (sha256, size, mode) for path, sha256, size, mode in cursor.fetchall()}


def insert_rows(snapshot: Snapshot, rows: Iterable[tuple[str, str, int, int]]) -> None:
    """INSERT (path, sha256, size, mode) rows of `snapshot`: on PostgreSQL with one COPY, elsewhere with one
    parameterised executemany per 5,000.

    bulk_create builds a model instance per row, about 30 microseconds each: a third of a
    second for a 10,000-file project. The statement and its values are the ones bulk_create would
    send. On PostgreSQL even those cost a row's INSERT each, 0.23 s for 10,000, where COPY, made
    for loading many rows, takes 0.04 s; the snapshot is new, so no row of it can conflict.
    """
    columns = ", ".join(_column(name) for name in ("snapshot", "path", "sha256", "size", "mode"))
    table = _quote(SnapshotFile._meta.db_table)
    ref = _ref(snapshot.pk)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row((ref, *row))
            return
        sql = f"INSERT INTO {table} ({columns}) VALUES (%s, %s, %s, %s, %s)"  # noqa: S608 - names only
        batch: list[tuple] = []
        for row in rows:
            batch.append((ref, *row))
            if len(batch) == 5_000:
                cursor.executemany(sql, batch)
                batch = []
        if batch:
            cursor.executemany(sql, batch)


def lost_blobs(workspace_id: object, snapshot: Snapshot) -> dict[str, str]:
    """{path: sha256} of the files of `snapshot` whose hash is not an uploaded blob of the workspace.

    Only the layers not known to hold all their blobs (Snapshot.blobs_held) are read: in the
    database, an index probe per row into the blobs and, for the rows of a layer's root, one into
    the layer's own rows, so that a root row the layer replaces does not count. A layer found
    whole is marked so again; so a sync reads the blobs of a 10,000-file root only after a blob of
    the workspace was deleted, not every time.
    """
    blobs = Blob._meta
    table = _quote(SnapshotFile._meta.db_table)
    path, sha256, snap = _column("path"), _column("sha256"), _column("snapshot")
    blob_ws, blob_sha = _quote(blobs.get_field("workspace").column), _quote(blobs.get_field("sha256").column)
    lost_rows = (f"SELECT f.{path}, f.{sha256} FROM {table} f WHERE f.{snap} = %s AND f.{sha256} <> '' "  # noqa: S608 - names only
                 f"AND NOT EXISTS (SELECT 1 FROM {_quote(blobs.db_table)} b "
                 f"WHERE b.{blob_ws} = %s AND b.{blob_sha} = f.{sha256})")
    not_replaced = f" AND NOT EXISTS (SELECT 1 FROM {table} o WHERE o.{snap} = %s AND o.{path} = f.{path})"  # noqa: S608
    queries: list[tuple[Snapshot, str, list]] = []
    if snapshot.root_id is not None and not snapshot.root.blobs_held:
        queries.append((snapshot.root, lost_rows + not_replaced,
                        [_ref(snapshot.root_id), workspace_id, _ref(snapshot.pk)]))
    if not snapshot.blobs_held:
        queries.append((snapshot, lost_rows, [_ref(snapshot.pk), workspace_id]))
    lost: dict[str, str] = {}
    with connection.cursor() as cursor:
        for layer, sql, params in queries:
            cursor.execute(sql, params)
            found = dict(cursor.fetchall())
            lost.update(found)
            if not found and layer is snapshot:  # a root's rows were read only where the layer keeps them
                Snapshot.objects.filter(pk=layer.pk).update(blobs_held=True)
    return lost
