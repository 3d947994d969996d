"""The console's URLs, under /console/. A workspace's pages carry its slug: /console/w/<ws>/…"""

from __future__ import annotations

from django.contrib.auth.views import LogoutView
from django.urls import include, path

from frontend.views import auth, clusters, jobs, tokens, workspace

app_name = "frontend"

SLUG = "<slug:ws>"

workspace_urls = [
    path("", auth.workspace_home, name="workspace"),
    path("clusters/", clusters.cluster_list, name="clusters"),
    # Not under clusters/: "new" is a valid cluster name.
    path("new-cluster/", clusters.cluster_create, name="cluster-create"),
    path("clusters/<slug:name>/", clusters.cluster_detail, name="cluster"),
    path("clusters/<slug:name>/<slug:verb>/", clusters.cluster_verb, name="cluster-verb"),
    # A job by id alone, as the API's workspaces/{ws}/jobs/{id}/: a job id needs no cluster name.
    path("jobs/<uuid:job_id>/", jobs.job_detail, name="job"),
    path("jobs/<uuid:job_id>/log/", jobs.job_log, name="job-log"),
    path("jobs/<uuid:job_id>/stop/", jobs.job_stop, name="job-stop"),
    path("members/", workspace.members, name="members"),
    path("members/<int:user_id>/role/", workspace.member_role, name="member-role"),
    path("members/<int:user_id>/remove/", workspace.member_remove, name="member-remove"),
    path("audit/", workspace.audit_log, name="audit"),
]

urlpatterns = [
    path("", auth.home, name="home"),
    path("login/", auth.SignInView.as_view(), name="login"),
    path("logout/", LogoutView.as_view(), name="logout"),
    path("tokens/", tokens.tokens, name="tokens"),
    path("tokens/<int:token_id>/revoke/", tokens.token_revoke, name="token-revoke"),
    path(f"w/{SLUG}/", include(workspace_urls)),
]
