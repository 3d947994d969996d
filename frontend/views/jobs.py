"""Jobs (issue 5): a cluster's newest jobs, one job's page with its live log, and stop.

The log is read with `clusters.jobs.job_log_read`, the API's own reader: bytes from an offset, cut
at a UTF-8 boundary. The page renders the log so far (its last MiB at most); then htmx asks
`jobs/<id>/log/?offset=N` every second for what came after N, appends that text to the `<pre>`,
and takes a new poller carrying the next offset out of band. Polling ends where the API's
`complete` does: the job has finished and its whole log has been read.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlencode
from uuid import UUID

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.html import escape
from django.views.decorators.http import require_GET, require_http_methods

from clusters import jobs as services
from clusters.choices import TERMINAL_JOB_STATUSES
from clusters.models import Cluster, Job
from controlplane.errors import Conflict
from frontend.access import JOB_STOP, Scope, actor_for
from frontend.views.base import page, workspace_page

JOBS_SHOWN = 20  # on the cluster page: the newest
LOG_PAGE_BYTES = services.LOG_READ_LIMIT  # the most of a log the page opens with: its end
LOG_POLL_BYTES = services.LOG_READ_LIMIT  # the most one poll brings; the next poll brings the rest
# What a poll re-reads of the job for its header, after reading the log.
LIVE_FIELDS = ["status", "message", "exit_code", "stop_requested_at", "started_at", "finished_at", "log_size"]


ANSI_CSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _display(data: bytes) -> str:
    """Log bytes as text for the page: terminal colour and cursor codes (Ray colours its own lines) dropped."""
    return ANSI_CSI.sub("", data.decode("utf-8", errors="replace"))


def _short(job: Job) -> str:
    return str(job.pk)[:8]


def _finished(job: Job) -> bool:
    return job.status in TERMINAL_JOB_STATUSES


def cluster_jobs(cluster: Cluster) -> dict:
    """The cluster page's jobs table: its newest jobs, and how many there are in all."""
    jobs = Job.objects.for_workspace(cluster.workspace).filter(cluster=cluster)
    newest = list(jobs.select_related("created_by").order_by("-created_at")[:JOBS_SHOWN])
    total = jobs.count() if len(newest) == JOBS_SHOWN else len(newest)
    return {"jobs": [{"job": j, "short": _short(j), "finished": _finished(j)} for j in newest], "jobs_total": total}


def _job(scope: Scope, job_id: UUID) -> Job:
    """A job of the URL's workspace; another workspace's job, or none, is 404 like the API's."""
    job = (Job.objects.for_workspace(scope.workspace).select_related("cluster", "created_by")
           .filter(pk=job_id).first())
    if job is None:
        raise Http404
    return job


def _head_version(job: Job) -> str:
    """Changes whenever the job's header would. The poller carries it, so an unchanged header is not sent
    again: replacing it every second would take the keyboard focus off its Stop button."""
    state = "|".join(str(getattr(job, f)) for f in LIVE_FIELDS if f != "log_size")
    return hashlib.sha256(state.encode()).hexdigest()[:12]


def _head_context(scope: Scope, job: Job) -> dict:
    finished = _finished(job)
    return {"scope": scope, "job": job, "short": _short(job), "finished": finished,
            "can_stop": not finished and job.stop_requested_at is None and scope.can(JOB_STOP)}


def _poller_context(scope: Scope, job: Job, next_offset: int, complete: bool) -> dict:
    query = urlencode({"offset": next_offset, "v": _head_version(job)})
    return {"complete": complete,
            "poll_url": reverse("frontend:job-log", args=[scope.workspace.slug, job.pk]) + "?" + query}


def _read(job: Job, offset: int, limit: int) -> tuple[services.LogSlice, bool]:
    """A slice of the log and whether it completes the log (the API's `complete`, decided by the reader)."""
    piece = services.job_log_read(job, offset, limit)
    job.refresh_from_db(fields=LIVE_FIELDS)  # the header shows the job as it is now
    return piece, piece.complete


def _from_a_line_start(data: bytes) -> bytes:
    """The tail of a log that was cut from its start: from its first whole line (or character)."""
    newline = data.find(b"\n")
    if 0 <= newline < len(data) - 1:
        return data[newline + 1:]
    cut = 0
    while cut < min(3, len(data)) and data[cut] & 0b1100_0000 == 0b1000_0000:  # UTF-8 continuation bytes
        cut += 1
    return data[cut:]


@workspace_page()
def job_detail(request: HttpRequest, scope: Scope, job_id: UUID) -> HttpResponse:
    """One job: its status, facts and the log so far, which htmx then follows."""
    job = _job(scope, job_id)
    start = max(0, job.log_size - LOG_PAGE_BYTES)
    piece, complete = _read(job, start, LOG_PAGE_BYTES)
    data = _from_a_line_start(piece.data) if start else piece.data
    text = _display(data)
    if text.startswith("\n"):  # the HTML parser drops one newline right after <pre>: keep the log's own
        text = "\n" + text
    return page(request, "frontend/jobs/detail.html", {
        "title": f"Job {_short(job)}", **_head_context(scope, job),
        **_poller_context(scope, job, piece.next_offset, complete),
        "log_text": text, "log_shown": len(piece.data), "log_size": piece.size, "log_cut": start > 0,
    }, scope=scope)


@workspace_page()
@require_GET
def job_log(request: HttpRequest, scope: Scope, job_id: UUID) -> HttpResponse:
    """What htmx polls: the log's text after byte `offset` (escaped), a poller with the next offset and,
    when it changed, the job's header, both out of band. Nothing else: the text is appended as it is."""
    offset = request.GET.get("offset", "0")
    if not (offset.isascii() and offset.isdigit() and len(offset) <= 18):
        return HttpResponseBadRequest("offset: a whole number of bytes")
    job = _job(scope, job_id)
    piece, complete = _read(job, int(offset), LOG_POLL_BYTES)
    # One top-level element per template and no whitespace between them: whatever is not swapped out
    # of band is appended to the log.
    parts = [escape(_display(piece.data)),
             render_to_string("frontend/jobs/_poller.html",
                              {"oob": True, **_poller_context(scope, job, piece.next_offset, complete)}).strip()]
    if request.GET.get("v") != _head_version(job):
        parts.append(render_to_string("frontend/jobs/_head.html", {"oob": True, **_head_context(scope, job)},
                                      request=request).strip())
    return HttpResponse("".join(parts))


@workspace_page(write=JOB_STOP)
@require_http_methods(["GET", "POST"])
def job_stop(request: HttpRequest, scope: Scope, job_id: UUID) -> HttpResponse:
    """GET: ask for confirmation. POST: stop it, through the same service as the API's `stop`."""
    scope.require(JOB_STOP)  # no confirmation page for those who may not stop it
    job = _job(scope, job_id)
    if request.method != "POST":
        return page(request, "frontend/confirm.html", {
            "title": f"Stop job {_short(job)}", "action": "Stop job", "danger": True,
            "question": f"Stop job {_short(job)} ({job.entrypoint[:200]}) on cluster {job.cluster.name}? "
                        "Its process is ended; the log so far is kept.",
            "cancel_url": reverse("frontend:job", args=[scope.workspace.slug, job.pk]),
        }, scope=scope)
    try:
        job = services.job_stop(job=job, actor=actor_for(request))
    except Conflict as conflict:
        messages.error(request, conflict.message)
    else:
        done = "stopped" if _finished(job) else "stopping"
        messages.success(request, f"Job {_short(job)} is {done}.")
    return redirect("frontend:job", ws=scope.workspace.slug, job_id=job.pk)
