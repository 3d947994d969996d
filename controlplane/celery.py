"""The Celery application. Workers do all provisioning; beat runs the periodic sweep."""

from __future__ import annotations

import os

from celery import Celery

import controlplane.broker  # noqa: F401 - registers the embedded `cumulusfs://` transport

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.dev")

app = Celery("cumulus")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["clusters"])


@app.on_after_finalize.connect
def _schedule_sweep(sender: Celery, **_: object) -> None:
    from django.conf import settings

    sender.add_periodic_task(
        settings.CUMULUS_SWEEP_INTERVAL_S, sender.signature("clusters.sweep"), name="clusters.sweep"
    )
