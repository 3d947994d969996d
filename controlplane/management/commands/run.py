"""`manage.py run`: the embedded control plane (web, worker, beat) in the foreground. Ctrl-C stops it."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from controlplane import services
from controlplane.devserver import ControlPlane
from controlplane.models import ApiToken, User, Workspace, hash_token

FIRST_EMAIL = "admin@localhost"
FIRST_WORKSPACE = "default"


def first_user_credentials(data_dir: Path) -> dict:
    """Create the first user, workspace and token if there are none; return the sign-in to print.

    The credentials live in the data dir (mode 0600) so every `make run` can print them again.
    """
    path = data_dir / "credentials.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    if saved and ApiToken.objects.usable().filter(token_hash=hash_token(saved["token"])).exists():
        return saved
    if saved is None and User.objects.exists():
        return {}  # an install that was set up by hand: nothing of ours to print
    user = User.objects.filter(email=FIRST_EMAIL).first()
    password = secrets.token_urlsafe(12)
    if user is None:
        user = services.user_create(email=FIRST_EMAIL, password=password, is_staff=True)
    else:
        user.set_password(password)
        user.save(update_fields=["password"])
    actor = services.Actor(user=user)
    if not Workspace.objects.filter(slug=FIRST_WORKSPACE).exists():
        services.workspace_create(slug=FIRST_WORKSPACE, name="Default", owner=user, actor=actor)
    _, raw = services.token_create(user=user, name="make run", actor=actor)
    saved = {"email": FIRST_EMAIL, "password": password, "token": raw, "workspace": FIRST_WORKSPACE}
    path.write_text(json.dumps(saved))
    path.chmod(0o600)
    return saved


class Command(BaseCommand):
    help = "Run the control plane (web, Celery worker, beat) with the embedded defaults."

    def handle(self, *args, **options) -> None:
        port = int(os.environ.get("PORT", "8000"))
        call_command("migrate", verbosity=0, interactive=False)
        creds = first_user_credentials(settings.DATA_DIR)
        env = {**os.environ, "PORT": str(port), "CUMULUS_PUBLIC_URL": settings.CUMULUS_PUBLIC_URL}
        env.setdefault("DJANGO_SETTINGS_MODULE", os.environ.get("DJANGO_SETTINGS_MODULE", "controlplane.settings.dev"))
        plane = ControlPlane(cwd=Path(settings.BASE_DIR), env=env, port=port, log_dir=settings.DATA_DIR / "logs")
        plane.start()
        try:
            plane.wait_healthy()
            url = plane.url
            self.stdout.write(f"Cumulus console:       {url}/console/")
            self.stdout.write(f"API:                   {url}/api/v1/   (docs: {url}/api/docs/)")
            self.stdout.write(f"Admin console:         {url}/admin/")
            self.stdout.write(f"Data directory:        {settings.DATA_DIR}  (logs in logs/)")
            if creds:
                self.stdout.write(f"Sign in:               {creds['email']} / {creds['password']}")
                self.stdout.write(f"Workspace:             {creds['workspace']}")
                self.stdout.write(f"API token: {creds['token']}")
            self.stdout.write("Press Ctrl-C to stop. Local cluster nodes keep running; `make stop` stops them.")
            self.stdout.flush()
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            while True:
                plane.check_alive()
                time.sleep(1)
        except KeyboardInterrupt:
            self.stdout.write("Stopping the control plane…")
        finally:
            plane.stop()
