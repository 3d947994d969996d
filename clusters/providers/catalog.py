"""Instance-type catalog per provider.

`local` types are process trees on this host; their prices are nominal so that metering
and budgets can be exercised without a cloud account. `local.gpu` advertises one GPU to
Ray (`--num-gpus=1`) so GPU scheduling paths are testable on a machine without one.
"""

from __future__ import annotations

from clusters.providers.base import InstanceTypeInfo

LOCAL_TYPES: tuple[InstanceTypeInfo, ...] = (
    InstanceTypeInfo("local", "local.small", cpus=1, memory_gb=2, price_per_hour=0.01, spot_price_per_hour=0.004,
                     description="1 CPU process tree on this host"),
    InstanceTypeInfo("local", "local.medium", cpus=2, memory_gb=4, price_per_hour=0.02, spot_price_per_hour=0.008,
                     description="2 CPU process tree on this host"),
    InstanceTypeInfo("local", "local.gpu", cpus=1, memory_gb=4, gpus=1, gpu_type="virtual", price_per_hour=0.10,
                     spot_price_per_hour=0.04, description="1 CPU, advertises 1 GPU to Ray (no real GPU)"),
)

CATALOG: dict[str, tuple[InstanceTypeInfo, ...]] = {"local": LOCAL_TYPES}


def instance_types(provider: str) -> tuple[InstanceTypeInfo, ...]:
    return CATALOG.get(provider, ())


def find_instance_type(provider: str, name: str) -> InstanceTypeInfo | None:
    return next((t for t in instance_types(provider) if t.name == name), None)
