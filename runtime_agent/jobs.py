"""Jobs on the head: stage a snapshot, run it through Ray's job API, report status and logs.

The control plane lists the cluster's unfinished jobs in every heartbeat reply of the head
(`run_job` commands); `JobManager.reconcile` starts one `JobRunner` thread per job it does not
run yet and passes stop requests on. A runner:

1. fetches the snapshot's manifest and the blobs this node does not have yet into a
   content-addressed cache, verifying each SHA-256 (a re-run of a changed project downloads
   only what changed);
2. writes the working directory as one zip archive (modes kept, a single top-level folder),
   which `ArchiveServer` serves over HTTP from this node under an unguessable path;
3. submits the entrypoint to Ray's job REST API on this head with that archive's URL as the
   `working_dir`. Ray's own upload of a local `working_dir` is capped at 100 MiB; a remote URI
   is fetched by each node itself, so projects of any size run, and remote tasks on worker
   nodes import the project's modules from the same archive;
4. follows the job: Ray's status (the authority on completion) every `POLL_S`, and the driver's
   log file on this node sent as byte-offset chunks that the control plane appends.

Nothing here imports Ray: the job API is plain HTTP on the head's dashboard.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import logging
import os
import secrets
import shutil
import socketserver
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from runtime_agent.client import AgentClient, ClientError, NotFound, ProtocolError, Unreachable

logger = logging.getLogger(__name__)

POLL_S = 0.5  # Ray status and log check
LOG_CHUNK = 512 * 1024  # bytes per report
DOWNLOAD_WORKERS = 8
REPORT_RETRY_S = 1.0
PREAMBLE_SCAN = 64 * 1024  # Ray's own lines at the top of a driver log are well within this
ARCHIVES_KEPT = 8  # working-directory archives kept on the head, newest first
# The head's blob cache is trimmed, least recently used first, to this size after each staging.
BLOB_CACHE_BYTES = int(os.environ.get("CUMULUS_AGENT_BLOB_CACHE_BYTES", str(10 * 1024**3)))
SMALL_FILE = 1024 * 1024  # files below this are deflated in the archive; larger ones are stored
TOP_DIR = "project"  # the archive's single top-level folder: Ray strips it, whatever the project holds
RAY_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STATUS_MAP = {"PENDING": "PENDING", "RUNNING": "RUNNING", "SUCCEEDED": "SUCCEEDED", "FAILED": "FAILED",
              "STOPPED": "STOPPED"}


class JobError(Exception):
    """The job cannot run; the message is shown to the user as the job's message."""


def submission_id(job_id: str) -> str:
    return f"cumulus-{job_id}"


# --- staging --------------------------------------------------------------------------------


class BlobCache:
    """Verified blobs by SHA-256, shared by every job of this node."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def path(self, sha256: str) -> str:
        return os.path.join(self.root, sha256[:2], sha256)

    def has(self, sha256: str) -> bool:
        return os.path.isfile(self.path(sha256))

    def prune(self, max_bytes: int, keep: set[str]) -> int:
        """Drop the least recently used blobs until the cache holds at most `max_bytes`, never one of `keep`
        (the job being staged). Returns the bytes freed."""
        entries = []
        for folder in os.scandir(self.root):
            if folder.is_dir():
                entries.extend(e for e in os.scandir(folder.path) if e.is_file() and not e.name.startswith("."))
        stats = [(e, e.stat()) for e in entries]
        total = sum(st.st_size for _, st in stats)
        freed = 0
        for entry, st in sorted(stats, key=lambda pair: pair[1].st_mtime):
            if total - freed <= max_bytes:
                break
            if entry.name in keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                freed += st.st_size
        return freed

    def touch(self, sha256: str) -> None:
        """Mark a blob as just used (the cache's LRU order is its files' modification times)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(sha256))

    def fetch(self, sha256: str, download: Callable[[Any], int]) -> int:
        """Download into a temporary file, verify, then move into place. Returns the size."""
        final = self.path(sha256)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=os.path.dirname(final), prefix=".fetch-")
        try:
            with os.fdopen(fd, "wb") as out:
                hashing = _HashingWriter(out)
                size = download(hashing)
            digest = hashing.hash.hexdigest()
            if digest != sha256:
                raise JobError(f"blob {sha256} arrived with SHA-256 {digest}; refusing it")
            os.replace(temp, final)
            return size
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


class _HashingWriter:
    def __init__(self, out: Any) -> None:
        self.out = out
        self.hash = hashlib.sha256()

    def write(self, chunk: bytes) -> int:
        self.hash.update(chunk)
        return self.out.write(chunk)


