"""Content-addressed project sync: walk the tree, hash it (cached), upload what the server lacks, record a snapshot.

A sync is four steps, each sized so that an unchanged 10,000-file project costs a stat call
per file and one small request (the snapshot), and a project with one file changed two:

1. `walk_project` lists the files to send, honouring `.gitignore` and `.cloudignore` at every
   level (gitignore semantics, each file relative to its own directory), `.git/info/exclude`
   and the project's `job.excludes`; `.git` is always skipped. Symbolic links to files inside
   the project are followed; any other link is refused before anything is sent.
2. `hash_entries` hashes (SHA-256) only the files whose (path, size, mtime_ns) is not in the
   local cache, the quick check rsync makes by default, several files at a time.
3. Only hashes this server has not confirmed before are checked (`blobs/missing`, in batches);
   the missing blobs are uploaded, streamed from disk and several requests at once: files of
   at least `SINGLE_UPLOAD_MIN` bytes one per `PUT`, smaller ones packed into bundles
   (`POST blobs/batch`), because at one request per file a 10,000-file project spends its
   time in request overhead rather than in bytes.
4. The manifest (path, sha256, size, mode) becomes a snapshot. The cache remembers the last
   snapshot made on each server and its manifest, so what is sent is that snapshot's id and the
   entries that differ (with the digest the result must have); the server writes them as a
   layer over the rest. A
   server that refuses the base gets the whole manifest. A tree the workspace already has a
   snapshot of gets that snapshot back, same id. If the server has lost a blob it had
   confirmed, it says which, and those are uploaded and the snapshot asked for again.

A file that changes while it is hashed is hashed again; one that changes after it was hashed
is caught by the server, which verifies every blob's hash: it is hashed again and re-sent.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cloudctl import output
from cloudctl.client import BaseRefused, BlobsChanged, Client, MissingBlobs
from cloudctl.errors import CloudctlError
from cloudctl.walk import FileEntry, PendingWalk, walk_project

# Imported where they are used: an incremental sync of a project without ignore files needs
# neither pathspec nor a thread pool (concurrent.futures brings logging), and a whole `cloudctl
# sync` should take less time than those imports alone did.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `cloudctl sync` pays for every import
if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor
    from typing import Any

    from cloudctl.project import Project

DEFAULT_MAX_BYTES = 2 * 1024**3
MAX_BYTES_ENV = "CLOUDCTL_SYNC_MAX_BYTES"
CHUNK = 1024 * 1024
# hashlib releases the GIL on large updates, and small files are mostly open/read calls: a thread per core.
HASH_WORKERS = max(2, min(8, os.cpu_count() or 2))
HASH_GROUP_FILES = 128  # files per hashing task ...
HASH_GROUP_BYTES = 8 * 1024**2  # ... or bytes, whichever comes first
MISSING_BATCH = 5_000  # hashes per `blobs/missing` request (the server accepts up to 10,000)
# Requests in flight at once. Each holds one of the control plane's web threads (8 with `make run`)
# while it streams; half of them leaves room for everyone else (agents' heartbeats included).
UPLOAD_WORKERS = 4
SINGLE_UPLOAD_MIN = 8 * 1024**2  # files at least this big go alone, through PUT
BUNDLE_MAX_BYTES = 16 * 1024**2
BUNDLE_MAX_FILES = 1_000  # the server accepts up to 2,000 blobs per bundle
BUNDLE_HEADER = 80  # 64 hex digits of SHA-256, then the size as 16 hex digits
MAX_ROUNDS = 4  # upload / snapshot attempts before giving up on a tree that keeps changing
HASH_ATTEMPTS = 3
CACHE_VERSION = 2
STATE_BYTES = 512  # a manifest state (see manifest_state) is a number of this many bytes
STATE_MODULUS = 1 << (8 * STATE_BYTES)
_HEX = re.compile(r"[0-9a-f]+")
CACHE_REMOTES = 4  # servers (URL and workspace) whose confirmed hashes the cache remembers
# Hashes no server has confirmed yet are sent with the snapshot, without asking first which the server
# lacks, when they are this few bytes in all: one request instead of three, at the cost of re-sending a
# few KB the server may hold. (The server takes up to 1 MiB so; base64 makes 256 KiB about 342 KB.)
UNASKED_MAX_BYTES = 256 * 1024
UNASKED_MAX_FILES = 64
JOURNAL_MAX_FILES = 1_000  # entries changed at most for a line of the cache's journal; more: the file is rewritten
JOURNAL_MAX_BYTES = 64 * 1024  # a journal this long is folded into the file at the next save
LARGEST_SHOWN = 10
MAX_FILES = 100_000  # the most files a snapshot holds (the server refuses a longer manifest)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


# Plain classes rather than dataclasses: `dataclasses` imports `inspect`, 8 ms of a sync's start.


class SyncResult:
    """What one sync did; `cloudctl sync --json` prints exactly these fields."""

    FIELDS = ("snapshot_id", "files", "bytes", "uploaded_blobs", "uploaded_bytes", "hashed_files")
    __slots__ = FIELDS

    def __init__(self, snapshot_id: str, files: int, bytes: int, hashed_files: int, uploaded_blobs: int,
                 uploaded_bytes: int) -> None:
        self.snapshot_id = snapshot_id
        self.files = files
        self.bytes = bytes
        self.hashed_files = hashed_files  # files whose content was read and hashed this time (cache misses)
        self.uploaded_blobs = uploaded_blobs
        self.uploaded_bytes = uploaded_bytes

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def __repr__(self) -> str:
        return f"SyncResult({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


# -- sizes ------------------------------------------------------------------------------------------


def human_size(n: float) -> str:
    """1,536 -> '1.5 KB'; binary multiples, as `--max-size` reads them."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "KB" else f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def parse_size(text: str, what: str = "--max-size") -> int:
    """'500M', '2G', '1.5GB', '2GiB', '1048576' -> bytes (K, M, G, T are powers of 1024)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise CloudctlError(f"{what} must be a size such as 500M or 2G, not {text!r}.")
    value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if value <= 0:
        raise CloudctlError(f"{what} must be more than 0 bytes.")
    return value


def resolve_max_bytes(max_bytes: int | None) -> int:
    """The size cap: the caller's, else $CLOUDCTL_SYNC_MAX_BYTES, else 2 GiB."""
    if max_bytes is not None:
        return max_bytes
    env = os.environ.get(MAX_BYTES_ENV, "").strip()
    return parse_size(env, MAX_BYTES_ENV) if env else DEFAULT_MAX_BYTES


