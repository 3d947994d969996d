"""Node providers: `local` (processes on this host) and the clouds.

`get_provider(name)` returns a ready provider; cloud SDKs are imported lazily by their
modules, so the control plane starts without them.
"""

from __future__ import annotations

from functools import cache

from clusters.providers.base import (
    Bootstrap,
    Instance,
    InstanceTypeInfo,
    LaunchRequest,
    NodeProvider,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)

__all__ = [
    "Bootstrap",
    "Instance",
    "InstanceTypeInfo",
    "LaunchRequest",
    "NodeProvider",
    "PermanentProviderError",
    "ProviderError",
    "TransientProviderError",
    "get_provider",
    "register_provider",
]

_overrides: dict[str, NodeProvider] = {}


def register_provider(name: str, provider: NodeProvider | None) -> None:
    """Install (or with None, remove) a provider instance for `name`; tests use this for fakes."""
    if provider is None:
        _overrides.pop(name, None)
    else:
        _overrides[name] = provider


@cache
def _build(name: str) -> NodeProvider:
    from django.conf import settings

    if name == "local":
        from clusters.providers.local import LocalProvider

        return LocalProvider(nodes_dir=settings.CUMULUS_LOCAL_NODES_DIR, install_id=install_id())
    raise PermanentProviderError(f"unknown provider {name!r}")


def get_provider(name: str) -> NodeProvider:
    if name in _overrides:
        return _overrides[name]
    return _build(name)


def install_id() -> str:
    """Tags every machine with this install, so two control planes never touch each other's."""
    from django.conf import settings

    if settings.CUMULUS_INSTALL_ID:
        return settings.CUMULUS_INSTALL_ID
    import hashlib

    return hashlib.sha256(str(settings.DATA_DIR).encode()).hexdigest()[:12]
