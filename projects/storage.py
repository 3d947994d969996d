"""Where blob bytes live. `LocalBlobStore` (a folder) is the default; keys are `<workspace id>/<sha[:2]>/<sha>`.

Writes are streamed: the caller feeds chunks to a `BlobWriter`, which hashes them as they go
into a temporary file beside the final one; `commit()` renames it into place atomically, and
`abort()` (or leaving the `with` block on an error) removes it.

The local store does not fsync each blob (as rsync does not): on one disk, 10,000 fsyncs
cost a 10,000-file project several seconds per sync. What a crash can cost instead is a
blob whose row outlived its file, or whose file was cut short; both are caught where it
matters. `BlobStore.lengths()` is consulted by `blobs/missing`, so a client uploads such a
blob again, and every reader of a blob (the head's agent) verifies its hash.

Small blobs that arrive together (a bundle, `blobs/batch`) are kept together: one object, a pack,
at `<workspace id>/packs/<pack id>`, each blob at an offset in it that its row records. A file
system pays for every file it creates (on some disks more than for the bytes in it), and S3 for
every request; a project of 10,000 small files is a few packs. Bigger blobs keep an object each.

`S3BlobStore` (CUMULUS_BLOB_STORE=s3) keeps them in a bucket, under CUMULUS_BLOB_S3_PREFIX, for
installs whose web processes do not share a disk. Its writer streams into a multipart upload
to the final key that only `commit()` completes, so there too a blob appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024


def blob_key(workspace_id: int, sha256: str) -> str:
    return f"{workspace_id}/{sha256[:2]}/{sha256}"


def pack_key(workspace_id: int, pack: str) -> str:
    return f"{workspace_id}/packs/{pack}"


def workspace_prefix(workspace_id: int) -> str:
    """The folder every key of the workspace is under."""
    return str(workspace_id)


def blob_location(workspace_id: int, sha256: str, size: int, pack: str, offset: int | None) -> tuple[str, int]:
    """Where a blob's bytes are, from its row: the key of their object, and the size that object has at least."""
    if pack:
        return pack_key(workspace_id, pack), (offset or 0) + size
    return blob_key(workspace_id, sha256), size


def open_blob(workspace_id: int, sha256: str, size: int, pack: str, offset: int | None) -> BinaryIO:
    """A stream of a blob's bytes, from its row (projects.models.Blob); FileNotFoundError if the store lost them."""
    store = blob_store()
    if pack:
        return store.open_range(pack_key(workspace_id, pack), offset or 0, size)
    return store.open_read(blob_key(workspace_id, sha256))