def check_size(entries: Sequence[FileEntry], max_bytes: int) -> int:
    """Refuse, before hashing or sending anything, a project over the cap; name its largest files. Returns the total."""
    total = sum(e.size for e in entries)
    if total <= max_bytes:
        return total
    largest = sorted(entries, key=lambda e: (-e.size, e.path))[:LARGEST_SHOWN]
    width = max(len(human_size(e.size)) for e in largest)
    details = [f"The {len(largest)} largest files:"]
    details += [f"  {human_size(e.size):>{width}}  {e.path}" for e in largest]
    details.append(f"Add what the job does not need to .cloudignore (gitignore syntax), or raise the limit with "
                   f"--max-size or {MAX_BYTES_ENV}.")
    raise CloudctlError(f"The project is {human_size(total)} in {len(entries):,} files, over the sync limit of "
                        f"{human_size(max_bytes)}; nothing was uploaded.", details)


# -- the hash cache ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cloudctl"


class HashCache:
    """SHA-256 per (path, size, mtime_ns) of one project root, in the user's cache.

    `files` maps each path of the last walk to (size, mtime_ns, sha256, mode). The cache also
    remembers the last snapshot made of the root (`snapshot`: the server and workspace, and its
    id), whose manifest is exactly `files` read as (path, sha256, size, mode), so that the next
    sync can send only how the tree differs from it; and, per other server and workspace, the
    hashes that server confirmed it holds at the last successful sync, so that an incremental
    sync asks only about new ones (for the snapshot's server, those are the hashes in `files`).

    It is a file written whole (atomically, 0600) and a journal beside it: a sync that changed a
    few files appends one JSON line with just those, instead of serialising all 10,000 entries
    again (a tenth of an incremental sync); the whole file is rewritten when the journal has
    grown. Nothing is written when nothing changed. The whole file is in Python's `marshal`
    format, which reads back three times faster than JSON: it is this user's own file in their
    private cache folder, trusted as far as the bytecode Python keeps in `__pycache__`. A cache
    that cannot be read is ignored, and a journal line that cannot be read ends the journal: it
    only saves work.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        name = f"sync-{hashlib.sha256(root.encode()).hexdigest()[:32]}"
        self.path = cache_dir() / f"{name}.marshal"
        self.journal = cache_dir() / f"{name}.journal"
        self.files: dict[str, list | tuple] = {}
        self.remotes: dict[str, list[str]] = {}
        self.snapshot: dict[str, str] | None = None  # {"remote": "URL WORKSPACE", "id": snapshot id}
        # The journal's length as read; None when the next save must write the whole file (it could not be read,
        # or the journal ends in a line that cannot: lines appended after it would never be read).
        self._journal_bytes: int | None = None

    @classmethod
    def load(cls, root: str) -> HashCache:
        cache = cls(root)
        try:
            with open(cache.path, "rb") as f:
                data = marshal.loads(f.read())  # noqa: S302 - the user's own private cache (see above)
            if data.get("version") != CACHE_VERSION or data.get("root") != root:
                return cache
            files, remotes = data["files"], data["remotes"]
            if isinstance(files, dict) and isinstance(remotes, dict):
                cache.files, cache.remotes, cache.snapshot = files, remotes, _snapshot_record(data.get("snapshot"))
                cache._journal_bytes = cache._replay()
        except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
            pass
        return cache

    def _replay(self) -> int | None:
        """Apply the journal's lines to what the file said; returns its length, or None if a line was bad."""
        try:
            with open(self.journal, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            return 0
        good = 0
        for line in text.splitlines(keepends=True):
            try:
                change = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                change = None
            if not isinstance(change, dict) or change.get("version") != CACHE_VERSION:
                break  # a line cut short by a crash, or written by another version: the journal ends here
            files, remotes = change.get("files"), change.get("remotes", self.remotes)
            if not isinstance(files, dict) or not isinstance(remotes, dict):
                break
            _apply(self.files, files)
            self.remotes, self.snapshot = remotes, _snapshot_record(change.get("snapshot"))
            good += len(line)
        return good if good == len(text) else None

    def lookup(self, entry: FileEntry) -> str | None:
        hit = self.files.get(entry.path)
        try:
            if hit[0] == entry.size and hit[1] == entry.mtime_ns and len(hit) == 4:  # type: ignore[index]
                digest = hit[2]  # type: ignore[index]
                if type(digest) is str and len(digest) == 64:
                    return digest
        except (TypeError, IndexError, KeyError):  # not there, or not an entry this version wrote
            pass
        return None

    def _hashes(self) -> set[str]:
        return {hit[2] for hit in self.files.values() if isinstance(hit, list | tuple) and len(hit) == 4}

    def confirmed(self, remote: str) -> set[str]:
        if self.snapshot is not None and self.snapshot["remote"] == remote:
            return self._hashes()
        hashes = self.remotes.get(remote)
        return set(hashes) if isinstance(hashes, list) else set()

    def last_snapshot(self, remote: str) -> str | None:
        """The id of the last snapshot made of this root on `remote`, whose manifest `files` holds."""
        return self.snapshot["id"] if self.snapshot is not None and self.snapshot["remote"] == remote else None

    def state(self) -> int:
        """The manifest state (see manifest_state) of `files`: kept with the last snapshot, else computed."""
        kept = self.snapshot.get("state") if self.snapshot is not None else None
        if kept is not None:
            return int(kept, 16)
        return manifest_state((path, hit[2], hit[0], hit[3]) for path, hit in self.files.items()
                              if isinstance(hit, list | tuple) and len(hit) == 4)

    def compare(self, entries: Sequence[FileEntry]) -> Compared:
        """One pass over a walk: each entry whose (path, size, mtime_ns, mode) the cache holds gets its sha256, and is
        as the last snapshot has it; the others are `differ` (see Compared). An incremental sync then works on those."""
        files = self.files
        differ = []
        seen = 0
        for e in entries:
            hit = files.get(e.path)
            if hit is None:
                differ.append(e)
                continue
            seen += 1
            try:
                if hit[0] == e.size and hit[1] == e.mtime_ns and hit[3] == e.mode and len(hit) == 4:
                    digest = hit[2]
                    if type(digest) is str and len(digest) == 64:
                        e.sha256 = digest
                        continue
            except (TypeError, IndexError, KeyError):  # not an entry this version wrote
                pass
            differ.append(e)
        return Compared(differ, seen == len(files))

    def _same(self, e: FileEntry) -> bool:
        """Whether the last snapshot has `e` as it is now: same sha256, size and mode at its path."""
        hit = self.files.get(e.path)
        try:
            return hit[2] == e.sha256 and hit[0] == e.size and hit[3] == e.mode  # type: ignore[index]
        except (TypeError, IndexError, KeyError):  # not there, or not an entry this version wrote
            return False

    def delta(self, entries: Sequence[FileEntry], compared: Compared) -> tuple[list[dict], list[str]]:
        """How `entries` differ from the last snapshot's manifest: (new or changed entries, paths gone). Only the
        `differ` entries of `compared` (this cache's compare of `entries`) are looked at."""
        changes = [e.manifest_entry() for e in compared.differ if not self._same(e)]
        return changes, self._gone(entries, compared)

    def _gone(self, entries: Sequence[FileEntry], compared: Compared | None = None) -> list[str]:
        """The paths of `files` that are not among `entries` (none, when as many of them are there as it holds)."""
        files = self.files
        if compared is not None and compared.all_seen:
            return []
        if compared is None and sum(1 for e in entries if e.path in files) == len(files):
            return []
        paths = {e.path for e in entries}
        return [path for path in files if path not in paths]

    def save(self, entries: Sequence[FileEntry], remote: str | None = None, snapshot_id: str | None = None,
             state: int | None = None, compared: Compared | None = None) -> None:
        """Keep the entries of this walk only (deleted files drop out), and `snapshot_id`, the snapshot just made of
        exactly them on `remote` (None: none was), with their manifest `state`. Best effort, never fails the sync;
        nothing is written if nothing changed, a line is appended to the journal if little did. With `compared`
        (this cache's compare of `entries`), only its `differ` entries are looked at: the others are as cached."""
        changed: dict[str, list | None] = {}
        for e in compared.differ if compared is not None else entries:
            hit = self.files.get(e.path)
            try:
                same = hit[2] == e.sha256 and hit[0] == e.size and hit[1] == e.mtime_ns and hit[3] == e.mode  # type: ignore[index]
            except (TypeError, IndexError, KeyError):
                same = False
            if not same:
                changed[e.path] = [e.size, e.mtime_ns, e.sha256, e.mode] if e.sha256 else None
        changed.update((path, None) for path in self._gone(entries, compared))
        remotes = dict(self.remotes)
        snapshot = {"remote": remote, "id": snapshot_id} if remote is not None and snapshot_id else None
        if snapshot is not None and state is not None:
            snapshot["state"] = f"{state:0{2 * STATE_BYTES}x}"
        old = self.snapshot
        if old is not None and (snapshot is None or old["remote"] != remote):
            # `files` no longer describes the old snapshot: keep what its server confirmed as a list
            remotes.pop(old["remote"], None)
            remotes = {old["remote"]: sorted(self._hashes()), **remotes}
        if snapshot is not None:
            remotes.pop(remote, None)
        remotes = dict(list(remotes.items())[:CACHE_REMOTES - (snapshot is not None)])
        changed = {path: hit for path, hit in changed.items() if hit is not None or path in self.files}
        if not changed and remotes == self.remotes and snapshot == self.snapshot:
            return
        files = self.files
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if (self._journal_bytes is not None and len(changed) <= JOURNAL_MAX_FILES
                    and self._journal_bytes < JOURNAL_MAX_BYTES):
                self._append(changed, remotes, snapshot)
                _apply(files, changed)
            else:
                # tuples: marshal reads 10,000 of them back a third faster than lists
                files = {e.path: (e.size, e.mtime_ns, e.sha256, e.mode) for e in entries if e.sha256}
                self._rewrite(files, remotes, snapshot)
        except OSError:
            return
        self.files, self.remotes, self.snapshot = files, remotes, snapshot

    def _append(self, changed: dict[str, list | None], remotes: dict[str, list[str]],
                snapshot: dict[str, str] | None) -> None:
        change = {"version": CACHE_VERSION, "files": changed, "snapshot": snapshot}
        if remotes != self.remotes:
            change["remotes"] = remotes
        line = (json.dumps(change, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write of one line: appends of concurrent syncs do not interleave
        finally:
            os.close(fd)
        self._journal_bytes = (self._journal_bytes or 0) + len(line)

    def _rewrite(self, files: dict[str, list | tuple], remotes: dict[str, list[str]],
                 snapshot: dict[str, str] | None) -> None:
        data = {"version": CACHE_VERSION, "root": self.root, "snapshot": snapshot, "remotes": remotes, "files": files}
        import contextlib  # here: most syncs only append to the journal

        tmp = f"{self.path.parent}{os.sep}.sync-{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # a leftover of a process that had this pid
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(marshal.dumps(data))
            # The journal goes first: older than the new file, replayed over it, it would take it back in time.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.journal)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._journal_bytes = 0


class Compared:
    """A walk as HashCache.compare found it: `differ` are the entries whose path, size, mtime_ns or mode is not the
    cache's (the others have their sha256 from it and are exactly as the last snapshot has them), `all_seen` whether
    every path of the cache is in the walk (no file was deleted)."""

    __slots__ = ("all_seen", "differ")

    def __init__(self, differ: list[FileEntry], all_seen: bool) -> None:
        self.differ = differ
        self.all_seen = all_seen

    def add(self, more: Iterable[FileEntry]) -> None:
        """Count `more` among the entries that differ (files hashed again after the comparison)."""
        known = {id(e) for e in self.differ}
        self.differ.extend(e for e in more if id(e) not in known)


def _apply(files: dict[str, list | tuple], changed: dict[str, list | None]) -> None:
    for path, hit in changed.items():
        if hit is None:
            files.pop(path, None)
        else:
            files[path] = hit


def _snapshot_record(value: object) -> dict[str, str] | None:
    if isinstance(value, dict) and isinstance(value.get("remote"), str) and isinstance(value.get("id"), str):
        record = {"remote": value["remote"], "id": value["id"]}
        state = value.get("state")
        if isinstance(state, str) and len(state) == 2 * STATE_BYTES and _HEX.fullmatch(state):
            record["state"] = state
        return record
    return None


# -- progress ---------------------------------------------------------------------------------------


class _Bars:
    """Rich progress bars on stderr when it is a terminal; otherwise calls that do nothing.

    rich.progress is imported only when bars are shown: `cloudctl sync --json` in a script
    should not pay for it.
    """

    def __init__(self, enabled: bool) -> None:
        self.progress: Any = None
        if not enabled:
            return
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class Amount(ProgressColumn):
            """Files as "120/5,000", bytes as "1.2 MB/312.4 MB" (the units of the summary line)."""

            def render(self, task: Any) -> Text:
                done, total = int(task.completed), int(task.total or 0)
                if task.fields.get("unit") == "files":
                    return Text(f"{done:,}/{total:,}", style="progress.download")
                return Text(f"{human_size(done)}/{human_size(total)}", style="progress.download")

        self.progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), Amount(), TimeRemainingColumn(),
                                 console=output.err)

    def __enter__(self) -> _Bars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def task(self, description: str, total: int, unit: str) -> Any:
        if self.progress is None or total <= 0:
            return None
        return self.progress.add_task(description, total=total, unit=unit)

    def advance(self, task: Any, amount: int) -> None:
        if task is not None:
            self.progress.advance(task, amount)

    def say(self, message: str) -> None:
        """A line for the user on stderr, above the bars when there are bars."""
        console = self.progress.console if self.progress is not None else output.err
        console.print(message, markup=False, soft_wrap=True)


# -- hashing ----------------------------------------------------------------------------------------

_buffers = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(bytearray(CHUNK))
    return buf


def hash_file(entry: FileEntry) -> None:
    """Hash `entry.source` and refresh its size, mtime and mode from the same open file.

    The file is stat'ed before and after reading; if it changed meanwhile it is read again. A file
    smaller than a chunk (most of a project) is one read of its size and one more byte, on the
    bare descriptor: a file object and a read loop cost more than hashing a few KB.
    """
    for _ in range(HASH_ATTEMPTS):
        try:
            fd = os.open(entry.source, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CloudctlError(f"{entry.path} was deleted while the project was being synced; run the sync again.") \
                from None
        except OSError as exc:
            raise CloudctlError(f"Cannot read {entry.path}: {exc.strerror}.") from None
        try:
            before = os.fstat(fd)
            if before.st_size < CHUNK:
                data = os.read(fd, before.st_size + 1)  # the byte more tells a file that grew
                digest, read = hashlib.sha256(data), len(data)
            else:
                digest, read = _hash_stream(fd)
            after = os.fstat(fd)
        except OSError as exc:
            raise CloudctlError(f"Cannot read {entry.path}: {exc.strerror}.") from None
        finally:
            os.close(fd)
        if read == before.st_size == after.st_size and before.st_mtime_ns == after.st_mtime_ns:
            entry.sha256 = digest.hexdigest()
            entry.size, entry.mtime_ns, entry.mode = read, after.st_mtime_ns, after.st_mode & 0o777
            return
    raise CloudctlError(f"{entry.path} kept changing while it was being hashed; stop what writes it, or add it "
                        f"to .cloudignore.")


def _hash_stream(fd: int) -> tuple[Any, int]:
    """The SHA-256 of what is left to read of `fd`, a chunk at a time into this thread's buffer; and its length."""
    buf = _buffer()
    digest = hashlib.sha256()
    read = 0
    with open(fd, "rb", buffering=0, closefd=False) as f:
        while n := f.readinto(buf):
            digest.update(buf[:n])
            read += n
    return digest, read


def hash_entries(entries: Sequence[FileEntry], cache: HashCache, bars: _Bars | None = None) -> int:
    """Fill in every entry's sha256, from the cache where (path, size, mtime_ns) match. Returns how many were read."""
    to_hash = []
    lookup = cache.lookup
    for entry in entries:
        digest = lookup(entry)
        if digest is None:
            to_hash.append(entry)
        else:
            entry.sha256 = digest
    if not to_hash:
        return 0
    bars = bars or _Bars(False)
    task = bars.task("Hashing", len(to_hash), "files")
    if len(to_hash) == 1:
        hash_file(to_hash[0])
        bars.advance(task, 1)
        return 1
    # Small files go in groups: a task per file costs the thread pool more than hashing a few KB.
    # Big files first, so that the last group to finish is a small one.
    groups: list[list[FileEntry]] = []
    group: list[FileEntry] = []
    size = 0
    for entry in sorted(to_hash, key=lambda e: -e.size):
        group.append(entry)
        size += entry.size
        if len(group) >= HASH_GROUP_FILES or size >= HASH_GROUP_BYTES:
            groups.append(group)
            group, size = [], 0
    if group:
        groups.append(group)

    def hash_group(group: list[FileEntry]) -> None:
        for entry in group:
            hash_file(entry)
        bars.advance(task, len(group))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="cloudctl-hash") as pool:
        _wait_all(pool, [pool.submit(hash_group, g) for g in groups])
    return len(to_hash)


def _wait_all(pool: ThreadPoolExecutor, futures: list[Future]) -> list[Any]:
    """Results in order; on the first failure (or Ctrl-C) cancel what has not started, then raise."""
    from concurrent.futures import FIRST_EXCEPTION, wait

    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    for future in futures:
        if future in done and future.exception() is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            raise future.exception()  # type: ignore[misc]
    return [f.result() for f in futures]


# -- uploading --------------------------------------------------------------------------------------


def _file_chunks(entry: FileEntry, sha256: str, on_bytes: Any) -> Iterator[bytes]:
    """Exactly `entry.size` bytes of the file, read a chunk at a time (on the bare descriptor, see hash_file).

    A file that shrank since it was hashed is padded with zeros so that the request stays
    well-formed; the server then answers that the bytes do not hash to `sha256`, and the
    file is hashed again. Bytes past `entry.size` (it grew) are not sent, for the same reason.
    """
    remaining = entry.size
    try:
        fd: int | None = os.open(entry.source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = None
    try:
        while remaining > 0:
            data = b""
            if fd is not None:
                try:
                    data = os.read(fd, min(CHUNK, remaining))
                except OSError:  # unreadable now: pad, and the hash check sends it back to `hash_file`
                    os.close(fd)
                    fd = None
            if not data:
                data = bytes(min(CHUNK, remaining))
            remaining -= len(data)
            on_bytes(len(data))
            yield data
    finally:
        if fd is not None:
            os.close(fd)


class _Body:
    """A request body of known length made of chunks produced on demand, never held whole in memory.

    requests reads the length through `len()` and sends `Content-Length`; urllib3 sends the
    chunks as they come.
    """

    def __init__(self, length: int, chunks: Iterator[bytes]) -> None:
        self.length = length
        self.chunks = chunks

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks


def _bundle_chunks(items: list[tuple[str, FileEntry]], on_bytes: Any) -> Iterator[bytes]:
    for sha256, entry in items:
        header = f"{sha256}{entry.size:016x}".encode("ascii")
        if entry.size <= 64 * 1024:  # one send for a small file and its header
            yield header + b"".join(_file_chunks(entry, sha256, on_bytes))
        else:
            yield header
            yield from _file_chunks(entry, sha256, on_bytes)


class _Uploaded:
    __slots__ = ("blobs", "bytes", "changed")

    def __init__(self, blobs: int = 0, bytes: int = 0, changed: list[str] | None = None) -> None:
        self.blobs = blobs
        self.bytes = bytes
        self.changed = changed or []  # hashes whose bytes the server found not to match


def _put_one(client: Client, sha256: str, entry: FileEntry, bars: _Bars, task: int | None) -> _Uploaded:
    body = _Body(entry.size, _file_chunks(entry, sha256, lambda n: bars.advance(task, n)))
    answer = client.blob_upload(sha256, body)
    if answer is None:
        return _Uploaded(changed=[sha256])
    return _Uploaded(blobs=1, bytes=entry.size)


def _post_bundle(client: Client, items: list[tuple[str, FileEntry]], bars: _Bars, task: int | None) -> _Uploaded:
    length = sum(BUNDLE_HEADER + e.size for _, e in items)
    body = _Body(length, _bundle_chunks(items, lambda n: bars.advance(task, n)))
    answer = client.blobs_upload_batch(body)
    mismatched = set(answer.get("mismatched") or [])
    sent = [(h, e) for h, e in items if h not in mismatched]
    return _Uploaded(blobs=len(sent), bytes=sum(e.size for _, e in sent), changed=sorted(mismatched))


def _bundles(items: list[tuple[str, FileEntry]]) -> list[list[tuple[str, FileEntry]]]:
    bundles: list[list[tuple[str, FileEntry]]] = []
    current: list[tuple[str, FileEntry]] = []
    size = 0
    for item in items:
        if current and (size + item[1].size > BUNDLE_MAX_BYTES or len(current) >= BUNDLE_MAX_FILES):
            bundles.append(current)
            current, size = [], 0
        current.append(item)
        size += item[1].size
    if current:
        bundles.append(current)
    return bundles


def upload_blobs(client: Client, to_hash: dict[str, FileEntry], bars: _Bars) -> _Uploaded:
    """Upload one file per hash in `to_hash`, several requests at a time; report the hashes refused as changed."""
    total = _Uploaded()
    if not to_hash:
        return total
    task = bars.task("Uploading", sum(e.size for e in to_hash.values()), "bytes")
    items = sorted(to_hash.items(), key=lambda item: -item[1].size)
    singles = [item for item in items if item[1].size >= SINGLE_UPLOAD_MIN]
    bundles = _bundles([item for item in items if item[1].size < SINGLE_UPLOAD_MIN])
    if len(singles) + len(bundles) == 1:  # one request: no thread pool
        parts = [_put_one(client, *singles[0], bars, task) if singles else _post_bundle(client, bundles[0], bars, task)]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="cloudctl-upload") as pool:
            futures = [pool.submit(_put_one, client, h, e, bars, task) for h, e in singles]
            futures += [pool.submit(_post_bundle, client, b, bars, task) for b in bundles]
            parts = _wait_all(pool, futures)
    for part in parts:
        total.blobs += part.blobs
        total.bytes += part.bytes
        total.changed += part.changed
    return total


def _ask_missing(client: Client, hashes: list[str]) -> set[str]:
    batches = [hashes[i:i + MISSING_BATCH] for i in range(0, len(hashes), MISSING_BATCH)]
    if len(batches) <= 1:
        return set(client.blobs_missing(batches[0])) if batches else set()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(4, len(batches)), thread_name_prefix="cloudctl-missing") as pool:
        futures = [pool.submit(client.blobs_missing, batch) for batch in batches]
        return {h for part in _wait_all(pool, futures) for h in part}


