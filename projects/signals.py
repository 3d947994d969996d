"""A deleted blob may be named by snapshots: they are no longer known to hold all their blobs (Snapshot.blobs_held)."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete
from django.dispatch import receiver

from projects.models import Blob, Snapshot


@receiver(post_delete, sender=Blob)
def blob_deleted(sender: type[Blob], instance: Blob, **kwargs: Any) -> None:
    Snapshot.objects.filter(workspace_id=instance.workspace_id, blobs_held=True).update(blobs_held=False)
