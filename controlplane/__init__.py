"""Cumulus control plane: settings, tenancy (workspaces, members, tokens), audit."""

from controlplane.celery import app as celery_app

__all__ = ["celery_app"]
