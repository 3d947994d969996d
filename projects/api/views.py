"""Blobs (content-addressed file bytes) and snapshots (manifests of a project tree)."""

from __future__ import annotations

from collections.abc import Iterator

from django.conf import settings
from django.http import FileResponse, Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.decorators import action
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.api.base import WorkspaceScopedViewSet
from controlplane.api.schema import errors
from projects import manifests, services
from projects.api.serializers import (
    SHA256_REGEX,
    BlobBatchOut,
    BlobOut,
    BlobsMissingIn,
    BlobsMissingOut,
    SnapshotCreate,
    SnapshotDetail,
    SnapshotOut,
)
from projects.models import Blob, Snapshot
from projects.storage import CHUNK_SIZE, open_blob

UUID_REGEX = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"


class OctetStreamParser(BaseParser):
    """Declares raw uploads; the blob view reads `request.stream` itself, in chunks, never all at once."""

    media_type = "application/octet-stream"

    def parse(self, stream, media_type=None, parser_context=None):  # pragma: no cover - never called
        return stream


def _chunks(request: Request) -> Iterator[bytes]:
    stream = request.stream
    if stream is None:  # an empty body
        return
    while chunk := stream.read(CHUNK_SIZE):
        yield chunk


class BlobViewSet(WorkspaceScopedViewSet):
    """A workspace's blobs, addressed by SHA-256. PUT uploads one (verified), GET streams it back."""

    queryset = Blob.objects.all()
    serializer_class = BlobOut
    lookup_url_kwarg = "sha256"
    lookup_value_regex = SHA256_REGEX
    parser_classes = [JSONParser, OctetStreamParser]

    @extend_schema(request=BlobsMissingIn, responses={200: BlobsMissingOut, **errors(400, 401, 403, 404)})
    @action(detail=False, methods=["post"])
    def missing(self, request: Request, ws: str) -> Response:
        hashes = BlobsMissingIn.validated(request.data)["sha256"]
        return Response({"missing": services.blobs_missing(workspace=self.workspace, hashes=hashes)})

    @extend_schema(
        request={"application/octet-stream": OpenApiTypes.BINARY},
        responses={200: BlobBatchOut, **errors(400, 401, 403, 404, 413)},
        description="Upload many blobs in one request, for projects of many small files. The body is, per blob, "
                    "a header of 80 ASCII characters (the SHA-256 as 64 lowercase hexadecimal digits, then the "
                    "size in bytes as 16 hexadecimal digits) followed by the blob's bytes; at most "
                    f"{services.MAX_BATCH_BLOBS} blobs. Each is hashed as it arrives; one whose bytes do not match "
                    "is not stored and is listed in `mismatched`, the others are kept.",
    )
    @action(detail=False, methods=["post"], parser_classes=[OctetStreamParser])
    def batch(self, request: Request, ws: str) -> Response:
        result = services.blobs_upload_batch(workspace=self.workspace, stream=request.stream, actor=self.actor,
                                             max_bytes=settings.CUMULUS_BLOB_MAX_BYTES)
        return Response({"created": result.created, "existing": result.existing, "mismatched": result.mismatched})

    @extend_schema(
        request={"application/octet-stream": OpenApiTypes.BINARY},
        responses={
            200: OpenApiResponse(BlobOut, description="The workspace already had this blob."),
            201: OpenApiResponse(BlobOut, description="Stored."),
            **errors(400, 401, 403, 404, 413),
        },
        description="Upload a blob's raw bytes. The server hashes them as they arrive; a body whose SHA-256 "
                    "is not the one in the URL is refused (400 `hash_mismatch`) and nothing is stored.",
    )
    def update(self, request: Request, ws: str, sha256: str) -> Response:
        limit = settings.CUMULUS_BLOB_MAX_BYTES
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            raise services.TooLarge(f"The blob is larger than the limit of {limit} bytes.")
        blob, created = services.blob_upload(workspace=self.workspace, sha256=sha256, chunks=_chunks(request),
                                             actor=self.actor, max_bytes=limit)
        return Response({"sha256": blob.sha256, "size": blob.size, "created": created},
                        status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY, **errors(401, 404)})
    def retrieve(self, request: Request, ws: str, sha256: str) -> FileResponse:
        return blob_response(self.workspace.pk, sha256)


def blob_response(workspace_id: int, sha256: str) -> FileResponse:
    """The bytes of the workspace's blob `sha256`, streamed (404 if it has none, or the store lost them): for the API
    and for the head's agent alike."""
    row = Blob.objects.filter(workspace_id=workspace_id, sha256=sha256).values_list("size", "pack", "offset").first()
    if row is None:
        raise Http404
    try:
        handle = open_blob(workspace_id, sha256, *row)
    except FileNotFoundError:
        raise Http404 from None
    response = FileResponse(handle, content_type="application/octet-stream")
    response["Content-Length"] = str(row[0])  # a blob in a pack is a stream of unknown length to FileResponse
    return response


class SnapshotViewSet(WorkspaceScopedViewSet):
    """Manifests of a project tree; every file must already be an uploaded blob of the workspace."""

    queryset = Snapshot.objects.all()
    serializer_class = SnapshotOut
    lookup_url_kwarg = "snapshot_id"
    lookup_value_regex = UUID_REGEX

    @extend_schema(
        request=SnapshotCreate,
        responses={
            200: OpenApiResponse(SnapshotOut, description="The workspace already has a snapshot of exactly this "
                                                          "manifest: that one, unchanged."),
            201: OpenApiResponse(SnapshotOut, description="Recorded."),
            **errors(400, 401, 403, 404, 413),
        },
        description="Record a manifest, given whole (`files`) or as a snapshot of this workspace (`base`) with "
                    "the files added or changed since (`changes`, entries like those of `files`) and the paths "
                    "gone (`removed`, each a file of `base`); the rest of `base` is copied. Every file must be an "
                    "uploaded blob of the workspace, with its size; otherwise the 400 lists the hashes to upload "
                    "in `fields.missing`. A `base` that is not a snapshot of this workspace, or a removed path "
                    "that is not in it, is a 400 naming `base` or `removed`; so is a manifest that does not come "
                    "out as the `digest` given with it, if one is. Snapshots are named by their manifest: asking "
                    "again for one the workspace has returns it (200), with the same id.",
    )
    def create(self, request: Request, ws: str) -> Response:
        data = SnapshotCreate.validated(request.data)
        snapshot, created = services.snapshot_record(workspace=self.workspace, actor=self.actor, **data)
        return Response(SnapshotOut(snapshot).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(responses={200: SnapshotDetail, **errors(401, 404)})
    def retrieve(self, request: Request, ws: str, snapshot_id: str) -> Response:
        snapshot = self.get_queryset().select_related("created_by").filter(pk=snapshot_id).first()
        if snapshot is None:
            raise Http404
        files = [{"path": path, "sha256": sha256, "size": size, "mode": mode}
                 for path, (sha256, size, mode) in manifests.manifest(snapshot).items()]
        data = SnapshotOut(snapshot).data
        data["created_by"] = snapshot.created_by.email if snapshot.created_by else None
        data["files"] = files
        return Response(data)
