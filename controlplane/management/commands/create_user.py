"""`manage.py create_user EMAIL [--workspace SLUG] [--role ROLE]`: a user, a workspace membership and a token."""

from __future__ import annotations

import re

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from controlplane import services
from controlplane.choices import Role
from controlplane.errors import DomainError
from controlplane.models import SLUG_PATTERN, Membership, User, Workspace
from controlplane.services import Actor


class Command(BaseCommand):
    help = "Create a user (joining or creating a workspace) and print an API token."

    def add_arguments(self, parser) -> None:
        parser.add_argument("email")
        parser.add_argument("--workspace", default=None, help="Workspace slug to join or create (default: none).")
        parser.add_argument("--role", default=None, choices=[r.value for r in Role],
                            help="Role in the workspace (default: owner when it is created, member when joined).")
        parser.add_argument("--password", default=None, help="Password for the console (default: none).")
        parser.add_argument("--staff", action="store_true", help="Make the user a Django admin.")
        parser.add_argument("--token-name", default="cli")

    def handle(self, *args, **options) -> None:
        try:
            with transaction.atomic():
                self._handle(**options)
        except DomainError as error:
            raise CommandError(error.message) from None

    def _handle(self, **options) -> None:
        email = options["email"].strip().lower()
        if "@" not in email:
            raise CommandError(f"{email!r} is not an e-mail address")
        slug = options["workspace"]
        if slug and options["role"] not in (None, Role.OWNER) and not Workspace.objects.filter(slug=slug).exists():
            raise CommandError(f"Workspace {slug} does not exist yet and its first member becomes its owner: "
                               "omit --role, or create it first and add this user to it.")
        user = User.objects.filter(email__iexact=email).first()
        if user is None:
            user = services.user_create(email=email, password=options["password"], is_staff=options["staff"])
            self.stdout.write(f"Created user {email}")
        elif options["password"]:
            user.set_password(options["password"])
            user.save(update_fields=["password"])
        actor = Actor(user=user)
        if slug:
            if not re.match(SLUG_PATTERN, slug):
                raise CommandError("The workspace slug must be 1-63 lowercase letters, digits or hyphens, "
                                   "starting with a letter")
            workspace = Workspace.objects.filter(slug=slug).first()
            if workspace is None:
                workspace = services.workspace_create(slug=slug, name=slug, owner=user, actor=actor)
                self.stdout.write(f"Created workspace {slug}")
            else:
                membership = Membership.objects.filter(workspace=workspace, user=user).first()
                role = options["role"] or Role.MEMBER
                if membership is None:
                    services.member_add(workspace=workspace, email=email, role=role, actor=actor)
                elif options["role"] and membership.role != role:
                    services.member_change_role(membership=membership, role=role, actor=actor)
            self.stdout.write(f"Workspace: {slug}")
        _, raw = services.token_create(user=user, name=options["token_name"], actor=actor)
        self.stdout.write(f"API token: {raw}")
