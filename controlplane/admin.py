from django.contrib import admin

from controlplane.models import ApiToken, AuditEvent, Membership, User, Workspace

admin.site.register(User)
admin.site.register(Workspace)
admin.site.register(Membership)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "last_four", "created_at", "expires_at", "revoked_at")
    exclude = ("token_hash",)


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "actor_email", "action", "target_type", "target_id", "workspace")
