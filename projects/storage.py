"""Where blob bytes live. `LocalBlobStore` (a folder) is the default; keys are `<workspace id>/<sha[:2]>/<sha>`.

Writes are streamed: the caller feeds chunks to a `BlobWriter`, which hashes them as they go
into a temporary file beside the final one; `commit()` renames it into place atomically, and
`abort()` (or leaving the `with` block on an error) removes it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from django.conf import settings

CHUNK_SIZE = 1024 * 1024


def blob_key(workspace_id: int, sha256: str) -> str:
    return f"{workspace_id}/{sha256[:2]}/{sha256}"


class BlobWriter(ABC):
    """A blob being written: `write` chunks, then `commit` or `abort`."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)
        self._write(chunk)

    def hexdigest(self) -> str:
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
    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def open_write(self, key: str) -> BlobWriter: ...

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO: ...


class _LocalWriter(BlobWriter):
    def __init__(self, final: Path) -> None:
        super().__init__()
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=".upload-", suffix=".tmp")
        self.temp = Path(name)
        self.file: BinaryIO | None = os.fdopen(fd, "wb")

    def _write(self, chunk: bytes) -> None:
        assert self.file is not None
        self.file.write(chunk)

    def commit(self) -> None:
        assert self.file is not None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(self.temp, self.final)  # atomic: a reader sees no blob or the whole blob

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            self.temp.unlink(missing_ok=True)


class LocalBlobStore(BlobStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"Blob key outside the store: {key!r}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def open_write(self, key: str) -> BlobWriter:
        return _LocalWriter(self._path(key))

    def open_read(self, key: str) -> BinaryIO:
        return self._path(key).open("rb")


def blob_store() -> BlobStore:
    """The configured store (read from settings on each call, so tests may point it elsewhere)."""
    return LocalBlobStore(settings.CUMULUS_BLOB_DIR)
