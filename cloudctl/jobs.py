"""Running the project on its cluster: submit a job, follow its log, end with its exit status.

`follow` polls `GET jobs/{id}/logs?offset=N` and writes each new piece to stdout as it comes;
the job's status, not the log, says when it is over (the log endpoint's `complete` flag means:
finished, and every byte the head sent is read).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloudctl import output
from cloudctl.client import Client
from cloudctl.errors import CloudctlError

POLL_S = 0.25  # between log reads while the job runs
UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
PREFIX = re.compile(r"^[0-9a-fA-F-]{4,36}$")
EXIT_STOPPED = 130
ENV_ITEM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)


def resolve_job_id(api: Client, ref: str) -> str:
    """A full job id, or a unique prefix of one of the workspace's recent jobs (as shown in events: 8 hex)."""
    if UUID.match(ref):
        return ref.lower()
    if not PREFIX.match(ref):
        raise CloudctlError(f"{ref!r} is not a job id; `cloudctl jobs list` shows them.")
    matches = [j["id"] for j in api.jobs() if j["id"].startswith(ref.lower())]
    if not matches:
        raise CloudctlError(f"No job in workspace '{api.workspace}' has an id starting with {ref}.")
    if len(matches) > 1:
        raise CloudctlError(f"{ref} is the start of {len(matches)} job ids; give more of it.")
    return matches[0]


def parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        match = ENV_ITEM.match(item)
        if not match:
            raise CloudctlError(f"--env {item!r} is not NAME=VALUE (a name is letters, digits and _).")
        env[match.group(1)] = match.group(2)
    return env


def exit_code_of(job: dict) -> int:
    """The job's own exit status: 0 when it succeeded, its code when it failed, 130 when stopped."""
    if job["status"] == "SUCCEEDED":
        return 0
    if job["status"] == "STOPPED":
        return EXIT_STOPPED
    code = job.get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


@dataclass
class Follow:
    """Where a log reader is: the next byte offset and the job's last known status."""

    job_id: str
    offset: int = 0
    status: str = "PENDING"


def read_new(api: Client, state: Follow, write) -> bool:
    """Write what the log has past `state.offset`; True once the job is over and its log fully read."""
    while True:
        piece = api.job_logs(state.job_id, state.offset)
        if piece["data"]:
            write(piece["data"])
        state.offset = piece["next_offset"]
        state.status = piece["status"]
        if piece["complete"]:
            return True
        if state.offset >= piece["size"]:
            return False


def follow(api: Client, job_id: str, *, offset: int = 0, show_waiting: bool = True,
           write: Callable[[str], object] = sys.stdout.write) -> dict:
    """Stream the job's log through `write` until the job is over; returns the finished job. Ctrl-C propagates."""
    state = Follow(job_id, offset)
    sink = write

    def write(text: str) -> None:  # type: ignore[no-redef]
        sink(text)
        sys.stdout.flush()
        sys.stderr.flush()

    waiting = output.err.status("waiting for the job to start") if show_waiting and output.err.is_terminal else None
    try:
        if waiting:
            waiting.start()
        while True:
            before = state.offset
            done = read_new(api, state, write)
            if waiting and (state.offset > before or state.status != "PENDING"):
                waiting.stop()
                waiting = None
            elif waiting:
                job = api.job_get(job_id)
                waiting.update(f"job {job_id[:8]} {job['status']}: {job.get('message') or ''}"[:120])
            if done:
                return api.job_get(job_id)
            time.sleep(POLL_S)
    finally:
        if waiting:
            waiting.stop()


def ask_to_stop(api: Client, job_id: str) -> int:
    """After Ctrl-C: offer to stop the job (at a terminal); otherwise leave it running and say how to stop it."""
    if sys.stdin.isatty() and output.err.is_terminal:
        try:
            answer = output.err.input(f"\nStop job {job_id[:8]} on the cluster? [Y/n] ").strip().lower()
        except (KeyboardInterrupt, EOFError):
            answer = "n"
        if answer in ("", "y", "yes"):
            api.job_stop(job_id)
            output.err.print(f"Stop requested; `cloudctl logs {job_id[:8]}` shows how it ends.", markup=False)
            return EXIT_STOPPED
    output.err.print(f"\nJob {job_id} goes on; `cloudctl logs {job_id[:8]} -f` follows it, "
                     f"`cloudctl jobs stop {job_id[:8]}` stops it.", markup=False, soft_wrap=True)
    return EXIT_STOPPED


def jobs_table(jobs: list[dict]):
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "CLUSTER", "STATUS", "EXIT", "ENTRYPOINT", "AGE"):
        table.add_column(column)
    for j in jobs:
        code = j.get("exit_code")
        table.add_row(j["id"][:8], j.get("cluster", ""), output.status_text(j.get("status", "")),
                      "" if code is None else str(code), (j.get("entrypoint") or "")[:60],
                      output.age(j.get("created_at")))
    return table
