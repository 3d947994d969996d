"""Sign in and out (Django's session views, with CSRF), and the console's front door."""

from __future__ import annotations

from django import forms
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect

from controlplane.models import Membership
from frontend.access import Scope
from frontend.views.base import page, signed_in, workspace_page


class SignInForm(AuthenticationForm):
    """The e-mail address is the sign-in name (see controlplane.models.User)."""

    username = forms.CharField(
        label="E-mail", max_length=254,
        widget=forms.EmailInput(attrs={"autofocus": True, "autocomplete": "email", "autocapitalize": "none"}),
    )


class SignInView(LoginView):
    template_name = "frontend/login.html"
    authentication_form = SignInForm
    redirect_authenticated_user = True


@signed_in
def home(request: HttpRequest) -> HttpResponse:
    """The first of my workspaces (by slug), or a page that says I have none yet."""
    first = Membership.objects.filter(user=request.user).select_related("workspace").order_by("workspace__slug").first()
    if first is not None:
        return redirect("frontend:clusters", ws=first.workspace.slug)
    return page(request, "frontend/no_workspace.html", {"title": "No workspace yet"})


@workspace_page()
def workspace_home(request: HttpRequest, scope: Scope) -> HttpResponse:
    return redirect("frontend:clusters", ws=scope.workspace.slug)
