"""End to end: the installed `cloudctl` executable against a real control plane and real Ray nodes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.harness import ROOT, ControlPlaneHarness

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

CLOUDCTL = ROOT / ".venv" / "bin" / "cloudctl"
NAME = "cli-proj"


class Cli:
    def __init__(self, cwd: Path, xdg: Path) -> None:
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDCTL_")}
        self.env.update({"XDG_CONFIG_HOME": str(xdg), "COLUMNS": "120", "NO_COLOR": "1"})

    def __call__(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        result = subprocess.run([str(CLOUDCTL), *args], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        print(f"$ cloudctl {' '.join(args)}  -> {result.returncode}\n{result.stdout}{result.stderr}")
        assert "Traceback" not in result.stdout + result.stderr
        return result


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "cloud.yaml").write_text(yaml.safe_dump({
        "cluster": {"name": NAME, "provider": "local", "head": {"instance_type": "local.small"},
                    "worker_groups": []},
        "job": {"env": {"STAGE": "test"}, "pip": [], "excludes": ["data/"]},
    }))
    return root


@pytest.fixture
def cli(project: Path, tmp_path: Path, control_plane: ControlPlaneHarness) -> Iterator[Cli]:
    yield Cli(project, tmp_path / "xdg")
    api = control_plane.api()  # clean up even when the test failed half-way
    for cluster in api.request("GET", api.cluster_path()).json()["results"]:
        api.request("DELETE", api.cluster_path(cluster["name"]))
    for cluster in api.request("GET", api.cluster_path()).json()["results"]:
        api.wait_status(cluster["name"], "TERMINATED", timeout=120)


def test_laptop_loop(cli: Cli, project: Path, tmp_path: Path, control_plane: ControlPlaneHarness) -> None:
    url = control_plane.plane.url

    bad = cli("login", "--url", url, "--token", "cu_wrong")
    assert bad.returncode == 1
    assert "run `cloudctl login`" in bad.stderr

    login = cli("login", "--url", url, "--token", control_plane.token)
    assert login.returncode == 0, login.stderr
    assert f"Workspace: {control_plane.workspace}" in login.stdout
    config_file = tmp_path / "xdg" / "cloudctl" / "config.json"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert json.loads(config_file.read_text())["workspace"] == control_plane.workspace

    missing = cli("workspace", "use", "nope")
    assert missing.returncode == 1
    assert "Workspace 'nope' does not exist" in missing.stderr
    assert cli("workspace", "use", control_plane.workspace).returncode == 0

    listed = cli("clusters", "list", "--json")
    assert listed.returncode == 0
    assert json.loads(listed.stdout) == []

    nothing = cli("status")
    assert nothing.returncode == 1
    assert "run `cloudctl up`" in nothing.stderr

    up = cli("up", "-f", "cloud.yaml")
    assert up.returncode == 0, up.stderr
    assert "RUNNING" in up.stdout
    assert control_plane.api().cluster(NAME)["status"] == "RUNNING"

    again = cli("up", "--json")  # idempotent: the cluster is already running
    assert again.returncode == 0
    assert json.loads(again.stdout)["status"] == "RUNNING"

    status = cli("status", "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["name"] == NAME
    human = cli("clusters", "list")
    assert human.returncode == 0
    assert NAME in human.stdout and "RUNNING" in human.stdout

    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(yaml.safe_dump({"name": "bad-one", "provider": "local",
                                        "head": {"instance_type": "local.enormous"}}))
    created = cli("clusters", "create", "-f", str(bad_spec))
    assert created.returncode == 1
    assert "head.instance_type:" in created.stderr
    assert "bad-one" not in cli("clusters", "list").stdout

    assert created.stderr.splitlines()[0] == "The request is not valid:"

    no_file = cli("clusters", "create", "-f", str(tmp_path / "absent.yaml"))
    assert no_file.returncode == 1 and "No such spec file" in no_file.stderr

    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text(yaml.safe_dump({"name": NAME, "provider": "local", "head": {"instance_type": "local.small"}}))
    taken = cli("clusters", "create", "-f", str(duplicate))
    assert taken.returncode == 1
    assert "name: A live cluster with this name already exists" in taken.stderr

    down = cli("down", "--terminate", "--yes")
    assert down.returncode == 0, down.stderr
    assert "TERMINATED" in down.stdout
    assert control_plane.api().cluster(NAME)["status"] == "TERMINATED"
    assert json.loads(cli("clusters", "list", "--json").stdout) == []
