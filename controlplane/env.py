"""Environment access for settings: one `env` object, one data directory."""

from __future__ import annotations

from pathlib import Path

import environ

env = environ.Env()

BASE_DIR = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Where the embedded defaults keep their state: `.cumulus/` in the checkout, or CUMULUS_DATA_DIR."""
    path = Path(env.str("CUMULUS_DATA_DIR", default=str(BASE_DIR / ".cumulus"))).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
