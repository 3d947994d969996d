"""Where cloudctl keeps its sign-in: `$XDG_CONFIG_HOME/cloudctl/config.json`, mode 0600.

`CLOUDCTL_URL`, `CLOUDCTL_TOKEN` and `CLOUDCTL_WORKSPACE` override what the file says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cloudctl.errors import CloudctlError


class Config:
    """Where cloudctl signs in and as whom; equal when every field is (a plain class: `dataclasses` costs 8 ms)."""

    __slots__ = ("token", "url", "workspace")
    __hash__ = None  # mutable, compared by value

    def __init__(self, url: str = "", token: str = "", workspace: str = "") -> None:
        self.url = url
        self.token = token
        self.workspace = workspace

    def as_dict(self) -> dict[str, str]:
        return {"url": self.url, "token": self.token, "workspace": self.workspace}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"Config(url={self.url!r}, token={'***' if self.token else ''!r}, workspace={self.workspace!r})"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cloudctl"


def config_path() -> Path:
    return config_dir() / "config.json"


def load_file() -> Config:
    """The saved configuration, or an empty one if there is none."""
    path = config_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, ValueError) as exc:
        raise CloudctlError(f"Cannot read {path} ({exc}); run `cloudctl login` to write it again.") from None
    if not isinstance(raw, dict):
        raise CloudctlError(f"{path} is not a JSON object; run `cloudctl login` to write it again.")
    return Config(**{k: str(raw.get(k) or "") for k in ("url", "token", "workspace")})


def load() -> Config:
    """The saved configuration with the environment's overrides applied."""
    config = load_file()
    for field, var in (("url", "CLOUDCTL_URL"), ("token", "CLOUDCTL_TOKEN"), ("workspace", "CLOUDCTL_WORKSPACE")):
        value = os.environ.get(var)
        if value:
            setattr(config, field, value)
    config.url = config.url.rstrip("/")
    return config


def save(config: Config) -> Path:
    """Write the file readable by its owner only (0600, directory 0700), atomically."""
    directory = config_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    path = config_path()
    tmp = path.with_name(f".config.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config.as_dict(), f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