def _unasked(to_hash: dict[str, FileEntry]) -> bool:
    """Whether to send these blobs with the snapshot, without asking the server first (see UNASKED_MAX_BYTES)."""
    return 0 < len(to_hash) <= UNASKED_MAX_FILES and sum(e.size for e in to_hash.values()) <= UNASKED_MAX_BYTES


def _entry_number(path: str, sha256: str, size: int, mode: int) -> int:
    line = f"{path}\0{sha256}\0{size}\0{mode}\n".encode()
    return int.from_bytes(hashlib.shake_256(line).digest(STATE_BYTES), "little")


def manifest_state(files: Iterable[tuple[str, str, int, int]]) -> int:
    """The server's manifest state (projects.manifests) of (path, sha256, size, mode) entries, in any order.

    Each entry's line `path NUL sha256 NUL size NUL mode LF` is hashed with SHAKE-256 to a 4096-bit
    number; the state is their sum modulo 2**4096. A sum changes with one file by one subtraction and
    one addition, so the digest of a tree with a file changed comes from the last one's state.
    """
    return sum(_entry_number(*f) for f in files) % STATE_MODULUS


def manifest_digest(state: int) -> str:
    """The digest that names the manifest of `state`: the SHA-256 of its 512 bytes, little-endian."""
    return hashlib.sha256(state.to_bytes(STATE_BYTES, "little")).hexdigest()


