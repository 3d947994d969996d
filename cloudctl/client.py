"""A small client of the public REST API; every failure becomes a `CloudctlError`."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from cloudctl import transport
from cloudctl.config import Config
from cloudctl.errors import CloudctlError, api_error

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `cloudctl sync` pays for every import
if TYPE_CHECKING:
    from typing import Any

TIMEOUT_S = 30


class Client:
    def __init__(self, url: str, token: str, workspace: str = "") -> None:
        if not url or not token:
            raise CloudctlError("Not logged in; run `cloudctl login --url URL --token TOKEN` "
                                "(or set CLOUDCTL_URL and CLOUDCTL_TOKEN).")
        self.url = url.rstrip("/")
        parsed = urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CloudctlError(f"{url} is not a valid control-plane URL; give one like http://127.0.0.1:8000.")
        self.workspace = workspace
        self.session = transport.new_session({"Authorization": f"Bearer {token}", "Accept": "application/json"})

    @classmethod
    def from_config(cls, config: Config) -> Client:
        return cls(config.url, config.token, config.workspace)

    def request(self, method: str, path: str, *, not_found: str | None = None, **kwargs: Any) -> Any:
        url = path if path.startswith(("http://", "https://")) else f"{self.url}/api/v1/{path.lstrip('/')}"
        response = self._send(method, url, **kwargs)
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

    def _send(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            return self.session.request(method, url, timeout=TIMEOUT_S, **kwargs)
        except transport.InvalidURL:
            raise CloudctlError(f"{self.url} is not a valid control-plane URL.") from None
        except transport.Timeout:
            raise CloudctlError(f"The control plane at {self.url} did not answer within {TIMEOUT_S} seconds.") from None
        except transport.TransportError:
            raise CloudctlError(f"Cannot reach the control plane at {self.url}; is it running?") from None

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

    # -- jobs ----------------------------------------------------------------------------------
    def _job_path(self, job_id: str = "") -> str:
        return f"workspaces/{self._ws()}/jobs/" + (f"{quote(job_id, safe='')}/" if job_id else "")

    def _job_not_found(self, job_id: str) -> str:
        return f"Job {job_id} does not exist in workspace '{self.workspace}'"

    def job_submit(self, cluster: str, body: dict) -> dict:
        return self.request("POST", self._cluster_path(cluster) + "jobs/", json=body,
                            not_found=self._not_found(cluster))

    def jobs(self, cluster: str | None = None, limit: int = 500) -> list[dict]:
        params = {"page_size": limit, **({"cluster": cluster} if cluster else {})}
        page = self.request("GET", self._job_path(), params=params,
                            not_found=f"Workspace '{self.workspace}' does not exist or you are not a member of it")
        return list(page.get("results", [])) if isinstance(page, dict) else list(page or [])

    def job_get(self, job_id: str) -> dict:
        return self.request("GET", self._job_path(job_id), not_found=self._job_not_found(job_id))

    def job_logs(self, job_id: str, offset: int) -> dict:
        return self.request("GET", self._job_path(job_id) + "logs", params={"offset": offset},
                            not_found=self._job_not_found(job_id))

    def job_stop(self, job_id: str) -> dict:
        return self.request("POST", self._job_path(job_id) + "stop", not_found=self._job_not_found(job_id))

    # -- project sync --------------------------------------------------------------------------
    def _blobs_path(self) -> str:
        return f"workspaces/{self._ws()}/blobs/"

    def _ws_not_found(self) -> str:
        return f"Workspace '{self.workspace}' does not exist or you are not a member of it"

    def _sync_request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Like `request`, but a 400 comes back as (400, body): sync reacts to the error's code and fields."""
        response = self._send(method, f"{self.url}/api/v1/{path.lstrip('/')}", **kwargs)
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        if response.status_code >= 400 and response.status_code != 400:
            raise api_error(response.status_code, body, not_found=self._ws_not_found(),
                            retry_after=response.headers.get("Retry-After"))
        if body is None:
            raise CloudctlError(f"{self.url} answered something that is not the Cumulus API (no JSON); check the URL.")
        return response.status_code, body

    @staticmethod
    def _error_code(body: Any) -> str:
        error = body.get("error") if isinstance(body, dict) else None
        return str(error.get("code") or "") if isinstance(error, dict) else ""

    def blobs_missing(self, hashes: list[str]) -> list[str]:
        """Those of `hashes` (at most 10,000) that the workspace does not hold yet."""
        return self.request("POST", self._blobs_path() + "missing", json={"sha256": hashes},
                            not_found=self._ws_not_found())["missing"]

    def blob_upload(self, sha256: str, body: Any) -> dict | None:
        """PUT one blob. `body` is streamed: an open file, or an iterable of chunks with a `len()`.

        Returns None when the server found that the bytes do not hash to `sha256` (the file
        changed after it was hashed), so that the caller hashes it again.
        """
        status, answer = self._sync_request("PUT", self._blobs_path() + sha256, data=body,
                                            headers={"Content-Type": "application/octet-stream"})
        if status == 400:
            if self._error_code(answer) == "hash_mismatch":
                return None
            raise api_error(status, answer)
        return answer

    def blobs_upload_batch(self, body: Any) -> dict:
        """POST a bundle of blobs (`blobs/batch`: per blob 64 hex digits of SHA-256, the size as 16 hex digits,
        the bytes), streamed like `blob_upload`. The answer's `mismatched` lists blobs whose bytes did not match."""
        status, answer = self._sync_request("POST", self._blobs_path() + "batch", data=body,
                                            headers={"Content-Type": "application/octet-stream"})
        if status == 400:
            raise api_error(status, answer)
        return answer

    def snapshot_create(self, files: list[dict], blobs: dict[str, str] | None = None) -> dict:
        """Record a manifest of {path, sha256, size, mode}; MissingBlobs if the workspace lacks some of its blobs.

        `blobs` ({sha256: base64 bytes}, small ones) are stored in the same request; BlobsChanged names those
        whose bytes do not hash to their key. If the workspace already has a snapshot of exactly this
        manifest, the answer is that one.
        """
        return self._snapshot({"files": files}, blobs)

    def snapshot_create_from(self, base: str, changes: list[dict], removed: list[str], digest: str | None = None,
                             blobs: dict[str, str] | None = None) -> dict:
        """Record the manifest of snapshot `base` with `changes` ({path, sha256, size, mode}: new or changed files)
        and without `removed` (paths), which must come out as `digest` if given. `blobs`, MissingBlobs and
        BlobsChanged as for `snapshot_create`; BaseRefused if the server will not make it from `base` (gone, not
        this workspace's, or not holding what the caller thinks it does)."""
        body: dict = {"base": base, "changes": changes, "removed": removed}
        if digest is not None:
            body["digest"] = digest
        return self._snapshot(body, blobs)

    def _snapshot(self, body: dict, blobs: dict[str, str] | None) -> dict:
        if blobs:
            body["blobs"] = blobs
        status, answer = self._sync_request("POST", f"workspaces/{self._ws()}/snapshots/", json=body)
        if status == 400:
            error = answer.get("error") if isinstance(answer, dict) else None
            fields = error.get("fields") if isinstance(error, dict) else None
            changed = fields.get("blobs") if isinstance(fields, dict) else None
            if blobs and isinstance(changed, dict) and changed.keys() <= blobs.keys():
                raise BlobsChanged(sorted(changed))
            missing = fields.get("missing") if isinstance(fields, dict) else None
            if isinstance(missing, list) and missing:
                raise MissingBlobs([str(h) for h in missing])
            if "base" in body and isinstance(fields, dict) and fields.keys() & {"base", "removed", "digest"}:
                raise BaseRefused(api_error(status, answer).message)
            raise api_error(status, answer)
        return answer


class MissingBlobs(CloudctlError):
    """A manifest names blobs the workspace does not hold (never uploaded, or lost since): upload them, try again."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"The control plane lacks {len(missing)} of the snapshot's blobs.")
        self.missing = missing


class BlobsChanged(CloudctlError):
    """Bytes sent with a snapshot did not hash to their SHA-256 (the files changed since): hash them again."""

    def __init__(self, hashes: list[str]) -> None:
        super().__init__(f"{len(hashes)} files changed while the project was being synced.")
        self.hashes = hashes


class BaseRefused(CloudctlError):
    """The server would not make a snapshot from the given base (e.g. it is gone): send the whole manifest."""