def build_archive(files: list[list], cache: BlobCache, dest: str) -> int:
    """Write the project as a zip under `TOP_DIR/`, with each file's mode. Returns the archive's size."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".archive-", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(temp, "w", allowZip64=True) as archive:
            for path, sha256, size, mode in files:
                info = zipfile.ZipInfo(f"{TOP_DIR}/{path}", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (0o100000 | (int(mode) & 0o777)) << 16
                info.create_system = 3  # Unix, so that the mode above is read back
                small = int(size) < SMALL_FILE
                info.compress_type = zipfile.ZIP_DEFLATED if small else zipfile.ZIP_STORED
                with open(cache.path(sha256), "rb") as src, archive.open(info, "w", force_zip64=not small) as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
        os.replace(temp, dest)
        return os.path.getsize(dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def prune_archives(folder: str, keep: int) -> None:
    """Keep the `keep` newest archives (a re-run of an unchanged project reuses its snapshot's archive)."""
    try:
        done = (e for e in os.scandir(folder)  # ".archive-…" ones are still being written
                if e.name.endswith(".zip") and not e.name.startswith(".") and e.is_file())
        entries = sorted(done, key=lambda e: e.stat().st_mtime, reverse=True)
    except FileNotFoundError:
        return
    for entry in entries[keep:]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)


class ArchiveServer:
    """Serves the archives folder over HTTP at http://<address>:<port>/<secret>/<name>. Started on first use."""

    def __init__(self, root: str, address: str) -> None:
        self.root = root
        self.address = address
        self.secret = secrets.token_urlsafe(24)
        self._server: socketserver.ThreadingTCPServer | None = None
        self._lock = threading.Lock()

    def url_for(self, name: str) -> str:
        with self._lock:
            if self._server is None:
                self._server = self._start()
            port = self._server.server_address[1]
        return f"http://{self.address}:{port}/{self.secret}/{urllib.parse.quote(name)}"

    def _start(self) -> socketserver.ThreadingTCPServer:
        root, secret = self.root, self.secret

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=root, **kwargs)

            def translate_path(self, path: str) -> str:
                parts = urllib.parse.urlsplit(path).path.split("/")
                if len(parts) != 3 or not secrets.compare_digest(parts[1], secret) or not parts[2]:
                    return os.path.join(root, ".refused", "missing")  # a path that does not exist: 404
                return os.path.join(root, os.path.basename(urllib.parse.unquote(parts[2])))

            def list_directory(self, path: str) -> None:  # type: ignore[override]
                self.send_error(404)
                return None

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("archive_server " + format, *args)

        server = http.server.ThreadingHTTPServer((self.address, 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="archive-server", daemon=True).start()
        logger.info("agent.jobs.archive_server port=%s", server.server_address[1])
        return server

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None


# --- Ray's job API ------------------------------------------------------------------------------


class RayJobs:
    """The subset of Ray's job REST API (the dashboard's /api/jobs/) that we use."""

    def __init__(self, dashboard_url: str, timeout_s: float = 30.0) -> None:
        self.base = dashboard_url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - the dashboard URL is ours (http)
            self.base + path, data=data, method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise Unreachable(f"Ray's job API at {self.base}: {getattr(exc, 'reason', exc)}") from exc
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, sid: str) -> dict | None:
        status, body = self._call("GET", f"/api/jobs/{urllib.parse.quote(sid)}")
        if status == 404:
            return None
        if status >= 400 or not isinstance(body, dict):
            raise Unreachable(f"Ray's job API answered {status}: {str(body)[:300]}")
        return body

    def submit(self, sid: str, entrypoint: str, runtime_env: dict, metadata: dict) -> None:
        status, body = self._call("POST", "/api/jobs/", {
            "entrypoint": entrypoint, "submission_id": sid, "runtime_env": runtime_env, "metadata": metadata,
        })
        if status >= 400:
            raise JobError(f"Ray refused the job ({status}): {str(body)[:1000]}")

    def stop(self, sid: str) -> None:
        self._call("POST", f"/api/jobs/{urllib.parse.quote(sid)}/stop")

    def logs(self, sid: str) -> str:
        status, body = self._call("GET", f"/api/jobs/{urllib.parse.quote(sid)}/logs")
        return str(body.get("logs", "")) if status == 200 and isinstance(body, dict) else ""


# --- one job ---------------------------------------------------------------------------------------


@dataclass
class NodeContext:
    """What a runner needs of its agent."""

    client: AgentClient
    node_id: str
    node_token: str
    address: str
    ray_temp_dir: str
    dashboard_url: Callable[[], str | None]
    cache: BlobCache
    archives: str
    server: ArchiveServer


