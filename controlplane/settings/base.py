"""Settings shared by every environment.

Everything is read from the environment. The embedded defaults need no server: SQLite in
WAL mode, a Celery transport backed by folders, a local blob folder, all under the data
directory (`.cumulus/` in the checkout, or CUMULUS_DATA_DIR).
"""

from __future__ import annotations

from controlplane.env import BASE_DIR as _BASE_DIR
from controlplane.env import data_dir, env

BASE_DIR = _BASE_DIR

DATA_DIR = data_dir()

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    # Embedded mode: a random key kept in the data dir, so sessions and derived tokens
    # survive restarts without anyone having to invent a secret.
    _key_file = DATA_DIR / "secret_key"
    if not _key_file.exists():
        import secrets

        _key_file.write_text(secrets.token_urlsafe(50))
        _key_file.chmod(0o600)
    SECRET_KEY = _key_file.read_text().strip()

DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "django_htmx",
    "controlplane",
    "clusters",
    "projects",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (the console's CSS and htmx, the admin's) straight from the web process: no CDN and
    # no separate file server to set up, so `make run` and an air-gapped install look the same.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "controlplane.urls"
WSGI_APPLICATION = "controlplane.wsgi.application"
AUTH_USER_MODEL = "controlplane.User"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def _database() -> dict:
    if env.str("DATABASE_URL", default=""):
        db = env.db("DATABASE_URL")
        db.setdefault("CONN_MAX_AGE", 60)
        db.setdefault("CONN_HEALTH_CHECKS", True)
        return db
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(DATA_DIR / "cumulus.sqlite3"),
        # Kept open by each thread between requests, as PostgreSQL's are: opening one (and setting it up
        # below) cost every request about 3 ms, a third of an incremental sync's snapshot request.
        "CONN_MAX_AGE": 60,
        "OPTIONS": {
            # WAL lets the web, the worker and beat read while one of them writes;
            # IMMEDIATE takes the write lock at BEGIN, so concurrent writers queue on the
            # busy timeout instead of failing with "database is locked" mid-transaction.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
        },
    }


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
# Served from the apps' static folders as found at start-up, so no collectstatic step is needed
# (a collectstatic into STATIC_ROOT is served too; the folder exists so that WhiteNoise does not warn).
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# --- Web console (frontend/) ----------------------------------------------------------
LOGIN_URL = "frontend:login"
LOGIN_REDIRECT_URL = "frontend:home"
LOGOUT_REDIRECT_URL = "frontend:login"