def _inline(blobs: dict[str, FileEntry]) -> dict[str, str]:
    """{sha256: base64 bytes} of a few small files, to send with the snapshot (see UNASKED_MAX_BYTES)."""
    import base64

    return {sha256: base64.b64encode(b"".join(_file_chunks(entry, sha256, lambda n: None))).decode("ascii")
            for sha256, entry in blobs.items()}


def _record(client: Client, entries: Sequence[FileEntry], cache: HashCache, base: str | None,
            blobs: dict[str, str] | None = None, compared: Compared | None = None) -> tuple[dict, int]:
    """The snapshot of `entries` and its manifest state: made from `base` where there is one (see HashCache), else
    from the whole manifest; `blobs` (see _inline) are sent with it; `compared`, the cache's compare of `entries`.

    The digest sent with a delta is worked out from the cached state of `base` and the entries that
    differ from it, never from all 10,000; it makes the server refuse a delta whose result is not
    `entries` (were the cache not to describe `base` exactly). Any refusal of the base falls back to
    the whole manifest.
    """
    if base is not None:
        changes, removed = cache.delta(entries, compared)
        state = cache.state()
        for path in [*(f["path"] for f in changes), *removed]:
            hit = cache.files.get(path)
            if isinstance(hit, list | tuple) and len(hit) == 4:
                state -= _entry_number(path, hit[2], hit[0], hit[3])
        state = (state + sum(_entry_number(f["path"], f["sha256"], f["size"], f["mode"]) for f in changes)
                 ) % STATE_MODULUS
        try:
            return client.snapshot_create_from(base, changes, removed, digest=manifest_digest(state),
                                               blobs=blobs), state
        except BaseRefused:
            pass
    state = manifest_state((e.path, e.sha256, e.size, e.mode) for e in entries)
    return client.snapshot_create([e.manifest_entry() for e in entries], blobs=blobs), state


