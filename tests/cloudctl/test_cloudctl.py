"""cloudctl without a server: config, cloud.yaml, error sentences, usage errors."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudctl import config
from cloudctl.errors import CloudctlError, api_error, flatten_fields
from cloudctl.main import app
from cloudctl.output import age, cost, nodes_summary
from cloudctl.project import find_project_file, load_project, parse_project

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for var in ("CLOUDCTL_URL", "CLOUDCTL_TOKEN", "CLOUDCTL_WORKSPACE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- config ---------------------------------------------------------------------------------------


def test_config_saved_owner_only(tmp_path: Path) -> None:
    path = config.save(config.Config(url="http://cp", token="cu_secret", workspace="ml"))
    assert path == tmp_path / "xdg" / "cloudctl" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"url": "http://cp", "token": "cu_secret", "workspace": "ml"}
    assert config.load() == config.Config(url="http://cp", token="cu_secret", workspace="ml")


def test_config_mode_fixed_on_rewrite(tmp_path: Path) -> None:
    path = config.save(config.Config(url="http://cp", token="a"))
    path.chmod(0o644)
    config.save(config.Config(url="http://cp", token="b"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.load().token == "b"


def test_env_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    config.save(config.Config(url="http://file", token="file-token", workspace="file-ws"))
    monkeypatch.setenv("CLOUDCTL_URL", "http://env/")
    monkeypatch.setenv("CLOUDCTL_TOKEN", "env-token")
    monkeypatch.setenv("CLOUDCTL_WORKSPACE", "env-ws")
    assert config.load() == config.Config(url="http://env", token="env-token", workspace="env-ws")
    assert config.load_file().token == "file-token"


def test_env_alone_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDCTL_URL", "http://env")
    assert config.load() == config.Config(url="http://env")


def test_corrupt_config_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "xdg" / "cloudctl" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(CloudctlError, match="run `cloudctl login`"):
        config.load()


# -- cloud.yaml -----------------------------------------------------------------------------------

SPEC = {"name": "proj", "provider": "local", "head": {"instance_type": "local.small"}}


def test_project_parsed(tmp_path: Path) -> None:
    project = parse_project({"cluster": SPEC, "job": {"env": {"A": 1}, "pip": ["numpy"], "excludes": ["data/"]}},
                            tmp_path / "cloud.yaml")
    assert project.cluster_name == "proj"
    assert project.job.env == {"A": "1"}
    assert project.job.pip == ["numpy"]
    assert project.job.excludes == ["data/"]
    assert project.root == tmp_path


@pytest.mark.parametrize(("data", "fragment"), [
    (None, "must be a mapping"),
    (["cluster"], "must be a mapping"),
    ({"job": {}}, "needs a `cluster:` section"),
    ({"cluster": {"provider": "local"}}, "needs `cluster.name`"),
    ({"cluster": SPEC, "clutser": {}}, "unknown top-level key(s) clutser"),
    ({"cluster": SPEC, "job": []}, "`job:`"),
    ({"cluster": SPEC, "job": {"evn": {}}}, "unknown key(s) evn"),
    ({"cluster": SPEC, "job": {"env": ["A=1"]}}, "`job.env`"),
    ({"cluster": SPEC, "job": {"pip": "numpy"}}, "`job.pip`"),
    ({"cluster": SPEC, "job": {"excludes": [1]}}, "`job.excludes`"),
])
def test_project_invalid(tmp_path: Path, data: object, fragment: str) -> None:
    with pytest.raises(CloudctlError) as info:
        parse_project(data, tmp_path / "cloud.yaml")
    assert fragment in info.value.message
    assert "\n" not in info.value.message


def test_project_found_in_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cloud.yaml").write_text("cluster:\n  name: proj\n")
    sub = tmp_path / "src" / "pkg"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert find_project_file() == tmp_path / "cloud.yaml"
    assert load_project().cluster_name == "proj"


def test_no_project_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cloudctl.project.find_project_file", lambda start=None: None)
    assert load_project(required=False) is None
    with pytest.raises(CloudctlError, match=r"No cloud.yaml here or in a parent directory"):
        load_project()


def test_bad_yaml_says_where(tmp_path: Path) -> None:
    (tmp_path / "cloud.yaml").write_text("cluster:\n  name: [oops\n")
    with pytest.raises(CloudctlError, match=r"not valid YAML at line \d+"):
        load_project(tmp_path / "cloud.yaml")


# -- error sentences --------------------------------------------------------------------------------


def body(code: str, message: str, fields: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, "fields": fields or {}}}


def test_validation_error_one_line_per_field() -> None:
    fields = {"name": ["Enter a valid name."], "head": {"instance_type": ["Unknown instance type 'x'."]},
              "worker_groups": [{}, {"max_workers": ["Must be at least min_workers."]}],
              "non_field_errors": ["Something global."]}
    error = api_error(400, body("invalid", "The cluster spec is invalid.", fields))
    assert error.lines() == [
        "The cluster spec is invalid:",
        "name: Enter a valid name.",
        "head.instance_type: Unknown instance type 'x'.",
        "worker_groups[1].max_workers: Must be at least min_workers.",
        "Something global.",
    ]
    assert error.code == 1


def test_flatten_scalar_and_empty() -> None:
    assert flatten_fields({}) == []
    assert flatten_fields({"a": "bad"}) == ["a: bad"]


@pytest.mark.parametrize(("status", "payload", "fragment"), [
    (401, body("not_authenticated", "Invalid token."), "run `cloudctl login`"),
    (403, body("permission_denied", "Role viewer cannot do this."), "Permission denied (403): Role viewer"),
    (404, body("not_found", "Not found."), "Not found (404)"),
    (409, body("conflict", "Cannot start a cluster that is RUNNING."), "Cannot start a cluster that is RUNNING."),
    (400, body("invalid", "Bad page_size."), "Bad page_size."),
    (429, body("throttled", "Slow down."), "rate limiting"),
    (500, None, "HTTP 500"),
    (502, "<html>", "HTTP 502"),
    (418, body("teapot", "I am a teapot"), "HTTP 418: I am a teapot."),
])
def test_status_sentences(status: int, payload: object, fragment: str) -> None:
    error = api_error(status, payload)
    assert fragment in error.message
    assert error.details == []
    assert "\n" not in error.message


def test_not_found_context() -> None:
    assert api_error(404, body("not_found", "Not found."), not_found="Cluster 'x' does not exist").message == \
        "Cluster 'x' does not exist."


# -- rendering --------------------------------------------------------------------------------------


def test_rendering_helpers() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert age("2026-01-01T11:58:30Z", now) == "1m"
    assert age("2026-01-01T11:59:55+00:00", now) == "5s"
    assert age("2025-12-30T12:00:00Z", now) == "2d"
    assert age(None) == "-"
    assert nodes_summary({}) == "0"
    assert nodes_summary({"RUNNING": 1, "PENDING": 2}) == "3 (2 pending, 1 running)"
    assert cost(0) == "$0.00"
    assert cost(0.0012) == "<$0.01"
    assert cost("3.456") == "$3.46"


# -- CLI without a server ---------------------------------------------------------------------------

UNREACHABLE = "http://127.0.0.1:9"


def assert_one_sentence_failure(result, fragment: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert fragment in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_login_unreachable() -> None:
    result = runner.invoke(app, ["login", "--url", UNREACHABLE, "--token", "t"])
    assert_one_sentence_failure(result, "Cannot reach the control plane at http://127.0.0.1:9")
    assert not config.config_path().exists()


def test_commands_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDCTL_URL", UNREACHABLE)
    monkeypatch.setenv("CLOUDCTL_TOKEN", "t")
    monkeypatch.setenv("CLOUDCTL_WORKSPACE", "ws")
    for args in (["clusters", "list"], ["clusters", "get", "x", "--json"], ["workspace", "list"], ["status"]):
        assert_one_sentence_failure(runner.invoke(app, args), "Cannot reach the control plane")


def test_not_logged_in() -> None:
    assert_one_sentence_failure(runner.invoke(app, ["clusters", "list"]), "Not logged in; run `cloudctl login")


def test_no_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDCTL_URL", UNREACHABLE)
    monkeypatch.setenv("CLOUDCTL_TOKEN", "t")
    assert_one_sentence_failure(runner.invoke(app, ["clusters", "list"]), "cloudctl workspace use")


def test_invalid_url() -> None:
    result = runner.invoke(app, ["login", "--url", "127.0.0.1:8000", "--token", "t"])
    assert_one_sentence_failure(result, "not a valid control-plane URL")


def test_usage_errors_exit_2() -> None:
    assert runner.invoke(app, ["clusters", "list", "--bogus"]).exit_code == 2
    assert runner.invoke(app, ["login", "--url", "http://x"]).exit_code == 2  # no token
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2
    assert runner.invoke(app, ["clusters", "create"]).exit_code == 2  # -f required


def test_missing_and_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDCTL_URL", UNREACHABLE)
    monkeypatch.setenv("CLOUDCTL_TOKEN", "t")
    monkeypatch.setenv("CLOUDCTL_WORKSPACE", "ws")
    assert_one_sentence_failure(runner.invoke(app, ["up", "-f", "nope.yaml"]), "No such project file")
    assert_one_sentence_failure(runner.invoke(app, ["clusters", "create", "-f", "nope.yaml"]), "No such spec file")
    (tmp_path / "cloud.yaml").write_text("cluster: [\n")
    assert_one_sentence_failure(runner.invoke(app, ["up"]), "is not valid YAML")
    (tmp_path / "cloud.yaml").write_text("cluster: {name: p}\nextra: 1\n")
    assert_one_sentence_failure(runner.invoke(app, ["down"]), "unknown top-level key(s) extra")
    (tmp_path / "spec.yaml").write_text("- a list\n")
    result = runner.invoke(app, ["clusters", "create", "-f", "spec.yaml"])
    assert_one_sentence_failure(result, "must hold a cluster spec")


def test_delete_needs_yes_without_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDCTL_URL", UNREACHABLE)
    monkeypatch.setenv("CLOUDCTL_TOKEN", "t")
    monkeypatch.setenv("CLOUDCTL_WORKSPACE", "ws")
    assert_one_sentence_failure(runner.invoke(app, ["clusters", "delete", "x"]), "pass --yes")


# -- waiting, with a fake API -----------------------------------------------------------------------


class FakeClient:
    def __init__(self, statuses: list[dict]) -> None:
        self.statuses = statuses
        self.created: list[dict] = []

    def cluster_get(self, name: str) -> dict:
        if not self.created:
            raise CloudctlError(f"Cluster '{name}' does not exist in workspace 'ws'.")
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def cluster_create(self, spec: dict) -> dict:
        self.created.append(spec)
        return {"name": spec["name"], "status": "PENDING", "nodes": {}}


@pytest.fixture
def project_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "cloud.yaml").write_text("cluster:\n  name: p\n  provider: local\n")
    monkeypatch.setattr("cloudctl.main.time.sleep", lambda s: None)
    return tmp_path


def test_up_fails_with_status_message(project_here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClient([{"name": "p", "status": "PROVISIONING", "nodes": {"PENDING": 1}},
                       {"name": "p", "status": "FAILED", "status_message": "Quota exceeded: max 0 nodes"}])
    monkeypatch.setattr("cloudctl.main.client", lambda: fake)
    result = runner.invoke(app, ["up"])
    assert result.exit_code == 1
    assert "Cluster p FAILED: Quota exceeded: max 0 nodes." in result.output
    assert fake.created == [{"name": "p", "provider": "local"}]


def test_up_waits_until_running(project_here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClient([{"name": "p", "status": "STARTING", "nodes": {"PENDING": 1}},
                       {"name": "p", "status": "RUNNING", "nodes": {"READY": 1}}])
    monkeypatch.setattr("cloudctl.main.client", lambda: fake)
    result = runner.invoke(app, ["up", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "RUNNING"


def test_ctrl_c_exits_130(project_here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClient([{"name": "p", "status": "STARTING", "nodes": {}}])

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("cloudctl.main.client", lambda: fake)
    monkeypatch.setattr("cloudctl.main.time.sleep", interrupted)
    result = runner.invoke(app, ["up"])
    assert result.exit_code == 130
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Interrupted;")
    assert "created" in result.stderr  # the one line before: what had been requested
