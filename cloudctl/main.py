"""The `cloudctl` command line."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cloudctl import config as config_mod
from cloudctl import output
from cloudctl.client import Client
from cloudctl.errors import INTERRUPTED, CloudctlError
from cloudctl.project import Project, load_project, read_yaml

app = typer.Typer(help="Command-line client of a Cumulus control plane.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
workspace_app = typer.Typer(help="Choose and list workspaces.", no_args_is_help=True)
clusters_app = typer.Typer(help="List, inspect, create and delete clusters.", no_args_is_help=True)
app.add_typer(workspace_app, name="workspace")
app.add_typer(clusters_app, name="clusters")

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of human output.")]
ProjectFileOpt = Annotated[
    Path | None, typer.Option("-f", "--file", help="Project file (default: the nearest cloud.yaml).")
]

LIVE_END = {"RUNNING"}
WAIT_TIMEOUT_S = 900.0


def fail_cleanly(func: F) -> F:
    """Every failure is one clear sentence on stderr and exit 1; Ctrl-C exits 130 with one line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CloudctlError as exc:
            for line in exc.lines():
                output.err.print(line, markup=False, soft_wrap=True)
            raise typer.Exit(exc.code) from None
        except KeyboardInterrupt:
            output.err.print(INTERRUPTED, markup=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def client() -> Client:
    return Client.from_config(config_mod.load())


# -- login and workspaces ---------------------------------------------------------------------------


@app.command()
@fail_cleanly
def login(
    url: Annotated[str, typer.Option(help="Control-plane URL, e.g. http://127.0.0.1:8000.", envvar="CLOUDCTL_URL")],
    token: Annotated[str, typer.Option(help="API token (`make run` prints one).", envvar="CLOUDCTL_TOKEN")],
    json_out: JsonOpt = False,
) -> None:
    """Check a token against the control plane and save it."""
    url = url.rstrip("/")
    workspaces = Client(url, token).workspaces()
    saved = config_mod.load_file()
    workspace = saved.workspace if saved.url == url and saved.workspace in {w["slug"] for w in workspaces} else ""
    if len(workspaces) == 1:
        workspace = workspaces[0]["slug"]
    path = config_mod.save(config_mod.Config(url=url, token=token, workspace=workspace))
    if json_out:
        output.print_json({"url": url, "workspace": workspace or None, "config": str(path),
                           "workspaces": workspaces})
        return
    output.out.print(f"Logged in to {url}; saved to {path}.", markup=False)
    if workspace:
        output.out.print(f"Workspace: {workspace}", markup=False)
    elif workspaces:
        output.out.print(f"You belong to {len(workspaces)} workspaces; choose one with `cloudctl workspace use WS` "
                         f"({', '.join(w['slug'] for w in workspaces)}).", markup=False)
    else:
        output.out.print("You belong to no workspace yet.", markup=False)


@workspace_app.command("use")
@fail_cleanly
def workspace_use(ws: Annotated[str, typer.Argument(help="Workspace slug.")], json_out: JsonOpt = False) -> None:
    """Make WS the workspace later commands act in."""
    config = config_mod.load()
    workspace = Client.from_config(config).workspace_get(ws)
    saved = config_mod.load_file()
    saved.workspace = workspace["slug"]
    if not saved.url or not saved.token:  # signed in through the environment only
        saved.url, saved.token = config.url, config.token
    config_mod.save(saved)
    if json_out:
        output.print_json(workspace)
    else:
        output.out.print(f"Using workspace {workspace['slug']} ({workspace.get('role', '')}).", markup=False)


@workspace_app.command("list")
@fail_cleanly
def workspace_list(json_out: JsonOpt = False) -> None:
    """List the workspaces you belong to."""
    config = config_mod.load()
    workspaces = Client.from_config(config).workspaces()
    if json_out:
        output.print_json(workspaces)
    else:
        output.out.print(output.workspaces_table(workspaces, config.workspace))


# -- clusters ---------------------------------------------------------------------------------------


@clusters_app.command("list")
@fail_cleanly
def clusters_list(
    all: Annotated[bool, typer.Option("--all", "-a", help="Include terminated clusters.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List the workspace's clusters."""
    clusters = client().clusters(all=all)
    if json_out:
        output.print_json(clusters)
    elif not clusters:
        output.out.print("No clusters; create one with `cloudctl up` or `cloudctl clusters create -f spec.yaml`.")
    else:
        output.out.print(output.clusters_table(clusters))


@clusters_app.command("get")
@fail_cleanly
def clusters_get(name: str, json_out: JsonOpt = False) -> None:
    """Show one cluster."""
    cluster = client().cluster_get(name)
    if json_out:
        output.print_json(cluster)
    else:
        output.out.print(output.cluster_detail(cluster))


@clusters_app.command("create")
@fail_cleanly
def clusters_create(
    file: Annotated[Path, typer.Option("-f", "--file", help="Cluster spec, YAML or JSON.")],
    json_out: JsonOpt = False,
) -> None:
    """Create a cluster from a spec file."""
    spec = read_yaml(file, "spec file")
    if not isinstance(spec, dict):
        raise CloudctlError(f"{file} must hold a cluster spec (a mapping with name, provider, head, ...).")
    cluster = client().cluster_create(spec)
    if json_out:
        output.print_json(cluster)
    else:
        output.out.print(f"Cluster {cluster['name']} created ({cluster['status']}).", markup=False)


@clusters_app.command("delete")
@fail_cleanly
def clusters_delete(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Terminate a cluster and all its nodes."""
    confirm_terminate(name, yes)
    cluster = client().cluster_delete(name)
    if json_out:
        output.print_json(cluster)
    else:
        output.out.print(f"Cluster {name} is terminating ({cluster['status']}).", markup=False)


def confirm_terminate(name: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise CloudctlError(f"Refusing to terminate cluster '{name}' without confirmation; pass --yes.")
    if not typer.confirm(f"Terminate cluster '{name}' and all its nodes?", default=False):
        raise CloudctlError("Nothing terminated.")


# -- the project's cluster --------------------------------------------------------------------------


def _get_or_none(api: Client, name: str) -> dict | None:
    try:
        return api.cluster_get(name)
    except CloudctlError as exc:
        if "does not exist" in exc.message:
            return None
        raise


def wait_for(api: Client, name: str, targets: set[str], *, show: bool, timeout: float = WAIT_TIMEOUT_S) -> dict:
    """Poll the cluster until its status is in `targets`; FAILED (unless targeted) is an error."""
    started = time.monotonic()
    deadline = started + timeout
    cluster = api.cluster_get(name)

    def line(c: dict) -> str:
        elapsed = int(time.monotonic() - started)
        return (f"{name}: {output.status_text(c['status'])}  nodes {output.nodes_summary(c.get('nodes'))}"
                f"  [dim]{elapsed}s[/dim]")

    status_ctx = output.err.status(line(cluster)) if show else None
    try:
        if status_ctx:
            status_ctx.start()
        while True:
            if cluster["status"] in targets:
                return cluster
            if cluster["status"] == "FAILED":
                reason = cluster.get("status_message") or "no reason given"
                raise CloudctlError(f"Cluster {name} FAILED: {reason.rstrip('.')}.")
            if cluster["status"] in ("TERMINATED", "STOPPED") and cluster["status"] not in targets:
                raise CloudctlError(f"Cluster {name} became {cluster['status']} while waiting for "
                                    f"{' or '.join(sorted(targets))}.")
            if time.monotonic() > deadline:
                raise CloudctlError(f"Cluster {name} is still {cluster['status']} after {int(timeout)} seconds; "
                                    f"`cloudctl status` shows how it goes on.")
            time.sleep(1.0)
            cluster = api.cluster_get(name)
            if status_ctx:
                status_ctx.update(line(cluster))
    finally:
        if status_ctx:
            status_ctx.stop()


@app.command()
@fail_cleanly
def up(
    file: ProjectFileOpt = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once the cluster is requested.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for RUNNING.")] = WAIT_TIMEOUT_S,
    json_out: JsonOpt = False,
) -> None:
    """Create or start the project's cluster (cloud.yaml) and wait until it is RUNNING."""
    project: Project = load_project(file)  # type: ignore[assignment]
    api = client()
    name = project.cluster_name
    show = not json_out and not no_wait
    cluster = _get_or_none(api, name)
    if cluster and cluster["status"] == "STOPPING":
        cluster = wait_for(api, name, {"STOPPED"}, show=show, timeout=timeout)
    if cluster and cluster["status"] == "TERMINATING":
        raise CloudctlError(f"Cluster {name} is still terminating; run `cloudctl up` again once it is TERMINATED.")
    if cluster is None or cluster["status"] == "TERMINATED":
        cluster = api.cluster_create(project.cluster)
        action = "created"
    elif cluster["status"] in ("STOPPED", "FAILED"):
        cluster = api.cluster_start(name)
        action = "starting"
    else:
        action = "exists"
    if not json_out:
        output.err.print(f"Cluster {name} {action} ({cluster['status']}).", markup=False)
    if not no_wait:
        cluster = wait_for(api, name, LIVE_END, show=show, timeout=timeout)
    if json_out:
        output.print_json(cluster)
    elif not no_wait:
        output.out.print(output.cluster_detail(cluster))


@app.command()
@fail_cleanly
def down(
    file: ProjectFileOpt = None,
    terminate: Annotated[
        bool, typer.Option("--terminate", help="Terminate (delete) the cluster instead of stopping it.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before terminating.")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once the request is accepted.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Stop the project's cluster (its spec is kept); --terminate deletes it."""
    project: Project = load_project(file)  # type: ignore[assignment]
    api = client()
    name = project.cluster_name
    cluster = api.cluster_get(name)
    target = "TERMINATED" if terminate else "STOPPED"
    if cluster["status"] == "TERMINATED" or (not terminate and cluster["status"] == "STOPPED"):
        if json_out:
            output.print_json(cluster)
        else:
            output.out.print(f"Cluster {name} is already {cluster['status']}.", markup=False)
        return
    if terminate:
        confirm_terminate(name, yes)
        cluster = api.cluster_delete(name)
    else:
        cluster = api.cluster_stop(name)
    if not no_wait:
        cluster = wait_for(api, name, {target}, show=not json_out)
    if json_out:
        output.print_json(cluster)
    else:
        output.out.print(f"Cluster {name} is {cluster['status']}.", markup=False)


@app.command()
@fail_cleanly
def status(file: ProjectFileOpt = None, json_out: JsonOpt = False) -> None:
    """The project's cluster (from cloud.yaml), or all clusters outside a project."""
    project = load_project(file, required=file is not None)
    api = client()
    if project is None:
        clusters = api.clusters()
        if json_out:
            output.print_json(clusters)
        elif not clusters:
            output.out.print("No clusters.")
        else:
            output.out.print(output.clusters_table(clusters))
        return
    cluster = _get_or_none(api, project.cluster_name)
    if cluster is None:
        raise CloudctlError(f"The project's cluster {project.cluster_name} does not exist yet; run `cloudctl up`.")
    if json_out:
        output.print_json(cluster)
    else:
        output.out.print(output.cluster_detail(cluster))


# -- jobs -----------------------------------------------------------------------------------------

jobs_app = typer.Typer(help="List, inspect and stop jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

LIVE_STATUSES = {"PENDING", "PROVISIONING", "STARTING", "RUNNING", "UPDATING"}


@app.command(context_settings={"allow_interspersed_args": False})
@fail_cleanly
def run(
    command: Annotated[list[str], typer.Argument(help="The command to run on the cluster, after `--`.",
                                                 show_default=False, metavar="-- COMMAND...")],
    cluster: Annotated[str | None, typer.Option("--cluster", "-c", help="Cluster name (default: cloud.yaml's).")
                       ] = None,
    file: ProjectFileOpt = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="NAME=VALUE for the job; repeatable.")
                   ] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Submit and return at once.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Sync the project, run COMMAND on the cluster, stream its output, exit with its exit status."""
    import shlex

    from cloudctl import jobs as jobs_mod
    from cloudctl.sync import sync_project

    project = load_project(file, required=cluster is None)
    root = project.root if project else Path.cwd()
    name = cluster or project.cluster_name  # type: ignore[union-attr]
    job_env = {**(project.job.env if project else {}), **jobs_mod.parse_env(env or [])}
    api = client()
    found = _get_or_none(api, name)
    if found is None:
        raise CloudctlError(f"Cluster {name} does not exist in workspace '{api.workspace}'; run `cloudctl up` "
                            "to create it.")
    if found["status"] not in LIVE_STATUSES:
        raise CloudctlError(f"Cluster {name} is {found['status']}; run `cloudctl up` to start it.")
    result = sync_project(api, root, excludes=project.job.excludes if project else [], progress=not json_out)
    if not json_out:
        from cloudctl.sync import summary

        output.err.print(summary(result), markup=False, soft_wrap=True)
    job = api.job_submit(name, {"snapshot": result.snapshot_id, "entrypoint": shlex.join(command), "env": job_env,
                                "pip": project.job.pip if project else []})
    job_id = job["id"]
    if detach:
        if json_out:
            output.print_json(job)
        else:
            output.err.print(f"Job {job_id} submitted to {name}; `cloudctl logs {job_id[:8]} -f` follows it.",
                             markup=False, soft_wrap=True)
            output.out.print(job_id, markup=False)
        return
    if not json_out:
        output.err.print(f"Job {job_id[:8]} submitted to {name}.", markup=False)
    try:
        job = jobs_mod.follow(api, job_id, show_waiting=not json_out,
                              write=sys.stderr.write if json_out else sys.stdout.write)
    except KeyboardInterrupt:
        raise typer.Exit(jobs_mod.ask_to_stop(api, job_id)) from None
    code = jobs_mod.exit_code_of(job)
    if json_out:
        output.print_json(job)
    elif code:
        reason = f" with exit code {job['exit_code']}" if job.get("exit_code") is not None else ""
        message = f": {job['message'].splitlines()[0]}" if job.get("message") and reason == "" else ""
        output.err.print(f"Job {job_id[:8]} {job['status']}{reason}{message}.", markup=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
@fail_cleanly
def logs(
    job: Annotated[str, typer.Argument(help="Job id (or its first characters).")],
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Keep following until the job ends.")] = False,
) -> None:
    """Print a job's log; -f follows it live until the job ends."""
    from cloudctl import jobs as jobs_mod

    api = client()
    job_id = jobs_mod.resolve_job_id(api, job)
    if not follow_:
        state = jobs_mod.Follow(job_id)
        jobs_mod.read_new(api, state, sys.stdout.write)
        sys.stdout.flush()
        return
    try:
        jobs_mod.follow(api, job_id, show_waiting=True, write=sys.stdout.write)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@jobs_app.command("list")
@fail_cleanly
def jobs_list(
    cluster: Annotated[str | None, typer.Option("--cluster", "-c", help="Only this cluster's jobs.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """The workspace's jobs, newest first."""
    from cloudctl import jobs as jobs_mod

    found = client().jobs(cluster)
    if json_out:
        output.print_json(found)
    elif not found:
        output.out.print("No jobs.")
    else:
        output.out.print(jobs_mod.jobs_table(found))


@jobs_app.command("get")
@fail_cleanly
def jobs_get(job: Annotated[str, typer.Argument(help="Job id (or its first characters).")],
             json_out: JsonOpt = False) -> None:
    """One job: status, exit code, message."""
    from cloudctl import jobs as jobs_mod

    api = client()
    found = api.job_get(jobs_mod.resolve_job_id(api, job))
    if json_out:
        output.print_json(found)
    else:
        output.out.print(jobs_mod.jobs_table([found]))
        if found.get("message"):
            output.out.print(found["message"], markup=False, soft_wrap=True)


@jobs_app.command("stop")
@fail_cleanly
def jobs_stop(job: Annotated[str, typer.Argument(help="Job id (or its first characters).")],
              json_out: JsonOpt = False) -> None:
    """Stop a job (at once if it has not started yet)."""
    from cloudctl import jobs as jobs_mod

    api = client()
    stopped = api.job_stop(jobs_mod.resolve_job_id(api, job))
    if json_out:
        output.print_json(stopped)
    else:
        output.out.print(f"Job {stopped['id'][:8]} is {stopped['status']}"
                         + (" (stop requested)." if stopped["status"] not in ("STOPPED",) else "."), markup=False)


# -- project sync -----------------------------------------------------------------------------------


@app.command()
@fail_cleanly
def sync(
    file: ProjectFileOpt = None,
    max_size: Annotated[str | None, typer.Option(
        "--max-size", help="Refuse a project bigger than this, e.g. 500M or 2G (default: $CLOUDCTL_SYNC_MAX_BYTES, "
                           "else 2G).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload the project's files (only what the control plane lacks) and record them as a snapshot.

    The project is the directory of the nearest cloud.yaml, or the current directory outside a
    project. .gitignore and .cloudignore files and cloud.yaml's job.excludes say what to leave out.
    """
    from cloudctl.sync import sync_command  # imported here: the other commands do not need it

    sync_command(file, max_size, json_out, make_client=client)
