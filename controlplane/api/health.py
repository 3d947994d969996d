"""Health and Prometheus metrics."""

from __future__ import annotations

from django.db import connection
from django.db.models import Count
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily


def index(request: HttpRequest) -> JsonResponse:
    """What a person or a script finds at the root: where everything is."""
    return JsonResponse({
        "name": "Cumulus",
        "console": "/console/",
        "api": "/api/v1/",
        "schema": "/api/schema/",
        "docs": "/api/docs/",
        "admin": "/admin/",
        "health": "/healthz",
        "metrics": "/metrics",
    })


def healthz(request: HttpRequest) -> JsonResponse:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as error:
        return JsonResponse({"status": "unhealthy", "database": str(error)[:200]}, status=503)
    return JsonResponse({"status": "ok", "database": "ok"})


class _DatabaseCollector:
    """Gauges read from the database at scrape time, so every web process reports the same truth."""

    def collect(self):
        from clusters.models import Cluster, Node

        clusters = GaugeMetricFamily("cumulus_clusters", "Clusters by status", labels=["status"])
        # Crosses workspaces on purpose: install-wide operational metrics, no tenant data.
        for row in Cluster.objects.values("status").annotate(n=Count("id")):
            clusters.add_metric([row["status"]], row["n"])
        yield clusters
        nodes = GaugeMetricFamily("cumulus_nodes", "Nodes by state and provider", labels=["state", "provider"])
        live = Node.objects.exclude(state="TERMINATED")
        for row in live.values("state", "cluster__provider").annotate(n=Count("id")):
            nodes.add_metric([row["state"], row["cluster__provider"]], row["n"])
        yield nodes


_registry = CollectorRegistry()
_registry.register(_DatabaseCollector())


def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(_registry), content_type=CONTENT_TYPE_LATEST)