class BlobWriter(ABC):
    """A blob being written: `write` chunks, then `commit` or `abort`. Hashed as it goes, unless it is a pack
    (`hashed=False`), whose blobs the caller hashes one by one."""

    def __init__(self, hashed: bool = True) -> None:
        self._hash = hashlib.sha256() if hashed else None
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self._hash is not None:
            self._hash.update(chunk)
        self.size += len(chunk)
        self._write(chunk)

    def hexdigest(self) -> str:
        if self._hash is None:
            raise ValueError("A pack is not hashed whole.")
        return self._hash.hexdigest()

    @abstractmethod
    def _write(self, chunk: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # a no-op once committed


class BlobStore(ABC):
    """Bytes by key. A key names one blob's bytes for good (content-addressed), so writing a key
    again writes the same bytes, and a reader never sees a partial blob."""

    # Whether `commit()` waits on something slow (a network round trip): a bundle then commits its
    # blobs in a pool while it reads on. The local store's commit is a rename, which a pool only slows.
    slow_commit = True

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def open_write(self, key: str, hashed: bool = True) -> BlobWriter: ...

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A stream of the blob's bytes (read in pieces, never loaded whole); FileNotFoundError if absent."""

    @abstractmethod
    def open_range(self, key: str, offset: int, size: int) -> BinaryIO:
        """A stream of `size` bytes of the object at `key` from `offset` (a blob in a pack); FileNotFoundError
        if absent, and a stream that ends early (an error on reading) if the object is shorter."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob; removing one that is not there is not an error (garbage collection may race)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the folder `prefix` (a workspace's, when it is deleted): packs, blobs,
        and what a crash left without a row."""

    def lengths(self, keys: Iterable[str]) -> dict[str, int] | None:
        """The length of the object at each of `keys` that exists; None from a store whose writes are durable
        once committed (S3), which answers from the rows alone. The local store looks (see the module docstring)."""
        return None



_temp_names = itertools.count()


class _LocalWriter(BlobWriter):
    # Paths are plain strings here: pathlib cost about 0.1 ms per blob, which a bundle of a
    # thousand small blobs (projects.services.blobs_upload_batch) felt. So did tempfile.mkstemp
    # (its random names, about 50 microseconds a blob): the temporary name is the blob's own
    # with this process, thread and a counter, created exclusively all the same.
    def __init__(self, final: str, hashed: bool = True) -> None:
        super().__init__(hashed)
        self.final = final
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            self.temp = f"{final}.{os.getpid()}-{threading.get_ident()}-{next(_temp_names)}.tmp"
            try:
                fd = os.open(self.temp, flags, 0o600)
                break
            except FileNotFoundError:  # the first blob of its folder; creating first saves a mkdir per blob
                os.makedirs(os.path.dirname(final), exist_ok=True)
            except FileExistsError:  # left by a process that had this pid, or another host sharing the folder
                continue
        else:
            raise FileExistsError(f"No free temporary name beside {final}")
        self.file: BinaryIO | None = os.fdopen(fd, "wb")

    def _write(self, chunk: bytes) -> None:
        assert self.file is not None
        self.file.write(chunk)

    def commit(self) -> None:
        assert self.file is not None
        self.file.close()  # no fsync: see the module docstring
        self.file = None
        os.replace(self.temp, self.final)  # atomic: a reader sees no blob or the whole blob

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)


