"""Clusters: the live list, the create form, the detail page (with its jobs) and the verbs (start, stop, terminate).

Every change goes through `clusters.services` exactly as the REST API's does, after the same
`ClusterSpec` validation; the page only turns the result into HTML.
"""

from __future__ import annotations

from django.contrib import messages
from django.db.models import Case, IntegerField, Prefetch, QuerySet, Value, When
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods
from rest_framework.exceptions import ValidationError

from clusters import services
from clusters.api.serializers import ClusterSerializer, cost_so_far
from clusters.choices import ClusterStatus, NodeState
from clusters.models import Cluster, ClusterEvent, NodeGroup
from clusters.providers.catalog import instance_types
from clusters.spec import ClusterSpec
from clusters.transitions import cluster_can_transition
from controlplane.errors import Conflict, ValidationFailed
from frontend.access import CLUSTER_CREATE, CLUSTER_VERBS, READ, Scope, actor_for
from frontend.charts import Interval, node_chart
from frontend.forms import ClusterForm, enabled_providers, type_label
from frontend.views.base import page, workspace_page
from frontend.views.jobs import cluster_jobs

EVENTS_SHOWN = 100
LIST_TARGET = "cluster-rows"  # the element ids that htmx polls on the list and the detail page
DETAIL_TARGET = "cluster-live"
VERB_TEXT = {
    "start": ("Start", "Start cluster {name}? Its head and minimum workers are launched again and bill from then on."),
    "stop": ("Stop", "Stop cluster {name}? Every node is terminated; the cluster and its spec stay, to start again."),
    "terminate": ("Terminate", "Terminate cluster {name}? Every node is terminated and the cluster is gone for good."),
}


def _clusters(scope: Scope) -> QuerySet[Cluster]:
    return Cluster.objects.for_workspace(scope.workspace).prefetch_related(
        Prefetch("groups", queryset=NodeGroup.objects.order_by("position", "id")), "nodes"
    )


def _cluster(scope: Scope, name: str) -> Cluster:
    """The live cluster with this name, else the latest terminated one: how the API addresses clusters too."""
    live_first = Case(When(status=ClusterStatus.TERMINATED, then=Value(1)), default=Value(0),
                      output_field=IntegerField())
    cluster = _clusters(scope).filter(name=name).order_by(live_first, "-created_at").first()
    if cluster is None:
        raise Http404
    return cluster


def _row(cluster: Cluster) -> dict:
    """A list row: node counts by state and cost so far, computed by the API's own serializer fields."""
    api = ClusterSerializer(context={})
    return {"cluster": cluster, "node_counts": sorted(api.get_nodes(cluster).items()),
            "cost": api.get_cost_so_far(cluster)}


def _list_context(request: HttpRequest, scope: Scope) -> dict:
    show_all = request.GET.get("all") == "1"
    qs = _clusters(scope).order_by("-created_at", "-id")
    if not show_all:
        qs = qs.exclude(status=ClusterStatus.TERMINATED)
    return {"rows": [_row(c) for c in qs], "show_all": show_all, "can_create": scope.can(CLUSTER_CREATE),
            "rows_url": reverse("frontend:clusters", args=[scope.workspace.slug]) + ("?all=1" if show_all else "")}


@workspace_page()
def cluster_list(request: HttpRequest, scope: Scope) -> HttpResponse:
    """The workspace's clusters. htmx polls the same URL every two seconds for the rows alone."""
    if _polled(request, LIST_TARGET):
        return render(request, "frontend/clusters/_rows.html", {"scope": scope, **_list_context(request, scope)})
    return page(request, "frontend/clusters/list.html",
                {"title": "Clusters", **_list_context(request, scope)},
                scope=scope)


def _polled(request: HttpRequest, target: str) -> bool:
    """Whether this is htmx asking for the live part of a page (by its element id) rather than the page."""
    htmx = getattr(request, "htmx", None)
    return bool(htmx) and htmx.target == target  # type: ignore[union-attr]


def _catalog_context(form: ClusterForm) -> dict:
    types = instance_types(form.provider)
    return {"providers": enabled_providers(), "types": types,
            "type_options": [(t.name, type_label(t)) for t in types]}


@workspace_page(write=CLUSTER_CREATE)
def cluster_create(request: HttpRequest, scope: Scope) -> HttpResponse:
    """GET: the form. POST with `action`: add or remove a worker group and show the form again. POST: create."""
    scope.require(CLUSTER_CREATE)  # no form for those who may not use it
    if request.method != "POST":
        form = ClusterForm.initial()
        return _form_page(request, scope, form)
    form = ClusterForm.from_post(request.POST)
    action = request.POST.get("action", "create")
    if action == "add-group" and form.can_add_group:
        form.focus = form.add_group().prefix + "name"
        return _form_page(request, scope, form)
    if action.startswith("remove-group-") and action.removeprefix("remove-group-").isdigit():
        form.remove_group(int(action.removeprefix("remove-group-")))
        form.focus = "add-group"
        return _form_page(request, scope, form)
    if action == "refresh":  # another provider chosen: its catalog
        return _form_page(request, scope, form)
    try:
        spec = ClusterSpec.validated(form.spec())
        cluster = services.cluster_create(workspace=scope.workspace, spec=spec, actor=actor_for(request))
    except ValidationError as error:
        form.set_errors(error.detail)
        return _form_page(request, scope, form, status=400)
    except ValidationFailed as error:
        form.set_errors(error.fields)
        return _form_page(request, scope, form, status=400)
    messages.success(request, f"Cluster {cluster.name} created; it is starting.")
    return redirect("frontend:cluster", ws=scope.workspace.slug, name=cluster.name)


