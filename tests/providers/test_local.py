"""The local provider's process mechanics, with agents pointed at a control plane that is not there.

Such an agent just retries registration forever, which is all these tests need: a live,
detached process tree carrying the node's env marker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil

from clusters.providers.base import TAG_CLUSTER, TAG_INSTALL, TAG_NODE, TAG_ROLE, Instance, LaunchRequest
from clusters.providers.local import LocalProvider, node_processes, ray_temp_dir


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def agent_pid(provider: LocalProvider, node_key: str) -> int:
    with open(os.path.join(provider.nodes_dir, node_key, "agent.pid")) as fh:
        return int(fh.read())


def test_create_launches_a_detached_agent_quickly(local_provider: LocalProvider, make_request) -> None:
    request: LaunchRequest = make_request()
    started = time.monotonic()
    instance = local_provider.create_node(request)
    elapsed = time.monotonic() - started

    assert elapsed < 0.5
    assert instance.status == "running" and instance.node_key == request.node_key
    assert instance.instance_id == "local-" + request.node_key.replace("-", "")[:12]
    assert instance.tags[TAG_INSTALL] == local_provider.install_id and instance.tags[TAG_CLUSTER] == "c1"
    assert instance.tags[TAG_NODE] == request.node_key and instance.tags[TAG_ROLE] == "head"
    agent = psutil.Process(agent_pid(local_provider, request.node_key))
    assert agent.ppid() != os.getpid()  # reparented: never our zombie
    assert os.getsid(agent.pid) == agent.pid and os.getpgid(agent.pid) == agent.pid  # its own session
    assert agent.environ()["CUMULUS_NODE_KEY"] == request.node_key
    node_dir = os.path.join(local_provider.nodes_dir, request.node_key)
    with open(os.path.join(node_dir, "agent.json")) as fh:
        config = json.load(fh)
    assert config["node_key"] == request.node_key and config["ray_temp_dir"] == ray_temp_dir(request.node_key)
    assert {"instance.json", "agent.json", "agent.pid", "agent.log"} <= set(os.listdir(node_dir))


def test_create_is_idempotent_per_node_key(local_provider: LocalProvider, make_request) -> None:
    request = make_request()
    results: list[Instance] = []

    def create() -> None:
        results.append(local_provider.create_node(request))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.append(local_provider.create_node(request))

    assert len({r.instance_id for r in results}) == 1
    assert {r.status for r in results} == {"running"}
    assert len(node_processes(request.node_key)) == 1  # one agent, one process tree


def test_list_finds_only_this_install_and_cluster(local_provider: LocalProvider, make_request) -> None:
    a = local_provider.create_node(make_request(cluster_uid="c1"))
    b = local_provider.create_node(make_request(cluster_uid="c2", role="worker"))
    other_install = LocalProvider(local_provider.nodes_dir, install_id="someone-else")

    assert {i.instance_id for i in local_provider.list_nodes()} == {a.instance_id, b.instance_id}
    assert [i.instance_id for i in local_provider.list_nodes("c1")] == [a.instance_id]
    assert [i.instance_id for i in local_provider.list_nodes("c2")] == [b.instance_id]
    assert local_provider.list_nodes("c3") == []
    assert other_install.list_nodes() == []
    other_install.terminate_nodes([a.instance_id])  # not its machine: ignored
    assert node_processes(a.node_key)


def test_a_killed_tree_is_not_listed_and_never_relaunched(local_provider: LocalProvider, make_request) -> None:
    request = make_request()
    local_provider.create_node(request)
    os.makedirs(ray_temp_dir(request.node_key), exist_ok=True)

    for proc in node_processes(request.node_key):
        proc.send_signal(signal.SIGKILL)
    wait_for(lambda: not node_processes(request.node_key), 10, "the tree to die")

    assert local_provider.list_nodes() == []
    assert not os.path.exists(ray_temp_dir(request.node_key))  # cleaned like a dead VM's disk
    assert local_provider.create_node(request).status == "terminated"
    assert not node_processes(request.node_key)


def test_terminate_stops_every_process_of_the_node_and_is_idempotent(
    local_provider: LocalProvider, make_request,
) -> None:
    keep = local_provider.create_node(make_request())
    gone = local_provider.create_node(make_request())
    # A Ray-like child of the node that moved to another session (as some Ray children do)
    # and ignores SIGTERM: only the env marker finds it, only SIGKILL ends it.
    env = dict(os.environ, CUMULUS_NODE_KEY=gone.node_key)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
        env=env, start_new_session=True,
    )
    wait_for(lambda: len(node_processes(gone.node_key)) == 2, 5, "the stubborn child")
    provider = LocalProvider(local_provider.nodes_dir, local_provider.install_id, terminate_grace_s=1.0)

    provider.terminate_nodes([gone.instance_id, "local-unknown"])
    stubborn.wait(timeout=5)  # reap our own child (the provider killed it)

    assert not node_processes(gone.node_key)
    assert [i.instance_id for i in provider.list_nodes()] == [keep.instance_id]
    node_dir = os.path.join(provider.nodes_dir, gone.node_key)
    assert os.path.exists(os.path.join(node_dir, "terminated.json"))
    assert os.path.exists(os.path.join(node_dir, "agent.log"))  # logs are kept for the user
    provider.terminate_nodes([gone.instance_id])  # again: no error
    assert provider.create_node(make_request(node_key=gone.node_key)).status == "terminated"
    assert not node_processes(gone.node_key)


def test_terminate_several_nodes_in_parallel(local_provider: LocalProvider, make_request) -> None:
    instances = [local_provider.create_node(make_request()) for _ in range(3)]
    started = time.monotonic()
    local_provider.terminate_nodes([i.instance_id for i in instances])
    assert time.monotonic() - started < 5
    assert not any(node_processes(i.node_key) for i in instances)
    assert local_provider.list_nodes() == []


def test_a_reused_pid_is_not_mistaken_for_the_agent(local_provider: LocalProvider, make_request) -> None:
    request = make_request()
    local_provider.create_node(request)
    for proc in node_processes(request.node_key):
        proc.kill()
    wait_for(lambda: not node_processes(request.node_key), 10, "the agent to die")
    # The agent's PID now belongs to an unrelated process.
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with open(os.path.join(local_provider.nodes_dir, request.node_key, "agent.pid"), "w") as fh:
            fh.write(str(impostor.pid))

        assert local_provider.list_nodes() == []
        assert local_provider.create_node(request).status == "terminated"
        local_provider.terminate_nodes([f"local-{request.node_key.replace('-', '')[:12]}"])
        assert impostor.poll() is None  # never signalled
    finally:
        impostor.kill()
        impostor.wait()


def test_instance_types_is_the_local_catalog(local_provider: LocalProvider) -> None:
    assert [t.name for t in local_provider.instance_types()] == ["local.small", "local.medium", "local.gpu"]
