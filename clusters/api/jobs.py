"""Jobs: `workspaces/{ws}/clusters/{name}/jobs/` (API.md), and the same jobs by id under `workspaces/{ws}/jobs/`
so that a client holding only a job id (`cloudctl logs JOB`) needs no cluster name."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from clusters import jobs as services
from clusters.api.views import _ClusterChildViewSet
from clusters.choices import TERMINAL_JOB_STATUSES, JobStatus
from clusters.models import Job
from clusters.spec import EnvField, PipField
from controlplane.api.base import WorkspaceScopedViewSet
from controlplane.api.fields import StrictCharField, StrictIntegerField, StrictSerializer
from controlplane.api.schema import errors

UUID_REGEX = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
MAX_ENTRYPOINT = 10_000


class JobCreate(StrictSerializer):
    snapshot = serializers.UUIDField(help_text="A snapshot id from POST snapshots/: the job's working directory.")
    entrypoint = StrictCharField(max_length=MAX_ENTRYPOINT, help_text="A shell command, e.g. `python train.py`.")
    env = EnvField(required=False, default=dict, help_text="Environment variables for the job.")
    pip = PipField(required=False, default=list, help_text="Extra pip requirements, installed by Ray for this job.")

    def validate_entrypoint(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("The entrypoint must not be blank.")
        if "\x00" in value:
            raise serializers.ValidationError("The entrypoint must not contain NUL characters.")
        return value


class JobOut(serializers.ModelSerializer):
    cluster = serializers.CharField(source="cluster.name", read_only=True)
    snapshot = serializers.UUIDField(source="snapshot_id", read_only=True)
    created_by = serializers.SerializerMethodField()
    finished = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = ["id", "cluster", "snapshot", "entrypoint", "env", "pip", "status", "message", "exit_code",
                  "finished", "log_size", "created_by", "created_at", "started_at", "finished_at"]
        read_only_fields = fields

    def get_created_by(self, job: Job) -> str | None:
        return job.created_by.email if job.created_by else None

    def get_finished(self, job: Job) -> bool:
        return job.status in TERMINAL_JOB_STATUSES


class JobLogOut(serializers.Serializer):
    offset = serializers.IntegerField(help_text="Where `data` starts, in bytes.")
    next_offset = serializers.IntegerField(help_text="Ask from here next time.")
    size = serializers.IntegerField(help_text="Bytes stored so far.")
    data = serializers.CharField(help_text="UTF-8 text; never ends in the middle of a character.")
    status = serializers.ChoiceField(choices=JobStatus.choices)
    complete = serializers.BooleanField(help_text="The job has finished and `next_offset` is the end of its log.")


class LogQuery(StrictSerializer):
    offset = StrictIntegerField(min_value=0, required=False, default=0)
    limit = StrictIntegerField(min_value=1, max_value=services.LOG_READ_LIMIT, required=False,
                               default=services.LOG_READ_LIMIT)

    def to_internal_value(self, data):
        # Query strings are text: convert digits here so that the strict integer fields accept them.
        converted = {}
        for key, value in data.items():
            if key in ("offset", "limit"):
                if not (isinstance(value, str) and value.isdigit() and len(value) <= 18):
                    raise serializers.ValidationError({key: ["Must be a whole number of bytes."]})
                converted[key] = int(value)
            else:
                converted[key] = value
        return super().to_internal_value(converted)


class _JobViews:
    """What both routes share: a job by id, its logs and stop."""

    queryset = Job.objects.all()
    serializer_class = JobOut
    lookup_url_kwarg = "job_id"
    lookup_value_regex = UUID_REGEX

    def _jobs(self):
        qs = Job.objects.for_workspace(self.workspace).select_related("cluster", "created_by")
        if "name" in self.kwargs:
            qs = qs.filter(cluster__name=self.kwargs["name"])
        return qs

    def _job(self) -> Job:
        job = self._jobs().filter(pk=self.kwargs["job_id"]).first()
        if job is None:
            raise Http404
        return job

    @extend_schema(responses={200: JobOut, **errors(401, 404)})
    def retrieve(self, request: Request, **kwargs) -> Response:
        return Response(JobOut(self._job()).data)

    @extend_schema(
        parameters=[OpenApiParameter("offset", int, description="Byte offset to read from (default 0)."),
                    OpenApiParameter("limit", int, description=f"At most this many bytes "
                                                               f"(default and maximum {services.LOG_READ_LIMIT}).")],
        responses={200: JobLogOut, **errors(400, 401, 404)},
    )
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, **kwargs) -> Response:
        query = LogQuery.validated(request.query_params.dict())
        job = self._job()
        piece = services.job_log_read(job, query["offset"], query["limit"])
        return Response({
            "offset": piece.offset, "next_offset": piece.next_offset, "size": piece.size,
            "data": piece.data.decode("utf-8", errors="replace"), "status": piece.status, "complete": piece.complete,
        })

    @extend_schema(request=None, responses={202: JobOut, **errors(401, 403, 404, 409)})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, **kwargs) -> Response:
        job = services.job_stop(job=self._job(), actor=self.actor)
        return Response(JobOut(job).data, status=status.HTTP_202_ACCEPTED)


class ClusterJobViewSet(_JobViews, _ClusterChildViewSet):
    """A cluster's jobs: submit one (it waits for the head if the cluster is still starting), list, stop."""

    @extend_schema(responses={200: JobOut(many=True), **errors(400, 401, 404)})
    def list(self, request: Request, ws: str, name: str) -> Response:
        page = self.paginate_queryset(self._jobs().order_by("-created_at"))
        return self.get_paginated_response(JobOut(page, many=True).data)

    @extend_schema(request=JobCreate, responses={201: JobOut, **errors(400, 401, 403, 404, 409)})
    def create(self, request: Request, ws: str, name: str) -> Response:
        data = JobCreate.validated(request.data)
        cluster = self.cluster()
        job = services.job_submit(cluster=cluster, snapshot_id=str(data["snapshot"]), entrypoint=data["entrypoint"],
                                  env=data["env"], pip=data["pip"], actor=self.actor)
        return Response(JobOut(job).data, status=status.HTTP_201_CREATED)


class WorkspaceJobViewSet(_JobViews, WorkspaceScopedViewSet):
    """Every job of a workspace, newest first; the same jobs as under their cluster."""

    @extend_schema(parameters=[OpenApiParameter("cluster", str, description="Only this cluster's jobs.")],
                   responses={200: JobOut(many=True), **errors(400, 401, 404)})
    def list(self, request: Request, ws: str) -> Response:
        qs = self._jobs()
        if request.query_params.get("cluster"):
            qs = qs.filter(cluster__name=request.query_params["cluster"])
        page = self.paginate_queryset(qs.order_by("-created_at"))
        return self.get_paginated_response(JobOut(page, many=True).data)