def _by_hash(entries: Iterable[FileEntry]) -> dict[str, FileEntry]:
    """The first of `entries` with each hash: the file a blob is read from."""
    by_hash: dict[str, FileEntry] = {}
    for entry in entries:
        by_hash.setdefault(entry.sha256, entry)
    return by_hash


# -- the whole sync ---------------------------------------------------------------------------------


def sync_project(client: Client, root: Path, *, excludes: Sequence[str] = (), max_bytes: int | None = None,
                 progress: bool = True, walk: PendingWalk | None = None) -> SyncResult:
    """Make the server hold `root`'s files and record them as a snapshot of the workspace.

    `excludes` are gitignore patterns relative to the root (cloud.yaml's `job.excludes`);
    `max_bytes` caps the project's total size (default: $CLOUDCTL_SYNC_MAX_BYTES, else 2 GiB);
    `progress` shows bars on stderr when it is a terminal; `walk`, the walk of `root` with `excludes`
    already started (cloudctl.walk.start_walk). Errors are CloudctlError, and nothing is uploaded for
    a tree that is refused (a link out of the project, over the cap).

    Past the walk, a sync that changed a few files of 10,000 works on those few: one pass compares
    the walk with the cache (HashCache.compare), and the hashing, the blobs asked about, the
    snapshot's changes and the cache's journal line are made from the entries that differ. The
    files the cache vouches for are the last snapshot's, whose blobs the server confirmed.
    """
    limit = resolve_max_bytes(max_bytes)
    # While the walk runs, if it was started: the cache, and the hashes the server confirmed.
    cache = HashCache.load(os.path.realpath(root))
    remote = f"{client.url} {client.workspace}"
    confirmed = cache.confirmed(remote)
    entries = walk.result(root, excludes) if walk is not None else walk_project(root, excludes)
    total = check_size(entries, limit)
    if len(entries) > MAX_FILES:
        raise CloudctlError(f"The project has {len(entries):,} files and a snapshot holds at most {MAX_FILES:,}; add "
                            f"what the job does not need to .cloudignore. Nothing was uploaded.")
    base = cache.last_snapshot(remote)
    compared = cache.compare(entries)
    uploaded = _Uploaded()
    snapshot: dict | None = None
    state: int | None = None
    with _Bars(progress and output.stderr_is_terminal()) as bars:
        try:
            hashed = hash_entries(compared.differ, cache, bars)
            # With a base, every other file is one of its files, whose blob the server confirmed.
            by_hash = _by_hash(compared.differ if base is not None else entries)
            ask = [h for h in by_hash if h not in confirmed]
            for _ in range(MAX_ROUNDS):
                to_hash = {h: by_hash[h] for h in ask if h in by_hash}
                inline: dict[str, FileEntry] = {}
                if _unasked(to_hash):  # a few small files: sent with the snapshot, one request in all
                    inline, to_hash = to_hash, {}
                else:
                    missing = _ask_missing(client, ask)
                    to_hash = {h: by_hash[h] for h in by_hash if h in missing}
                done = upload_blobs(client, to_hash, bars)
                uploaded.blobs += done.blobs
                uploaded.bytes += done.bytes
                changed = done.changed
                if not changed:
                    try:
                        snapshot, state = _record(client, entries, cache, base, _inline(inline), compared)
                    except MissingBlobs as exc:  # it lost blobs it once confirmed: send them again
                        confirmed.difference_update(exc.missing)
                        by_hash = _by_hash(entries)  # the blob of any file, changed or not
                        ask = [h for h in dict.fromkeys([*exc.missing, *inline]) if h in by_hash]
                        continue  # (a refused request keeps none of the blobs it carried)
                    except BlobsChanged as exc:
                        changed = exc.hashes
                    else:
                        uploaded.blobs += len(inline)
                        uploaded.bytes += sum(e.size for e in inline.values())
                        break
                rehashed = _rehash_changed(entries, set(changed), bars)
                compared.add(rehashed)
                hashed += len(rehashed)
                ask = list(dict.fromkeys([*(e.sha256 for e in rehashed), *(h for h in inline if h not in changed)]))
                by_hash = _by_hash(entries)
        finally:
            cache.save(entries, remote, str(snapshot["id"]) if snapshot else None, state, compared)
    if snapshot is None:
        raise CloudctlError("Files kept changing while the project was being synced; stop what writes them, or "
                            "add them to .cloudignore, and sync again.")
    return SyncResult(snapshot_id=str(snapshot["id"]), files=len(entries), bytes=total,
                      hashed_files=hashed, uploaded_blobs=uploaded.blobs, uploaded_bytes=uploaded.bytes)


