"""Fixtures for the local provider: a provider in a temp folder that cleans up every process it started."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from clusters.providers import catalog
from clusters.providers.base import Bootstrap, LaunchRequest
from clusters.providers.local import LocalProvider, instance_id_for, node_processes

UNREACHABLE_URL = "http://127.0.0.1:9"  # discard port: nothing listens, the agent just retries


def kill_node_trees(keys: list[str]) -> None:
    for key in keys:
        procs = node_processes(key)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)


@pytest.fixture
def local_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProvider]:
    # Short path: tmp_path can be long, and the node folder name is a 36-char uuid.
    provider = LocalProvider(str(tmp_path_factory.mktemp("nodes")), install_id=f"test-{uuid.uuid4().hex[:8]}")
    yield provider
    keys = [p.name for p in Path(provider.nodes_dir).iterdir() if p.is_dir()]
    provider.terminate_nodes([instance_id_for(k) for k in keys])
    kill_node_trees(keys)
    leftovers = {k: node_processes(k) for k in keys if node_processes(k)}
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture
def make_request() -> Callable[..., LaunchRequest]:
    def make(*, role: str = "head", cluster_uid: str = "c1", url: str = UNREACHABLE_URL, token: str = "boot",
             node_key: str | None = None, type_name: str = "local.small") -> LaunchRequest:
        return LaunchRequest(
            node_key=node_key or str(uuid.uuid4()),
            cluster_uid=cluster_uid,
            cluster_name="test",
            workspace="ws",
            role=role,  # type: ignore[arg-type]
            group="head" if role == "head" else "cpu",
            instance_type=catalog.find_instance_type("local", type_name),  # type: ignore[arg-type]
            bootstrap=Bootstrap(control_plane_url=url, bootstrap_token=token),
        )

    return make
