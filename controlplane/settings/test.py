"""Fast test layer: in-process, no broker traffic.

End-to-end tests do not use these settings for the processes they start: those run the
real web server, Celery worker and beat with the base settings against a database and
broker of their own (see tests/e2e/harness.py).
"""

from controlplane.settings.base import *  # noqa: F403
from controlplane.settings.base import DATA_DIR, DATABASES, REST_FRAMEWORK

# Nothing published by the fast layer may reach a real broker: a stray reconcile there
# would start Ray processes.
CELERY_BROKER_URL = "memory://"
CELERY_BROKER_TRANSPORT_OPTIONS = {}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}

REST_FRAMEWORK = {**REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"user_burst": "100000/min"}}

# Blobs of the fast layer go to a folder of their own (tests/projects points it at tmp_path), whatever
# store the environment names: the s3 tests bring their own bucket on loopback.
CUMULUS_BLOB_STORE = "local"
CUMULUS_BLOB_DIR = str(DATA_DIR / "test-blobs")