@dataclass
class JobRunner:
    ctx: NodeContext
    command: dict
    stop_requested: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    log_offset: int = 0
    # Bytes at the head of Ray's driver log that are Ray's, not the program's (see _preamble_end).
    log_skip: int | None = None
    _stopped_in_ray: bool = False

    @property
    def job_id(self) -> str:
        return str(self.command["id"])

    @property
    def sid(self) -> str:
        return submission_id(self.job_id)

    def start(self) -> None:
        self.log_offset = int(self.command.get("log_offset") or 0)
        if self.command.get("stop"):
            self.stop_requested.set()
        threading.Thread(target=self._run, name=f"job-{self.job_id[:8]}", daemon=True).start()

    # Reports: each one is retried until the control plane has it (or the job is no longer ours).
    def report(self, *, status: str | None = None, message: str | None = None, exit_code: int | None = None,
               log: bytes | None = None, final: bool = False) -> dict | None:
        body: dict[str, Any] = {"status": status, "message": message, "exit_code": exit_code,
                                "ray_submission_id": self.sid}
        if log is not None:
            body["log_offset"] = self.log_offset
            body["log_data"] = base64.b64encode(log).decode()
        while True:
            try:
                reply = self.ctx.client.job_report(self.ctx.node_id, self.ctx.node_token, self.job_id, body)
            except NotFound:
                logger.warning("agent.job.gone job=%s", self.job_id)
                self.stop_requested.set()
                return None
            except ProtocolError as exc:  # refused as malformed: resending the same body cannot help
                logger.error("agent.job.report_refused job=%s error=%s", self.job_id, exc)
                return None
            except ClientError as exc:
                if not final and status is None and log is None:
                    return None  # a progress note may be dropped
                logger.warning("agent.job.report_retry job=%s error=%s", self.job_id, exc)
                time.sleep(REPORT_RETRY_S)
                continue
            if isinstance(reply.get("log_offset"), int):
                self.log_offset = reply["log_offset"]
            if reply.get("stop"):
                self.stop_requested.set()
            return reply

    def _run(self) -> None:
        try:
            self._run_job()
        except JobError as exc:
            logger.warning("agent.job.failed job=%s error=%s", self.job_id, exc)
            self.report(status="FAILED", message=str(exc), final=True)
        except Exception as exc:  # a runner must always end its job, whatever went wrong
            logger.exception("agent.job.crashed job=%s", self.job_id)
            self.report(status="FAILED", message=f"the head's agent could not run the job: {exc!r}", final=True)
        finally:
            self.done.set()

    def _run_job(self) -> None:
        dashboard = self.ctx.dashboard_url()
        if not dashboard:
            raise JobError("the head has no Ray dashboard to submit jobs to")
        ray = RayJobs(dashboard)
        existing = ray.get(self.sid)
        if existing is None:
            if self.command.get("status") != "PENDING":
                raise JobError("the job was lost: Ray on the head no longer knows it (the head restarted)")
            if self.stop_requested.is_set():
                self.report(status="STOPPED", message="stopped before it started", final=True)
                return
            url = self._stage()
            if self.stop_requested.is_set():
                self.report(status="STOPPED", message="stopped before it started", final=True)
                return
            runtime_env: dict[str, Any] = {"working_dir": url}
            if self.command.get("env"):
                runtime_env["env_vars"] = dict(self.command["env"])
            if self.command.get("pip"):
                runtime_env["pip"] = list(self.command["pip"])
            ray.submit(self.sid, str(self.command["entrypoint"]), runtime_env, {"cumulus_job_id": self.job_id})
            self.report(status="PENDING", message="submitted to Ray; preparing the job's environment")
            logger.info("agent.job.submitted job=%s", self.job_id)
        self._follow(ray)

    def _stage(self) -> str:
        manifest = self.ctx.client.job_manifest(self.ctx.node_id, self.ctx.node_token, self.job_id)
        snapshot_id = str(manifest["snapshot_id"])
        files: list[list] = manifest["files"]
        name = f"{snapshot_id}.zip"
        archive = os.path.join(self.ctx.archives, name)
        if not os.path.isfile(archive):
            missing = list({sha: size for _, sha, size, _ in files if not self.ctx.cache.has(sha)}.items())
            total = sum(size for _, size in missing)
            self.report(message=f"fetching {len(missing)} of {len(files)} files ({_human(total)})")
            started = time.monotonic()

            def fetch(item: tuple[str, int]) -> None:
                sha, _ = item
                self.ctx.cache.fetch(sha, lambda out: self.ctx.client.download_blob(
                    self.ctx.node_id, self.ctx.node_token, sha, out))

            with ThreadPoolExecutor(DOWNLOAD_WORKERS) as pool:
                for _ in pool.map(fetch, missing):
                    if self.stop_requested.is_set():
                        break
            fetched_s = time.monotonic() - started
            size = build_archive(files, self.ctx.cache, archive)
            prune_archives(self.ctx.archives, keep=ARCHIVES_KEPT)
            wanted = {sha for _, sha, _, _ in files}
            for sha in wanted:
                self.ctx.cache.touch(sha)
            self.ctx.cache.prune(BLOB_CACHE_BYTES, keep=wanted)
            logger.info("agent.job.staged job=%s files=%s fetched=%s fetch_s=%.2f archive_bytes=%s total_s=%.2f",
                        self.job_id, len(files), len(missing), fetched_s, size, time.monotonic() - started)
        return self.ctx.server.url_for(name)

    def _log_path(self) -> str:
        return os.path.join(self.ctx.ray_temp_dir, "session_latest", "logs", f"job-driver-{self.sid}.log")

    def _preamble_end(self, fh: Any, final: bool) -> int | None:
        """Where the program's own output starts in Ray's driver log.

        Ray's job manager writes its own lines first ("Runtime env is setting up.", then
        "Running entrypoint for job <id>: <command>"); the user asked for their program's output,
        as on their laptop. None while that line is not complete yet (unless the job is over).
        """
        head = fh.read(PREAMBLE_SCAN)
        marker = f"Running entrypoint for job {self.sid}: ".encode()
        at = head.find(marker)
        if at >= 0:
            end = head.find(b"\n", at)
            if end >= 0:
                return end + 1
        return 0 if final or len(head) >= PREAMBLE_SCAN or self.log_offset > 0 else None

    def _read_log(self, final: bool = False) -> bytes:
        """The driver log from `log_offset` (the control plane's end), at most one chunk."""
        try:
            with open(self._log_path(), "rb") as fh:
                if self.log_skip is None:
                    self.log_skip = self._preamble_end(fh, final)
                    if self.log_skip is None:
                        return b""
                fh.seek(self.log_skip + self.log_offset)
                return fh.read(LOG_CHUNK)
        except FileNotFoundError:
            return b""

    def _send_logs(self, until_eof: bool) -> None:
        while True:
            data = self._read_log(final=until_eof)
            if not data:
                return
            before = self.log_offset
            if self.report(log=data) is None or (self.log_offset == before):
                return
            if not until_eof and len(data) < LOG_CHUNK:
                return

    def _follow(self, ray: RayJobs) -> None:
        last_status, last_message = None, None
        while True:
            if self.stop_requested.is_set() and not self._stopped_in_ray:
                self._stopped_in_ray = True
                logger.info("agent.job.stop job=%s", self.job_id)
                with contextlib.suppress(Unreachable):
                    ray.stop(self.sid)
            try:
                info = ray.get(self.sid)
            except Unreachable as exc:
                logger.warning("agent.job.ray_unreachable job=%s error=%s", self.job_id, exc)
                time.sleep(POLL_S)
                continue
            if info is None:
                raise JobError("Ray on the head no longer knows this job")
            ray_status = str(info.get("status", "PENDING"))
            status = STATUS_MAP.get(ray_status, "PENDING")
            if status in RAY_TERMINAL:
                self._send_logs(until_eof=True)  # the driver has exited: its log is complete
                exit_code = info.get("driver_exit_code")
                message = str(info.get("message") or "")
                if status == "FAILED" and not os.path.exists(self._log_path()):
                    # It never started (e.g. pip failed): Ray's message is all there is; make it the log.
                    self.report(log=(message + "\n").encode())
                self.report(status=status, message=message,
                            exit_code=exit_code if isinstance(exit_code, int) else None, final=True)
                logger.info("agent.job.finished job=%s status=%s exit_code=%s", self.job_id, status, exit_code)
                return
            self._send_logs(until_eof=False)
            if (status, info.get("message")) != (last_status, last_message):
                last_status, last_message = status, info.get("message")
                self.report(status=status, message=str(info.get("message") or ""))
            self.stop_requested.wait(POLL_S)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


class JobManager:
    """The head's jobs: one runner per job the control plane lists; level-triggered by each heartbeat."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.runners: dict[str, JobRunner] = {}
        # Jobs this agent saw through to the end: a heartbeat reply computed before our final report
        # arrived may list them once more; they are not run again.
        self.finished: set[str] = set()

    def reconcile(self, commands: list[dict]) -> None:
        for command in commands:
            if not isinstance(command, dict) or not command.get("id"):
                continue
            job_id = str(command["id"])
            runner = self.runners.get(job_id)
            if runner is None and job_id in self.finished:
                continue
            if runner is None:
                runner = JobRunner(self.ctx, command)
                self.runners[job_id] = runner
                logger.info("agent.job.start job=%s", job_id)
                runner.start()
            elif command.get("stop"):
                runner.stop_requested.set()
        for job_id in [j for j, r in self.runners.items() if r.done.is_set()]:
            del self.runners[job_id]
            self.finished.add(job_id)

    def close(self) -> None:
        self.ctx.server.close()
