"""Celery tasks: thin, named, passed ids. The reconciler is the real guarantee; these only trigger it."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from clusters.providers import TransientProviderError

logger = logging.getLogger(__name__)

SWEEP_BATCH = 100


@shared_task(
    name="clusters.reconcile_cluster",
    acks_late=True,
    ignore_result=True,
    autoretry_for=(TransientProviderError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=8,
)
def reconcile_cluster(cluster_id: int) -> None:
    from clusters.autoscaling import autoscale_cluster
    from clusters.reconciler import reconcile_cluster as reconcile

    # The periodic tick of the autoscaler: heartbeats decide at once, this catches the rest
    # (idle timeouts while load reports are steady, auto-stop). A failed decision must not
    # keep the reconciler from converging the cluster to what was already decided.
    try:
        autoscale_cluster(cluster_id)
    except Exception:
        logger.exception("autoscale.tick_failed", extra={"cluster_id": cluster_id})
    reconcile(cluster_id)


@shared_task(name="clusters.sweep", acks_late=True, ignore_result=True)
def sweep() -> None:
    """Periodic: reconcile every live cluster (in batches) and terminate leaked machines."""
    from clusters.reconciler import clusters_needing_reconcile, collect_orphans

    ids = clusters_needing_reconcile()
    for start in range(0, len(ids), SWEEP_BATCH):
        for cluster_id in ids[start : start + SWEEP_BATCH]:
            reconcile_cluster.delay(cluster_id)
    try:
        collect_orphans(settings.CUMULUS_ENABLED_PROVIDERS)
    except TransientProviderError:
        logger.warning("orphans.sweep_failed", exc_info=True)
