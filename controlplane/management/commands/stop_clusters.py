"""`manage.py stop_clusters`: stop every live cluster now, in this process, and wait until no machine is left."""

from __future__ import annotations

import time

from django.conf import settings
from django.core.management.base import BaseCommand

from clusters.choices import ClusterStatus
from clusters.providers import get_provider, install_id
from clusters.reconciler import reconcile_cluster
from clusters.services import cluster_stop, live_clusters
from controlplane.services import Actor


class Command(BaseCommand):
    help = "Stop every live cluster (nodes terminated, clusters kept as STOPPED) and any leftover local machine."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--timeout", type=float, default=120.0)

    def handle(self, *args, **options) -> None:
        actor = Actor.system()
        clusters = list(live_clusters())
        for cluster in clusters:
            if cluster.status not in (ClusterStatus.STOPPING, ClusterStatus.TERMINATING):
                cluster_stop(cluster=cluster, actor=actor)
        deadline = time.monotonic() + options["timeout"]
        pending = [c.pk for c in clusters]
        while pending and time.monotonic() < deadline:
            for pk in list(pending):
                reconcile_cluster(pk)
                cluster = type(clusters[0]).objects.get(pk=pk)
                if cluster.status in (ClusterStatus.STOPPED, ClusterStatus.TERMINATED, ClusterStatus.FAILED):
                    pending.remove(pk)
            if pending:
                time.sleep(0.5)
        for name in settings.CUMULUS_ENABLED_PROVIDERS:
            provider = get_provider(name)
            leftovers = provider.list_nodes(cluster_uid=None)
            if leftovers:
                provider.terminate_nodes([i.instance_id for i in leftovers])
        self.stdout.write(f"Stopped {len(clusters)} cluster(s); no machine of install {install_id()} is left.")
