"""Project sync: content-addressed blobs (stored once per workspace) and snapshot manifests."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from controlplane.models import WorkspaceOwned


class Blob(WorkspaceOwned):
    """A file's bytes, named by their SHA-256; the bytes live in the blob store (projects.storage)."""

    sha256 = models.CharField(max_length=64)
    size = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["workspace", "sha256"], name="blob_unique_per_workspace")]

    def __str__(self) -> str:
        return self.sha256


class Snapshot(WorkspaceOwned):
    """A project tree at one moment: a manifest of (path, sha256, size, mode)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    total_size = models.BigIntegerField(default=0)
    file_count = models.IntegerField(default=0)

    def __str__(self) -> str:
        return str(self.id)


class SnapshotFile(models.Model):
    snapshot = models.ForeignKey(Snapshot, on_delete=models.CASCADE, related_name="files")
    path = models.TextField()
    sha256 = models.CharField(max_length=64)
    size = models.BigIntegerField()
    mode = models.IntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["snapshot", "path"], name="snapshot_file_unique_path")]

    def __str__(self) -> str:
        return self.path
