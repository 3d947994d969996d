import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.dev")
application = get_wsgi_application()
# Import the URLconf, and with it every view, serializer and the REST framework, as the web process
# starts rather than in the first request each worker serves (about 0.45 s of it).
get_resolver().url_patterns  # noqa: B018 - read for its imports
