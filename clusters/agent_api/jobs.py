"""The agent API for jobs: the head's agent reads a job's snapshot (manifest and blobs) and reports
status and log chunks. A node token reaches only the jobs of its own cluster, run by itself, and the
blobs of its cluster's workspace."""

from __future__ import annotations

import base64
import binascii

from django.http import FileResponse, Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from clusters import jobs as services
from clusters.agent_api.views import NodeView
from clusters.choices import JobStatus
from clusters.models import Job, Node
from controlplane.api.fields import StrictCharField, StrictIntegerField, StrictSerializer
from controlplane.api.schema import errors
from projects import manifests
from projects.api.views import blob_response

MAX_LOG_CHUNK = 1024 * 1024  # decoded bytes per report


class JobNodeView(NodeView):
    """A view of one of the node's own jobs."""

    def job(self, node: Node, job_id) -> Job:
        job = (Job.objects.filter(pk=job_id, cluster_id=node.cluster_id, node=node)
               .select_related("cluster", "snapshot").first())
        if job is None:
            raise Http404
        return job


class ManifestOut(serializers.Serializer):
    snapshot_id = serializers.UUIDField()
    files = serializers.ListField(child=serializers.ListField(), help_text="[path, sha256, size, mode] each.")


class JobManifestView(JobNodeView):
    @extend_schema(responses={200: ManifestOut, **errors(401, 403, 404)}, tags=["agent"])
    def get(self, request: Request, node_id, job_id) -> Response:
        job = self.job(self.node(request, node_id), job_id)
        files = manifests.manifest(job.snapshot)
        return Response({"snapshot_id": str(job.snapshot_id),
                         "files": [[path, *entry] for path, entry in files.items()]})


class NodeBlobView(NodeView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY, **errors(401, 403, 404)},
                   tags=["agent"])
    def get(self, request: Request, node_id, sha256: str) -> FileResponse:
        node = self.node(request, node_id)
        return blob_response(node.cluster.workspace_id, sha256)


class JobReportIn(StrictSerializer):
    status = serializers.ChoiceField(choices=JobStatus.choices, required=False, allow_null=True, default=None)
    message = StrictCharField(max_length=4000, required=False, allow_null=True, allow_blank=True, default=None,
                              trim_whitespace=False)
    exit_code = StrictIntegerField(min_value=-(2**31), max_value=2**31 - 1, required=False, allow_null=True,
                                   default=None)
    ray_submission_id = StrictCharField(max_length=100, required=False, allow_null=True, allow_blank=True,
                                        default=None)
    log_offset = StrictIntegerField(min_value=0, max_value=2**62, required=False, allow_null=True, default=None)
    log_data = StrictCharField(required=False, allow_blank=True, default="", trim_whitespace=False,
                               max_length=MAX_LOG_CHUNK * 4 // 3 + 8, help_text="Base64 of the log bytes.")

    def validate_log_data(self, value: str) -> bytes:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise serializers.ValidationError("Must be base64.") from None


class JobReportOut(serializers.Serializer):
    log_offset = serializers.IntegerField(help_text="Send the log from this byte offset next.")
    stop = serializers.BooleanField(help_text="Stop the job (requested, or it is already over here).")
    status = serializers.ChoiceField(choices=JobStatus.choices)


class JobReportView(JobNodeView):
    @extend_schema(request=JobReportIn, responses={200: JobReportOut, **errors(400, 401, 403, 404)}, tags=["agent"])
    def post(self, request: Request, node_id, job_id) -> Response:
        node = self.node(request, node_id)
        job = self.job(node, job_id)
        data = JobReportIn.validated(request.data)
        reply = services.job_report(
            node=node, job=job, status=data["status"], message=data["message"], exit_code=data["exit_code"],
            ray_submission_id=data["ray_submission_id"], log_offset=data["log_offset"],
            log_data=data["log_data"] or b"",
        )
        return Response({"log_offset": reply.log_offset, "stop": reply.stop, "status": reply.status})