class _Slice(io.RawIOBase):
    """`size` bytes of an open file from where it stands; an error if the file ends first."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        super().__init__()
        self._file = file
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[:min(len(buffer), self._left)]
        n = self._file.readinto(view)
        if not n:
            raise OSError(f"The pack ends {self._left} bytes short of the blob.")
        self._left -= n
        return n

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class LocalBlobStore(BlobStore):
    slow_commit = False

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._root = os.path.abspath(root)

    def _path(self, key: str) -> str:
        # Checked lexically: `resolve()` made about ten lstat calls per blob. Only this store
        # writes below its root, so there is no symlink in it to follow.
        path = os.path.normpath(os.path.join(self._root, key))
        if not path.startswith(self._root + os.sep):
            raise ValueError(f"Blob key outside the store: {key!r}")
        return path

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def open_write(self, key: str, hashed: bool = True) -> BlobWriter:
        return _LocalWriter(self._path(key), hashed)

    def open_read(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def open_range(self, key: str, offset: int, size: int) -> BinaryIO:
        file = open(self._path(key), "rb", buffering=0)  # noqa: SIM115 - the slice closes it
        try:
            file.seek(offset)
        except BaseException:
            file.close()
            raise
        return io.BufferedReader(_Slice(file, size), buffer_size=CHUNK_SIZE)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def delete_prefix(self, prefix: str) -> None:
        import shutil

        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def lengths(self, keys: Iterable[str]) -> dict[str, int]:
        """One stat per blob or pack (about 10 ms for 10,000)."""
        found = {}
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                found[key] = os.stat(self._path(key)).st_size
        return found


# --- S3 (and S3-compatible: MinIO, moto) -----------------------------------------------
# S3's multipart rules: every part but the last is at least 5 MiB, and an upload has at most
# 10,000 parts, so 8 MiB parts carry blobs up to 78 GiB (CUMULUS_BLOB_MAX_BYTES is 2 GiB).
S3_MIN_PART_SIZE = 5 * 1024 * 1024
S3_PART_SIZE = 8 * 1024 * 1024
S3_MAX_PARTS = 10_000
# Error codes S3 and its look-alikes answer for a key that is not there (HEAD has no body,
# so botocore reports the bare status code).
_S3_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


def _s3_missing(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in _S3_MISSING or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404


class _S3Writer(BlobWriter):
    """A blob on its way into S3: invisible under its key until `commit()`.

    Bytes are buffered into parts of `part_size`. The first full part opens a multipart upload
    to the final key; S3 shows no object for it until `complete_multipart_upload`, which only
    `commit()` sends, and `abort()` discards the parts. A blob smaller than one part never
    opens an upload: `commit()` sends it with one `put_object`. Either way a reader sees the
    previous object (for a content-addressed key: the same bytes), or none, or the whole blob.
    """

    def __init__(self, client: Any, bucket: str, key: str, part_size: int = S3_PART_SIZE,
                 hashed: bool = True) -> None:
        super().__init__(hashed)
        if part_size < S3_MIN_PART_SIZE:
            raise ValueError(f"S3 parts are at least {S3_MIN_PART_SIZE} bytes, not {part_size}.")
        self.client = client
        self.bucket = bucket
        self.key = key
        self.part_size = part_size
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self._buffer = bytearray()
        self._open = True
        # Follow the client's checksum policy as boto3's own transfer manager does: with the
        # default ("when_supported") each part carries a CRC32 that S3 checks, and the parts
        # list must repeat it; an operator whose S3 look-alike refuses that sets
        # AWS_REQUEST_CHECKSUM_CALCULATION=when_required and the parts go without.
        checksums = getattr(client.meta.config, "request_checksum_calculation", None)
        self._checksum: dict[str, str] = {"ChecksumAlgorithm": "CRC32"} if checksums == "when_supported" else {}

    def _write(self, chunk: bytes) -> None:
        if not self._open:
            raise ValueError("The blob is already committed or aborted.")
        self._buffer += chunk
        while len(self._buffer) >= self.part_size:
            part = bytes(self._buffer[:self.part_size])
            del self._buffer[:self.part_size]
            self._upload_part(part)

    def _upload_part(self, data: bytes) -> None:
        if self.upload_id is None:
            created = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                          ContentType="application/octet-stream", **self._checksum)
            self.upload_id = created["UploadId"]
        number = len(self.parts) + 1
        if number > S3_MAX_PARTS:
            raise ValueError(f"A blob of more than {S3_MAX_PARTS} parts of {self.part_size} bytes does not fit S3.")
        sent = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                       PartNumber=number, Body=data, **self._checksum)
        part = {"PartNumber": number, "ETag": sent["ETag"]}
        if "ChecksumCRC32" in sent:
            part["ChecksumCRC32"] = sent["ChecksumCRC32"]
        self.parts.append(part)

    def commit(self) -> None:
        if not self._open:
            raise ValueError("The blob is already committed or aborted.")
        if self.upload_id is None:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self._buffer),
                                   ContentType="application/octet-stream")
        else:
            if self._buffer:  # the last part may be smaller than the minimum
                self._upload_part(bytes(self._buffer))
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                  MultipartUpload={"Parts": self.parts})
        # Only now, on success: a failed commit leaves the writer open, so leaving the `with`
        # block aborts the upload instead of orphaning its parts.
        self._open = False
        self._buffer = bytearray()

    def abort(self) -> None:
        if not self._open:
            return
        self._open = False
        self._buffer = bytearray()
        if self.upload_id is None:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except (BotoCoreError, ClientError):
            # Never raised: abort runs while another error (a hash mismatch, a lost client) is on
            # its way out, and must not replace it. The parts are invisible and unbilled only
            # once aborted, so the bucket should also have a lifecycle rule that aborts
            # incomplete multipart uploads after a day.
            logger.warning("blob.s3.abort_failed", exc_info=True,
                           extra={"bucket": self.bucket, "key": self.key, "upload_id": self.upload_id})


class _S3Raw(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, so that `io.BufferedReader` can sit on it."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # StreamingBody reads as much as it is asked for or up to the end; at the end it also
        # checks that the bytes received add up to Content-Length (a cut stream raises).
        data = self._body.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()  # gives the connection back (or drops it when unread bytes remain)
        super().close()


class S3BlobStore(BlobStore):
    """Blobs as objects of one bucket, each at `<prefix>/<key>`.

    Assumes S3's strong read-after-write consistency (AWS since 2020, MinIO): once `commit()`
    returns, `exists` and `open_read` see the blob from any process. The credentials need
    s3:GetObject, PutObject, DeleteObject, ListBucket (without it S3 answers 403, not 404, for a
    missing key, which is then raised rather than taken for "missing") and AbortMultipartUpload.
    """

    def __init__(self, client: Any, bucket: str, prefix: str = "", part_size: int = S3_PART_SIZE) -> None:
        self.client = client
        self.bucket = bucket
        folder = prefix.strip("/")
        self.prefix = f"{folder}/" if folder else ""
        self.part_size = part_size

    def object_key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as error:
            if _s3_missing(error):
                return False
            raise
        return True

    def open_write(self, key: str, hashed: bool = True) -> BlobWriter:
        return _S3Writer(self.client, self.bucket, self.object_key(key), part_size=self.part_size, hashed=hashed)

    def open_read(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as error:
            if _s3_missing(error):
                raise FileNotFoundError(f"No blob at {key!r}") from error
            raise
        # Streamed: the body is read from the connection as the caller reads, CHUNK_SIZE at a
        # time, whatever size the caller asks for (FileResponse asks for 4 KiB).
        return io.BufferedReader(_S3Raw(response["Body"]), buffer_size=CHUNK_SIZE)

    def open_range(self, key: str, offset: int, size: int) -> BinaryIO:
        if size == 0:
            return io.BytesIO(b"")  # a range cannot be empty
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key),
                                              Range=f"bytes={offset}-{offset + size - 1}")
        except ClientError as error:
            if _s3_missing(error):
                raise FileNotFoundError(f"No pack at {key!r}") from error
            raise
        return io.BufferedReader(_S3Raw(response["Body"]), buffer_size=CHUNK_SIZE)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))  # S3 answers 204 for a missing key

    def delete_prefix(self, prefix: str) -> None:
        """Every object under the prefix, a page of 1,000 (one listing, one DeleteObjects) at a time."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.object_key(prefix.rstrip("/") + "/")):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if objects:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})


