"""Embedded defaults for `make run`: everything local, nothing to configure."""

from controlplane.settings.base import *  # noqa: F403
