"""Production: every secret and endpoint comes from the environment; missing ones fail fast."""

from django.core.exceptions import ImproperlyConfigured

from controlplane.env import env
from controlplane.settings.base import *  # noqa: F403
from controlplane.settings.base import CUMULUS_BLOB_S3_BUCKET, CUMULUS_BLOB_STORE

SECRET_KEY = env.str("DJANGO_SECRET_KEY")  # required: no default
DATABASES = {"default": env.db("DATABASE_URL")}  # required: no default
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL")  # required: no default
CUMULUS_PUBLIC_URL = env.str("CUMULUS_PUBLIC_URL")  # required: nodes must reach us
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS")
if CUMULUS_BLOB_STORE == "s3" and not CUMULUS_BLOB_S3_BUCKET:
    raise ImproperlyConfigured("CUMULUS_BLOB_STORE=s3 needs CUMULUS_BLOB_S3_BUCKET.")
DEBUG = False

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=True)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=True)
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
if env.str("REDIS_CACHE_URL", default=""):
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": env.str("REDIS_CACHE_URL")}
    }