# --- REST API -------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "controlplane.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_PAGINATION_CLASS": "controlplane.api.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "controlplane.api.errors.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["controlplane.api.throttling.UserBurstThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user_burst": env.str("CUMULUS_API_RATE", default="1200/min")},
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Cumulus API",
    "DESCRIPTION": "Self-hostable control plane for Ray clusters.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "ENUM_NAME_OVERRIDES": {
        "ClusterStatusEnum": "clusters.choices.ClusterStatus",
        "NodeStateEnum": "clusters.choices.NodeState",
        "RoleEnum": "controlplane.choices.Role",
    },
    "APPEND_COMPONENTS": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
    },
    "SECURITY": [{"bearerAuth": []}],
}

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Celery ---------------------------------------------------------------------------
_broker_dir = DATA_DIR / "broker"
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="cumulusfs://")
if CELERY_BROKER_URL.startswith("cumulusfs://"):
    for sub in ("queue", "processed", "control"):
        (_broker_dir / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
else:
    # Redis redelivers an unacknowledged task only after this timeout; the periodic sweep,
    # not redelivery, is what guarantees convergence, so keep it well above any task.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_DEFAULT_QUEUE = env.str("CUMULUS_QUEUE", default="cumulus")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

# --- Cumulus --------------------------------------------------------------------------
# Where the agent on a node reaches the control plane (outbound only).
CUMULUS_PUBLIC_URL = env.str("CUMULUS_PUBLIC_URL", default=f"http://127.0.0.1:{env.int('PORT', default=8000)}")
CUMULUS_SWEEP_INTERVAL_S = env.float("CUMULUS_SWEEP_INTERVAL_S", default=10.0)
CUMULUS_RECONCILE_LEASE_S = env.float("CUMULUS_RECONCILE_LEASE_S", default=30.0)
CUMULUS_HEARTBEAT_INTERVAL_S = env.float("CUMULUS_HEARTBEAT_INTERVAL_S", default=5.0)
CUMULUS_HEARTBEAT_FAST_INTERVAL_S = env.float("CUMULUS_HEARTBEAT_FAST_INTERVAL_S", default=0.5)
# The head's interval once the cluster runs: its heartbeat carries the Ray load, which the
# GCS refreshes once a second, so faster gains nothing. New demand is sent at once anyway.
CUMULUS_HEAD_HEARTBEAT_INTERVAL_S = env.float("CUMULUS_HEAD_HEARTBEAT_INTERVAL_S", default=1.0)
CUMULUS_NODE_LOST_AFTER_S = env.float("CUMULUS_NODE_LOST_AFTER_S", default=30.0)
CUMULUS_NODE_BOOT_TIMEOUT_S = env.float("CUMULUS_NODE_BOOT_TIMEOUT_S", default=300.0)
# A node asked to drain (scale-down) is terminated after this long even if Ray has not let it go.
CUMULUS_DRAIN_TIMEOUT_S = env.float("CUMULUS_DRAIN_TIMEOUT_S", default=120.0)
CUMULUS_ORPHAN_GRACE_S = env.float("CUMULUS_ORPHAN_GRACE_S", default=60.0)
CUMULUS_MAX_WORKERS_PER_GROUP = env.int("CUMULUS_MAX_WORKERS_PER_GROUP", default=100)
CUMULUS_ENABLED_PROVIDERS = env.list("CUMULUS_ENABLED_PROVIDERS", default=["local"])
# How many reverse proxies in front of us append to X-Forwarded-For (0: ignore the header).
CUMULUS_TRUSTED_PROXIES = env.int("CUMULUS_TRUSTED_PROXIES", default=0)
CUMULUS_INSTALL_ID = env.str("CUMULUS_INSTALL_ID", default="")
CUMULUS_LOCAL_NODES_DIR = env.str("CUMULUS_LOCAL_NODES_DIR", default=str(DATA_DIR / "nodes"))
# Project sync: blobs live in this folder (keys `<workspace id>/<sha[:2]>/<sha>`), each at most this big.
CUMULUS_BLOB_DIR = env.str("CUMULUS_BLOB_DIR", default=str(DATA_DIR / "blobs"))
CUMULUS_BLOB_MAX_BYTES = env.int("CUMULUS_BLOB_MAX_BYTES", default=2 * 1024**3)
# Where blob bytes live: `local` (the folder above) or `s3` (a bucket, for web processes that share
# no disk). The s3 store takes its credentials from boto3's standard chain (environment, shared
# files, instance or pod role), never from settings, and so its region when CUMULUS_BLOB_S3_REGION is empty.
CUMULUS_BLOB_STORE = env.str("CUMULUS_BLOB_STORE", default="local")
CUMULUS_BLOB_S3_BUCKET = env.str("CUMULUS_BLOB_S3_BUCKET", default="")
CUMULUS_BLOB_S3_PREFIX = env.str("CUMULUS_BLOB_S3_PREFIX", default="")  # a folder in the bucket: `cumulus/blobs`
CUMULUS_BLOB_S3_ENDPOINT_URL = env.str("CUMULUS_BLOB_S3_ENDPOINT_URL", default="")  # MinIO and other look-alikes
CUMULUS_BLOB_S3_REGION = env.str("CUMULUS_BLOB_S3_REGION", default="")
if CUMULUS_BLOB_STORE not in ("local", "s3"):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"CUMULUS_BLOB_STORE is 'local' or 's3', not {CUMULUS_BLOB_STORE!r}.")
# Jobs: each job's log is kept up to this many bytes; the rest is dropped with a note.
CUMULUS_JOB_LOG_MAX_BYTES = env.int("CUMULUS_JOB_LOG_MAX_BYTES", default=256 * 1024**2)
# JSON bodies are read whole: a snapshot manifest of 100,000 files needs more than Django's 2.5 MB.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("CUMULUS_MAX_JSON_BYTES", default=64 * 1024**2)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("CUMULUS_LOG_LEVEL", default="INFO")},
    "loggers": {"django.server": {"level": "WARNING"}},
}
