"""Fast tests of the agent's pure parts: ports, command line, backoff, identity, config."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import sys

import pytest

from runtime_agent.agent import Agent
from runtime_agent.client import AgentClient, Backoff, Unreachable
from runtime_agent.identity import AgentConfig, Identity, default_ray_temp_dir, load_identity, save_identity
from runtime_agent.ports import SINGLE_PORT_RANGE, WORKER_PORT_RANGE, PortReservation, RayPorts
from runtime_agent.ray_node import RaySpec, build_start_command, build_start_env

PORTS = RayPorts(gcs=20001, dashboard=20002, client_server=20003, dashboard_agent_listen=20004,
                 dashboard_agent_grpc=20005, metrics_export=20006, runtime_env_agent=20007, node_manager=20008,
                 object_manager=20009, autoscaler_metrics=20010, dashboard_metrics=20011,
                 min_worker=10000, max_worker=10063)


def test_reserved_ports_are_distinct_free_and_outside_the_ephemeral_range() -> None:
    with PortReservation() as reservation:
        ports = reservation.ray_ports()
        singles = ports.single_ports()
        # held while reserved: nobody else can bind them
        for port in singles[:3]:
            with socket.socket() as sock, pytest.raises(OSError):
                sock.bind(("", port))
    assert len(set(singles)) == len(singles) == 11
    assert all(SINGLE_PORT_RANGE[0] <= p < SINGLE_PORT_RANGE[1] for p in singles)
    assert ports.max_worker - ports.min_worker == 63
    assert WORKER_PORT_RANGE[0] <= ports.min_worker and ports.max_worker < WORKER_PORT_RANGE[1]
    assert ports.max_worker < 32768  # Linux's default ephemeral range starts there
    # released: bindable again
    with socket.socket() as sock:
        sock.bind(("", singles[0]))


def test_port_reservation_skips_ports_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        taken = busy.getsockname()[1]
        # a generator that proposes the busy port first, then a free one
        rng = random.Random(0)
        proposals = iter([taken])

        class Rigged(random.Random):
            def randrange(self, *args: int) -> int:  # type: ignore[override]
                return next(proposals, None) or rng.randrange(*args)

        with PortReservation(rng=Rigged()) as reservation:
            assert reservation.port(lo=taken, hi=taken + 1000) != taken


def test_two_reservations_never_share_a_port() -> None:
    with PortReservation() as a, PortReservation() as b:
        pa, pb = a.ray_ports(), b.ray_ports()
    assert not set(pa.single_ports()) & set(pb.single_ports())
    assert not set(range(pa.min_worker, pa.max_worker + 1)) & set(range(pb.min_worker, pb.max_worker + 1))


def test_head_command_sets_every_port_and_never_uses_defaults() -> None:
    spec = RaySpec(role="head", num_cpus=2, num_gpus=1, memory_bytes=2 * 1024**3, resources={"local.gpu": 1.0},
                   labels={"group": "head"})
    cmd = build_start_command(spec=spec, ports=PORTS, node_ip="127.0.0.1", temp_dir="/tmp/cumulus-ray/abc")
    args = " ".join(cmd)
    for flag in ("--head", "--block", "--disable-usage-stats", "--port=20001", "--dashboard-port=20002",
                 "--dashboard-host=127.0.0.1", "--ray-client-server-port=20003", "--dashboard-agent-listen-port=20004",
                 "--dashboard-agent-grpc-port=20005", "--metrics-export-port=20006", "--runtime-env-agent-port=20007",
                 "--node-manager-port=20008", "--object-manager-port=20009", "--min-worker-port=10000",
                 "--max-worker-port=10063", "--temp-dir=/tmp/cumulus-ray/abc", "--node-ip-address=127.0.0.1",
                 "--num-cpus=2", "--num-gpus=1", f"--memory={2 * 1024**3}", "--labels=group=head"):
        assert flag in cmd, flag
    assert json.loads(next(a for a in cmd if a.startswith("--resources=")).split("=", 1)[1]) == {"local.gpu": 1.0}
    assert "6379" not in args and "--address" not in args


def test_worker_command_joins_the_head_with_its_own_temp_dir() -> None:
    spec = RaySpec(role="worker", num_cpus=1)
    cmd = build_start_command(spec=spec, ports=PORTS, node_ip="127.0.0.1", temp_dir="/tmp/cumulus-ray/w1",
                              gcs_address="127.0.0.1:20001")
    assert "--address=127.0.0.1:20001" in cmd and "--temp-dir=/tmp/cumulus-ray/w1" in cmd
    assert "--head" not in cmd and not any(a.startswith("--port=") for a in cmd)
    with pytest.raises(ValueError):
        build_start_command(spec=spec, ports=PORTS, node_ip="127.0.0.1", temp_dir="/t")


def test_start_env_carries_the_node_marker_and_the_env_only_ports() -> None:
    env = build_start_env(node_key="k1", ports=PORTS, base={"PATH": "/bin"})
    assert env["CUMULUS_NODE_KEY"] == "k1"
    assert env["AUTOSCALER_METRIC_PORT"] == "20010" and env["DASHBOARD_METRIC_PORT"] == "20011"


def test_a_jobs_python_is_the_one_that_runs_ray() -> None:
    env = build_start_env(node_key="k1", ports=PORTS, base={"PATH": "/usr/bin:/bin"})
    assert env["PATH"] == f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"
    assert build_start_env(node_key="k1", ports=PORTS, base=env)["PATH"] == env["PATH"]  # not added twice


def test_temp_dir_is_short_enough_for_unix_sockets() -> None:
    temp = default_ray_temp_dir("0f8fad5b-d9cb-469f-a165-70867728950e")
    assert temp == "/tmp/cumulus-ray/0f8fad5bd9cb"
    # Ray's longest socket path: <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
    longest = f"{temp}/session_2025-01-01_00-00-00_000000_4194304/sockets/plasma_store"
    assert len(longest) < 108


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    backoff = Backoff(base_s=0.1, cap_s=5.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(30)]
    assert all(0.05 <= d <= 5.0 for d in delays)
    assert max(delays[10:]) > 1.0  # it grows
    assert len(set(delays)) > 20  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_identity_is_saved_atomically_and_privately(tmp_path) -> None:
    identity = Identity(node_id="n1", node_token="secret", registration={"role": "worker", "ray": {"num_cpus": 1}})
    save_identity(str(tmp_path), identity)
    path = tmp_path / "identity.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_identity(str(tmp_path)) == identity
    assert [p.name for p in tmp_path.iterdir()] == ["identity.json"]  # no temp file left
    assert load_identity(str(tmp_path / "missing")) is None


def test_agent_reuses_a_saved_identity_without_registering(tmp_path) -> None:
    # given: a saved identity and a control plane that must not be called
    save_identity(str(tmp_path), Identity("n1", "tok", {"role": "worker", "heartbeat_interval_s": 2.0,
                                                        "ray": {"num_cpus": 3}}))

    class NoRegister(AgentClient):
        def register(self, body):  # type: ignore[no-untyped-def]
            raise AssertionError("registered twice")

    config = AgentConfig(control_plane_url="http://127.0.0.1:9", bootstrap_token="b", node_key="k-test-reuse",
                         state_dir=str(tmp_path), address="127.0.0.1")
    agent = Agent(config, client=NoRegister(config.control_plane_url))
    # when
    assert agent.ensure_identity() is None
    # then
    assert agent.identity and agent.identity.node_id == "n1"
    assert agent.spec == RaySpec(role="worker", num_cpus=3) and agent.heartbeat_interval_s == 2.0


def test_client_reports_connection_refused_as_unreachable() -> None:
    with pytest.raises(Unreachable):
        AgentClient("http://127.0.0.1:9", timeout_s=1).register({})
    with pytest.raises(ValueError):
        AgentClient("file:///etc/passwd")


def test_config_ignores_unknown_keys(tmp_path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"control_plane_url": "http://x", "bootstrap_token": "b", "node_key": "k",
                                "state_dir": "/s", "future_field": 1}))
    config = AgentConfig.load(str(path))
    assert config.temp_dir == "/tmp/cumulus-ray/k"


def test_join_and_stop_commands(tmp_path) -> None:
    config = AgentConfig(control_plane_url="http://127.0.0.1:9", bootstrap_token="b", node_key="k",
                         state_dir=str(tmp_path), address="127.0.0.1")
    agent = Agent(config)
    agent.spec = RaySpec(role="head", num_cpus=1)
    agent.handle_response({"commands": [{"type": "join", "gcs_address": "1.2.3.4:5"}], "heartbeat_interval_s": 3})
    assert agent.ray is None and agent.heartbeat_interval_s == 3.0  # a head never joins
    agent.handle_response({"commands": [{"type": "drain", "reason": "idle"}]})
    assert agent._stop_reason == "drain: idle" and agent._stop_is_command


def test_boot_lock_lets_one_node_of_a_host_boot_at_a_time(tmp_path) -> None:
    from runtime_agent.agent import BootLock

    first, second = BootLock(str(tmp_path / "boot.lock")), BootLock(str(tmp_path / "boot.lock"))
    assert first.acquire()
    assert first.acquire()  # re-entrant for its holder
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    assert BootLock(None).acquire()  # no lock configured: never waits
