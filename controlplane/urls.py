from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from clusters.agent_api.jobs import JobManifestView, JobReportView, NodeBlobView
from clusters.agent_api.views import HeartbeatView, RegisterView
from clusters.api.jobs import ClusterJobViewSet, WorkspaceJobViewSet
from clusters.api.views import ClusterEventViewSet, ClusterViewSet, InstanceTypesView, NodeViewSet
from controlplane.api import errors, health
from controlplane.api.views import MemberViewSet, TokenViewSet, WorkspaceViewSet
from projects.api.views import BlobViewSet, SnapshotViewSet


class Router(SimpleRouter):
    """API.md writes verbs without a trailing slash (`.../start`) and collections with one: accept both."""

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"


router = Router()
router.register(r"workspaces", WorkspaceViewSet, basename="workspace")
router.register(r"workspaces/(?P<ws>[a-z][a-z0-9-]{0,62})/members", MemberViewSet, basename="member")
router.register(r"workspaces/(?P<ws>[a-z][a-z0-9-]{0,62})/clusters", ClusterViewSet, basename="cluster")
router.register(r"workspaces/(?P<ws>[a-z][a-z0-9-]{0,62})/clusters/(?P<name>[a-z][a-z0-9-]{0,62})/nodes",
                NodeViewSet, basename="node")
router.register(r"workspaces/(?P<ws>[a-z][a-z0-9-]{0,62})/clusters/(?P<name>[a-z][a-z0-9-]{0,62})/events",
                ClusterEventViewSet, basename="event")
router.register(r"workspaces/(?P<ws>[a-z][a-z0-9-]{0,62})/clusters/(?P<name>[a-z][a-z0-9-]{0,62})/jobs",
                ClusterJobViewSet, basename="cluster-job")
router.register(r"workspaces/(?P<ws>[a-z][a-z0-9-]{0,62})/jobs", WorkspaceJobViewSet, basename="job")
router.register(r"workspaces/(?P<ws>[a-z][a-z0-9-]{0,62})/blobs", BlobViewSet, basename="blob")
router.register(r"workspaces/(?P<ws>[a-z][a-z0-9-]{0,62})/snapshots", SnapshotViewSet, basename="snapshot")
router.register(r"tokens", TokenViewSet, basename="token")

WorkspaceViewSet.lookup_value_regex = r"[a-z][a-z0-9-]{0,62}"

api_v1 = [
    path("", include(router.urls)),
    path("catalog/instance-types/", InstanceTypesView.as_view(), name="instance-types"),
]

agent_v1 = [
    path("register", RegisterView.as_view(), name="agent-register"),
    path("nodes/<uuid:node_id>/heartbeat", HeartbeatView.as_view(), name="agent-heartbeat"),
    path("nodes/<uuid:node_id>/jobs/<uuid:job_id>/manifest", JobManifestView.as_view(), name="agent-job-manifest"),
    path("nodes/<uuid:node_id>/jobs/<uuid:job_id>/report", JobReportView.as_view(), name="agent-job-report"),
    path("nodes/<uuid:node_id>/blobs/<str:sha256>", NodeBlobView.as_view(), name="agent-blob"),
]

urlpatterns = [
    path("api/v1/", include(api_v1)),
    path("api/agent/v1/", include(agent_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("console/", include("frontend.urls")),
    path("", health.index, name="index"),
    path("healthz", health.healthz, name="healthz"),
    path("metrics", health.metrics, name="metrics"),
    path("admin/", admin.site.urls),
]

handler400 = errors.json_400
handler403 = errors.json_403
handler404 = errors.json_404
handler500 = errors.json_500