_s3_clients: dict[tuple[str | None, str | None], Any] = {}
_s3_clients_lock = threading.Lock()


def s3_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """One boto3 S3 client per (endpoint, region), shared by every thread.

    A client is thread-safe once made, but making one from boto3's default session is not,
    so each is made from a session of its own, under a lock. Credentials come from boto3's
    standard chain (environment, shared files, instance or pod role), never from settings.
    """
    cache_key = (endpoint_url or None, region or None)
    with _s3_clients_lock:
        client = _s3_clients.get(cache_key)
        if client is None:
            import boto3
            from botocore.config import Config

            # Path-style addressing for a custom endpoint: MinIO and most S3 look-alikes
            # serve buckets under the path, not as sub-domains of their host.
            config = Config(retries={"mode": "standard"},
                            s3={"addressing_style": "path" if endpoint_url else "auto"})
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None,
                                                    region_name=region or None, config=config)
            _s3_clients[cache_key] = client
        return client


def blob_store() -> BlobStore:
    """The configured store (read from settings on each call, so tests may point it elsewhere)."""
    kind = settings.CUMULUS_BLOB_STORE
    if kind == "s3":
        if not settings.CUMULUS_BLOB_S3_BUCKET:
            raise ImproperlyConfigured("CUMULUS_BLOB_STORE=s3 needs CUMULUS_BLOB_S3_BUCKET.")
        client = s3_client(settings.CUMULUS_BLOB_S3_ENDPOINT_URL, settings.CUMULUS_BLOB_S3_REGION)
        return S3BlobStore(client, settings.CUMULUS_BLOB_S3_BUCKET, settings.CUMULUS_BLOB_S3_PREFIX)
    if kind == "local":
        return LocalBlobStore(settings.CUMULUS_BLOB_DIR)
    raise ImproperlyConfigured(f"CUMULUS_BLOB_STORE is 'local' or 's3', not {kind!r}.")
