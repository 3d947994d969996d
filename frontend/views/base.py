"""What every console page shares: sign-in, the workspace from the URL, role checks and HTML errors.

The project's 404/403 handlers answer in JSON (the API's contract); a person in a browser gets
an HTML page instead, so the console's views render their own errors here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django_htmx.http import HttpResponseClientRedirect

from controlplane.models import Membership, User
from frontend.access import AUDIT_READ, READ, Scope

View = TypeVar("View", bound=Callable[..., HttpResponse])


def _error(request: HttpRequest, status: int, message: str) -> HttpResponse:
    titles = {403: "Not allowed", 404: "Not found"}
    context = {"title": titles.get(status, "Error"), "status": status, "message": message,
               "workspaces": _workspaces(request)}
    return render(request, "frontend/error.html", context, status=status)


def _workspaces(request: HttpRequest) -> list[Membership]:
    user = request.user
    if not isinstance(user, User):
        return []
    return list(Membership.objects.filter(user=user).select_related("workspace").order_by("workspace__slug"))


def signed_in(view: View) -> View:
    """Sign-in required; errors as HTML. An htmx poll whose session expired sends the whole page to sign-in."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            if getattr(request, "htmx", False):
                current = request.htmx.current_url_abs_path or request.get_full_path()  # type: ignore[attr-defined]
                return HttpResponseClientRedirect(redirect_to_login(current).url)
            return redirect_to_login(request.get_full_path())
        try:
            return view(request, *args, **kwargs)
        except Http404:
            return _error(request, 404, "There is nothing here, or it is not yours to see.")
        except PermissionDenied as denied:
            return _error(request, 403, str(denied) or "Your role does not allow this.")

    return cast(View, wrapped)


def workspace_page(*, write: str | None = None) -> Callable[[View], View]:
    """A page inside workspace `ws` of the URL: members only (404 otherwise), viewer or above to read.

    `write` is the role a POST needs; it is checked before the view runs, so a forged POST from a
    lower role is refused (403) whatever the page would have shown.
    """

    def decorate(view: View) -> View:
        @signed_in
        @wraps(view)
        def wrapped(request: HttpRequest, ws: str, *args: Any, **kwargs: Any) -> HttpResponse:
            scope = Scope.resolve(request.user, ws)  # type: ignore[arg-type]
            scope.require(READ)
            if request.method == "POST":
                if write is None:
                    raise PermissionDenied("This page takes no changes.")
                scope.require(write)
            return view(request, scope, *args, **kwargs)

        return cast(View, wrapped)

    return decorate


def page(request: HttpRequest, template: str, context: dict[str, Any], *, scope: Scope | None = None,
         status: int = 200) -> HttpResponse:
    """Render a full page with what the header needs: the workspace switcher and who am I, with my role."""
    base = {
        "scope": scope,
        "workspace": scope.workspace if scope else None,
        "workspaces": _workspaces(request),
        "can_audit": scope is not None and scope.can(AUDIT_READ),
        "section": _section(request),
    }
    return render(request, template, {**base, **context}, status=status)


def _section(request: HttpRequest) -> str:
    """Which main navigation entry the page belongs to, for `aria-current`."""
    name = request.resolver_match.url_name if request.resolver_match else ""
    if name and name.startswith("job"):  # a job runs on a cluster: its pages are under Clusters
        return "clusters"
    for section in ("cluster", "member", "audit", "token"):
        if name and name.startswith(section):
            return section + "s" if section != "audit" else section
    return ""
