"""A small client of the public REST API; every failure becomes a `CloudctlError`."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlparse

import requests

from cloudctl.config import Config
from cloudctl.errors import CloudctlError, api_error

TIMEOUT_S = 30


class Client:
    def __init__(self, url: str, token: str, workspace: str = "") -> None:
        if not url or not token:
            raise CloudctlError("Not logged in; run `cloudctl login --url URL --token TOKEN` "
                                "(or set CLOUDCTL_URL and CLOUDCTL_TOKEN).")
        self.url = url.rstrip("/")
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CloudctlError(f"{url} is not a valid control-plane URL; give one like http://127.0.0.1:8000.")
        self.workspace = workspace
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["Accept"] = "application/json"

    @classmethod
    def from_config(cls, config: Config) -> Client:
        return cls(config.url, config.token, config.workspace)

    def request(self, method: str, path: str, *, not_found: str | None = None, **kwargs: Any) -> Any:
        url = path if path.startswith(("http://", "https://")) else f"{self.url}/api/v1/{path.lstrip('/')}"
        try:
            response = self.session.request(method, url, timeout=TIMEOUT_S, **kwargs)
        except requests.exceptions.InvalidURL:
            raise CloudctlError(f"{self.url} is not a valid control-plane URL.") from None
        except requests.exceptions.MissingSchema:
            raise CloudctlError(f"{self.url} is not a valid control-plane URL; it needs http:// or https://.") from None
        except requests.exceptions.Timeout:
            raise CloudctlError(f"The control plane at {self.url} did not answer within {TIMEOUT_S} seconds.") from None
        except requests.exceptions.RequestException:
            raise CloudctlError(f"Cannot reach the control plane at {self.url}; is it running?") from None
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        if response.status_code >= 400:
            raise api_error(response.status_code, body, not_found=not_found,
                            retry_after=response.headers.get("Retry-After"))
        if response.content and body is None:
            raise CloudctlError(f"{self.url} answered something that is not the Cumulus API (no JSON); "
                                "check the URL.")
        return body

    def paginated(self, path: str, params: dict | None = None, **kwargs: Any) -> list[dict]:
        page = self.request("GET", path, params={"page_size": 500, **(params or {})}, **kwargs)
        if isinstance(page, list):
            return page
        results = list(page.get("results", []))
        while page.get("next"):
            page = self.request("GET", page["next"])
            results.extend(page.get("results", []))
        return results

    # -- workspaces ----------------------------------------------------------------------------
    def workspaces(self) -> list[dict]:
        return self.paginated("workspaces/")

    def workspace_get(self, slug: str) -> dict:
        return self.request("GET", f"workspaces/{quote(slug, safe='')}/",
                            not_found=f"Workspace '{slug}' does not exist or you are not a member of it")

    # -- clusters ------------------------------------------------------------------------------
    def _ws(self) -> str:
        if not self.workspace:
            raise CloudctlError("No workspace selected; run `cloudctl workspace use WS` "
                                "(see `cloudctl workspace list`).")
        return quote(self.workspace, safe="")

    def _cluster_path(self, name: str = "") -> str:
        return f"workspaces/{self._ws()}/clusters/" + (f"{quote(name, safe='')}/" if name else "")

    def _not_found(self, name: str) -> str:
        return f"Cluster '{name}' does not exist in workspace '{self.workspace}'"

    def clusters(self, all: bool = False) -> list[dict]:
        return self.paginated(self._cluster_path(), params={"all": "true"} if all else None,
                              not_found=f"Workspace '{self.workspace}' does not exist or you are not a member of it")

    def cluster_get(self, name: str) -> dict:
        return self.request("GET", self._cluster_path(name), not_found=self._not_found(name))

    def cluster_create(self, spec: dict) -> dict:
        return self.request("POST", self._cluster_path(), json=spec,
                            not_found=f"Workspace '{self.workspace}' does not exist or you are not a member of it")

    def cluster_delete(self, name: str) -> dict:
        return self.request("DELETE", self._cluster_path(name), not_found=self._not_found(name))

    def cluster_start(self, name: str) -> dict:
        return self.request("POST", self._cluster_path(name) + "start", not_found=self._not_found(name))

    def cluster_stop(self, name: str) -> dict:
        return self.request("POST", self._cluster_path(name) + "stop", not_found=self._not_found(name))
