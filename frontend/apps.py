from django.apps import AppConfig


class FrontendConfig(AppConfig):
    """The web console (issue 5): templates, one stylesheet and htmx, all served by the control plane itself."""

    name = "frontend"
    verbose_name = "Cumulus web console"
    default_auto_field = "django.db.models.BigAutoField"
