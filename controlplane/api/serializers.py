from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from rest_framework import serializers

from controlplane.api.fields import StrictCharField, StrictIntegerField, StrictSerializer
from controlplane.choices import Role
from controlplane.models import SLUG_PATTERN, ApiToken, Membership, Workspace


class WorkspaceSerializer(serializers.ModelSerializer):
    role = serializers.SerializerMethodField(help_text="The caller's role in this workspace.")

    class Meta:
        model = Workspace
        fields = ["slug", "name", "role", "created_at", "updated_at"]
        read_only_fields = fields

    def get_role(self, obj: Workspace) -> str:
        return self.context.get("roles", {}).get(obj.pk, "")


class WorkspaceCreateInput(StrictSerializer):
    slug = serializers.RegexField(SLUG_PATTERN, max_length=63,
                                  error_messages={"invalid": "Use 1-63 lowercase letters, digits or hyphens, "
                                                             "starting with a letter."})
    name = StrictCharField(max_length=200, required=False, allow_blank=True, default="")


class WorkspaceUpdateInput(StrictSerializer):
    name = StrictCharField(max_length=200, required=False)


class MemberSerializer(serializers.ModelSerializer):
    user_id = serializers.IntegerField(source="user.id", read_only=True)
    email = serializers.EmailField(source="user.email", read_only=True)

    class Meta:
        model = Membership
        fields = ["user_id", "email", "role", "created_at"]
        read_only_fields = fields


class MemberAddInput(StrictSerializer):
    # 150, not 254: the address is also the username (AbstractUser.username is 150 characters);
    # PostgreSQL refused longer ones with a 500.
    email = serializers.EmailField(max_length=150)
    role = serializers.ChoiceField(choices=Role.choices)


class MemberRoleInput(StrictSerializer):
    role = serializers.ChoiceField(choices=Role.choices, required=False)


class TokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "last_four", "created_at", "expires_at", "revoked_at", "last_used_at"]
        read_only_fields = fields


class TokenCreatedSerializer(TokenSerializer):
    token = serializers.CharField(read_only=True, help_text="The token itself. Shown once; store it now.")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class TokenCreateInput(StrictSerializer):
    name = StrictCharField(max_length=100)
    expires_in_days = StrictIntegerField(min_value=1, max_value=3650, required=False, allow_null=True, default=None)

    def validate(self, attrs: dict) -> dict:
        days = attrs.pop("expires_in_days", None)
        attrs["expires_at"] = timezone.now() + timedelta(days=days) if days else None
        return attrs