def _rehash_changed(entries: Sequence[FileEntry], changed: set[str], bars: _Bars) -> list[FileEntry]:
    """Hash again the files whose bytes the server found not to match their hash; returns those files."""
    rehashed = [e for e in entries if e.sha256 in changed]
    for entry in rehashed:
        bars.say(f"{entry.path} changed while it was being synced; hashed it again and sending the new content.")
        hash_file(entry)
    return rehashed


def summary(result: SyncResult) -> str:
    """The one line `cloudctl sync` prints."""
    unchanged = result.files - result.uploaded_blobs if result.uploaded_blobs <= result.files else 0
    return (f"Synced {result.files:,} files ({human_size(result.bytes)}): {result.uploaded_blobs:,} uploaded "
            f"({human_size(result.uploaded_bytes)}), {unchanged:,} unchanged. Snapshot {result.snapshot_id}")


def sync_command(file: str | Path | None, max_size: str | None, json_out: bool, make_client: Any = None,
                 started: tuple[Project | None, PendingWalk] | None = None) -> None:
    """`cloudctl sync`, whether typer parsed its options (cloudctl.main) or the fast path did (cloudctl.cli).

    `started` is what cloudctl.walk.start_walk returned, if the caller started the walk before
    importing this module. Prints the summary line, or the JSON of SyncResult; errors are CloudctlError.
    """
    from cloudctl.walk import start_walk

    project, walk = started if started is not None else start_walk(file)
    try:
        root = project.root if project is not None else Path.cwd()
        limit = parse_size(max_size) if max_size is not None else None
        if make_client is None:
            from cloudctl import config

            client = Client.from_config(config.load())
        else:
            client = make_client()
        result = sync_project(client, root, excludes=project.job.excludes if project is not None else [],
                              max_bytes=limit, progress=not json_out, walk=walk)
    finally:
        walk.close()
    if json_out:
        output.print_json(result.as_dict())
    else:
        sys.stdout.write(summary(result) + "\n")
        sys.stdout.flush()
