"""An in-memory NodeProvider for fast tests of the reconciler (see clusters/providers/base.py).

Behaves like a well-mannered cloud: idempotent per node key, tagged, listable by cluster.
Tests can inject errors (`fail_next`), slow it down to widen races (`delay_s`), make
machines vanish, and plant machines that no node row knows about.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from clusters.providers.base import Instance, InstanceTypeInfo, LaunchRequest, ProviderError
from clusters.providers.catalog import instance_types


@dataclass
class _Failure:
    error: ProviderError
    when: Callable[[LaunchRequest], bool]
    times: int


class FakeProvider:
    name = "local"

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s  # added to every list and create call
        self.instances: dict[str, Instance] = {}  # by node key; only machines that are not terminated
        self.create_calls: list[str] = []  # node keys, one per call
        self.terminated: list[str] = []  # instance ids, one per machine actually terminated
        self._failures: list[_Failure] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # --- the NodeProvider protocol ----------------------------------------------------

    def create_node(self, request: LaunchRequest) -> Instance:
        with self._lock:
            self.create_calls.append(request.node_key)
            failure = next((f for f in self._failures if f.when(request)), None)
            if failure is not None:
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                raise failure.error
        if self.delay_s:
            time.sleep(self.delay_s)  # the window in which a second reconcile could race this one
        with self._lock:
            existing = self.instances.get(request.node_key)
            if existing is not None:
                return existing
            number = next(self._ids)
            inst = Instance(
                instance_id=f"fake-{number}",
                node_key=request.node_key,
                cluster_uid=request.cluster_uid,
                status="running",
                instance_type=request.instance_type.name,
                private_ip=f"10.0.0.{number}",
                launched_at=time.time(),
                tags={"cumulus-role": request.role, "cumulus-group": request.group, **request.tags},
            )
            self.instances[request.node_key] = inst
            return inst

    def terminate_nodes(self, instance_ids: list[str]) -> None:
        with self._lock:
            for key, inst in list(self.instances.items()):
                if inst.instance_id in instance_ids:
                    del self.instances[key]
                    self.terminated.append(inst.instance_id)

    def list_nodes(self, cluster_uid: str | None = None) -> list[Instance]:
        if self.delay_s:
            time.sleep(self.delay_s)  # lets two reconciles observe the same (empty) world
        with self._lock:
            return [i for i in self.instances.values() if cluster_uid is None or i.cluster_uid == cluster_uid]

    def instance_types(self) -> list[InstanceTypeInfo]:
        return list(instance_types("local"))

    # --- test controls ----------------------------------------------------------------

    def fail_next(self, error: ProviderError, *, role: str | None = None, times: int = 1) -> None:
        """Raise `error` from the next `times` create calls (of this role, if given)."""
        with self._lock:
            self._failures.append(_Failure(error, lambda r: role is None or r.role == role, times))

    def vanish(self, node_key: str) -> None:
        """The machine disappears without anyone asking (spot reclaim, host failure)."""
        with self._lock:
            del self.instances[node_key]

    def plant(self, *, node_key: str, cluster_uid: str, age_s: float = 0.0) -> Instance:
        """A machine that exists at the provider, created `age_s` ago, whatever the database says."""
        with self._lock:
            inst = Instance(instance_id=f"fake-{next(self._ids)}", node_key=node_key, cluster_uid=cluster_uid,
                            status="running", instance_type="local.small", launched_at=time.time() - age_s)
            self.instances[node_key] = inst
            return inst

    def age(self, node_key: str, seconds: float) -> None:
        with self._lock:
            inst = self.instances[node_key]
            self.instances[node_key] = replace(inst, launched_at=(inst.launched_at or time.time()) - seconds)

    def creates_for(self, node_key: str) -> int:
        return self.create_calls.count(node_key)
