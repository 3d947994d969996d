"""`cloud.yaml`, the project file: the project's cluster spec and its job defaults."""

from __future__ import annotations

import os

from cloudctl.errors import CloudctlError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (7 ms): `cloudctl sync` starts its walk first
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

PROJECT_FILE = "cloud.yaml"
TOP_LEVEL_KEYS = ("cluster", "job")
JOB_KEYS = ("env", "pip", "excludes")

# Plain classes, not dataclasses: `cloudctl sync` reads this module on its way, and `dataclasses`
# imports `inspect` (8 ms).


class JobDefaults:
    __slots__ = ("env", "excludes", "pip")

    def __init__(self, env: dict[str, str] | None = None, pip: list[str] | None = None,
                 excludes: list[str] | None = None) -> None:
        self.env = env if env is not None else {}
        self.pip = pip if pip is not None else []
        self.excludes = excludes if excludes is not None else []

    def __repr__(self) -> str:
        return f"JobDefaults(env={self.env!r}, pip={self.pip!r}, excludes={self.excludes!r})"


class Project:
    __slots__ = ("cluster", "job", "path")

    def __init__(self, path: Path, cluster: dict[str, Any], job: JobDefaults) -> None:
        self.path = path
        self.cluster = cluster
        self.job = job

    def __repr__(self) -> str:
        return f"Project(path={self.path!r}, cluster={self.cluster!r}, job={self.job!r})"

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def cluster_name(self) -> str:
        return self.cluster["name"]


def find_project_file(start: Path | None = None) -> Path | None:
    """`cloud.yaml` in `start` (default: the current directory) or the nearest parent that has one.

    On os.path, with pathlib imported only once there is a file: `cloudctl sync` looks for it in a
    child process that should start walking the project at once (cloudctl.walk).
    """
    here = os.path.realpath(start if start is not None else os.getcwd())
    while True:
        candidate = os.path.join(here, PROJECT_FILE)
        if os.path.isfile(candidate):
            from pathlib import Path

            return Path(candidate)
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def read_yaml(path: Path, what: str = "file") -> Any:
    """yaml.safe_load of a file, every failure as one sentence."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CloudctlError(f"No such {what}: {path}.") from None
    except IsADirectoryError:
        raise CloudctlError(f"{path} is a directory, not a {what}.") from None
    except OSError as exc:
        raise CloudctlError(f"Cannot read {path}: {exc.strerror}.") from None
    import yaml  # here: a project without cloud.yaml does not pay for it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise CloudctlError(f"{path} is not valid YAML{where}: {problem}.") from None


def parse_project(data: Any, path: Path) -> Project:
    """Validate the parsed content of a cloud.yaml."""
    if not isinstance(data, dict):
        raise CloudctlError(f"{path} must be a mapping with a `cluster:` section.")
    unknown = sorted(str(k) for k in data if k not in TOP_LEVEL_KEYS)
    if unknown:
        raise CloudctlError(f"{path} has unknown top-level key(s) {', '.join(unknown)}; "
                            f"allowed are: {', '.join(TOP_LEVEL_KEYS)}.")
    cluster = data.get("cluster")
    if not isinstance(cluster, dict):
        raise CloudctlError(f"{path} needs a `cluster:` section holding the cluster spec (a mapping).")
    name = cluster.get("name")
    if not isinstance(name, str) or not name:
        raise CloudctlError(f"{path} needs `cluster.name`, the name of the project's cluster.")
    job = data.get("job")
    job = {} if job is None else job
    if not isinstance(job, dict):
        raise CloudctlError(f"`job:` in {path} must be a mapping of {', '.join(JOB_KEYS)}.")
    unknown = sorted(str(k) for k in job if k not in JOB_KEYS)
    if unknown:
        raise CloudctlError(f"`job:` in {path} has unknown key(s) {', '.join(unknown)}; "
                            f"allowed are: {', '.join(JOB_KEYS)}.")
    env = job.get("env")
    env = {} if env is None else env
    if not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
        raise CloudctlError(f"`job.env` in {path} must be a mapping of variable names to values.")
    lists = {}
    for key in ("pip", "excludes"):
        value = job.get(key)
        value = [] if value is None else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CloudctlError(f"`job.{key}` in {path} must be a list of strings.")
        lists[key] = value
    return Project(path=path, cluster=cluster,
                   job=JobDefaults(env={k: "" if v is None else str(v) for k, v in env.items()}, **lists))


def load_project(path: Path | None = None, *, required: bool = True) -> Project | None:
    """The project file given with -f, else the nearest cloud.yaml; None if not required and absent."""
    if path is None:
        path = find_project_file()
        if path is None:
            if required:
                raise CloudctlError(f"No {PROJECT_FILE} here or in a parent directory; create one or pass -f FILE.")
            return None
    return parse_project(read_yaml(path, "project file"), path)
