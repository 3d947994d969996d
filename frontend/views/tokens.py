"""The signed-in user's API tokens: create (the token is shown once, on the answer to the POST) and revoke.

Tokens belong to a person, not to a workspace, so this page sits outside `/w/<ws>/`.
"""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods
from rest_framework.exceptions import ValidationError

from controlplane import services
from controlplane.api.serializers import TokenCreateInput
from controlplane.models import ApiToken
from frontend.access import actor_for
from frontend.forms import json_number
from frontend.views.base import page, signed_in


def _tokens_page(request: HttpRequest, *, created: tuple[ApiToken, str] | None = None, form: dict | None = None,
                 errors: dict | None = None, status: int = 200) -> HttpResponse:
    tokens = ApiToken.objects.filter(user=request.user).order_by("-created_at", "-id")
    return page(request, "frontend/tokens.html", {
        "title": "API tokens", "tokens": tokens, "created": created[0] if created else None,
        "raw_token": created[1] if created else "", "form": form or {"name": "", "expires_in_days": ""},
        "errors": errors or {}, "api_url": request.build_absolute_uri("/api/v1/"),
    }, status=status)


@never_cache  # the one answer that carries the token itself must not be kept by any cache
@require_http_methods(["GET", "POST"])
@signed_in
def tokens(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _tokens_page(request)
    form = {"name": request.POST.get("name", ""), "expires_in_days": request.POST.get("expires_in_days", "")}
    data = {"name": form["name"]}
    if form["expires_in_days"].strip():
        data["expires_in_days"] = json_number(form["expires_in_days"])
    try:
        clean = TokenCreateInput.validated(data)
    except ValidationError as error:
        detail = error.detail if isinstance(error.detail, dict) else {"non_field_errors": error.detail}
        errors = {k: [str(m) for m in (v if isinstance(v, list) else [v])] for k, v in detail.items()}
        return _tokens_page(request, form=form, errors=errors, status=400)
    created = services.token_create(user=request.user, name=clean["name"], expires_at=clean["expires_at"],
                                    actor=actor_for(request))
    return _tokens_page(request, created=created, status=201)


@require_http_methods(["GET", "POST"])
@signed_in
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    """GET: confirm. POST: revoke. Only one's own tokens: another's is 404, as over the API."""
    token = ApiToken.objects.filter(user=request.user, pk=token_id).first()
    if token is None:
        raise Http404
    if request.method != "POST":
        return page(request, "frontend/confirm.html", {
            "title": f"Revoke {token.name}",
            "question": f"Revoke token {token.name} (…{token.last_four})? Scripts that use it stop working at once.",
            "action": "Revoke", "danger": True, "cancel_url": reverse("frontend:tokens"),
        })
    services.token_revoke(token=token, actor=actor_for(request))
    messages.success(request, f"Token {token.name} revoked.")
    return redirect("frontend:tokens")