def _form_page(request: HttpRequest, scope: Scope, form: ClusterForm, status: int = 200) -> HttpResponse:
    return page(request, "frontend/clusters/create.html",
                {"title": "New cluster", "form": form, **_catalog_context(form)}, scope=scope, status=status)


def _verbs(scope: Scope, cluster: Cluster) -> list[str]:
    """The verbs this person may use on the cluster in its current status (the service checks again)."""
    offered = []
    if cluster.status in (ClusterStatus.STOPPED, ClusterStatus.FAILED) and cluster_can_transition(
            cluster.status, ClusterStatus.PROVISIONING):
        offered.append("start")
    if cluster_can_transition(cluster.status, ClusterStatus.STOPPING):
        offered.append("stop")
    if cluster.status not in (ClusterStatus.TERMINATING, ClusterStatus.TERMINATED):
        offered.append("terminate")
    return [v for v in offered if scope.can(CLUSTER_VERBS[v])]


def _detail_context(scope: Scope, cluster: Cluster) -> dict:
    nodes = list(cluster.nodes.all())
    now = timezone.now()
    end = cluster.terminated_at or now
    groups = list(cluster.groups.all())
    chart = node_chart(
        [Interval(n.group_name, n.created_at, n.terminated_at) for n in nodes],
        start=cluster.created_at, end=end, order=["head", *(g.name for g in groups)],
    )
    events = ClusterEvent.objects.filter(cluster=cluster).select_related("node").order_by("-created_at", "-id")
    live = [n for n in nodes if n.state != NodeState.TERMINATED]
    return {
        "cluster": cluster,
        "groups": groups,
        "live_nodes": live,
        "gone_nodes": sorted((n for n in nodes if n.state == NodeState.TERMINATED),
                             key=lambda n: n.terminated_at or n.created_at, reverse=True),
        "events": list(events[:EVENTS_SHOWN]),
        "chart": chart,
        "cost": cost_so_far(cluster, nodes),
        "verbs": [(v, VERB_TEXT[v][0]) for v in _verbs(scope, cluster)],
        "polling": cluster.status != ClusterStatus.TERMINATED,
        "live_url": reverse("frontend:cluster", args=[scope.workspace.slug, cluster.name]),
        **cluster_jobs(cluster),  # the jobs table (frontend/_jobs.html), live with the rest
    }


@workspace_page()
def cluster_detail(request: HttpRequest, scope: Scope, name: str) -> HttpResponse:
    """One cluster. Its status, nodes, chart, jobs and events are what htmx polls every two seconds."""
    cluster = _cluster(scope, name)
    if _polled(request, DETAIL_TARGET):
        return render(request, "frontend/clusters/_live.html", {"scope": scope, **_detail_context(scope, cluster)})
    return page(request, "frontend/clusters/detail.html",
                {"title": cluster.name, **_detail_context(scope, cluster)}, scope=scope)


@workspace_page(write=READ)  # each verb's own role is checked below, for the confirmation page too
@require_http_methods(["GET", "POST"])
def cluster_verb(request: HttpRequest, scope: Scope, name: str, verb: str) -> HttpResponse:
    """GET: ask for confirmation. POST: do it, through the same service as the API's verb."""
    if verb not in CLUSTER_VERBS:
        raise Http404
    scope.require(CLUSTER_VERBS[verb])
    cluster = _cluster(scope, name)
    label, question = VERB_TEXT[verb]
    if request.method != "POST":
        return page(request, "frontend/confirm.html", {
            "title": f"{label} {cluster.name}", "question": question.format(name=cluster.name), "action": label,
            "danger": verb != "start",
            "cancel_url": reverse("frontend:cluster", args=[scope.workspace.slug, cluster.name]),
        }, scope=scope)
    actor = actor_for(request)
    try:
        if verb == "start":
            services.cluster_start(cluster=cluster, actor=actor)
        elif verb == "stop":
            services.cluster_stop(cluster=cluster, actor=actor)
        else:
            services.cluster_delete(cluster=cluster, actor=actor)
    except Conflict as conflict:
        messages.error(request, conflict.message)
    else:
        done = {"start": "is starting", "stop": "is stopping", "terminate": "is terminating"}[verb]
        messages.success(request, f"Cluster {cluster.name} {done}.")
    return redirect("frontend:cluster", ws=scope.workspace.slug, name=cluster.name)
