"""The same scale-up / scale-down workload against Ray's own autoscaler and against ours.

    .venv/bin/python bench/autoscale_vs_ray.py [--trials 3] [--idle-timeout-minutes 0.25]

Both sides: a head with 1 CPU, one worker type of 1 CPU (min 0, max 3), the same idle timeout.
Per trial a driver (its own process, so this process never joins a Ray session) connects,
holds the head's only CPU with an actor, then submits 3 `num_cpus=1` tasks of 10 s that
record (node id, start, end). Only new worker nodes can run them. Measured:
- submission → first task running on a new node (the task's own start timestamp);
- submission → all tasks finished (the driver's `ray.get` returns);
- last task end → all workers removed.

(a) Ray: `ray.cluster_utils.AutoscalingCluster`, fake multi-node provider, autoscaler v2,
    Ray's default `AUTOSCALER_UPDATE_INTERVAL_S=5` and `upscaling_speed` 1.0 (the value of
    Ray's own fake-cluster example config). `AutoscalingCluster.start()`/`.shutdown()` run
    `ray stop --force`, which kills every Ray process on the host by name, and the head
    takes GCS port 6379, which Redis holds here; so this side runs in a child process in its
    own PID, mount and network namespaces (`unshare --pid --fork --mount-proc --net`, root):
    it sees only its own processes and has its own loopback. The 2.60.0 wheel lacks
    `fake_multi_node/example.yaml`; bench/fake_multinode_example.yaml is bind-mounted in its
    place inside that mount namespace only. "Workers removed": `ray.nodes()` shows no alive
    node other than the head.
(b) Ours: a `ControlPlaneHarness` (embedded defaults: SQLite, folder broker), a `local`
    cluster, head `local.small`, worker group `cpu` of `local.small`, min 0, max 3. The driver
    connects to the cluster's `ray_address`. "Workers removed": the API's node list has no
    worker left (every worker row TERMINATED). If our cluster does not scale up within
    `--scale-timeout`, the bench says so and still prints Ray's numbers.

The sides run one after the other, Ray first. Last line: `ratio autoscale_vs_ray: X`, ours /
Ray's median of submission → first task on a new node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAKE_EXAMPLE_YAML = ROOT / "bench" / "fake_multinode_example.yaml"
TASKS = 3
TASK_SECONDS = 10.0
MAX_WORKERS = 3
RAY_UPDATE_INTERVAL_S = 5  # Ray's default AUTOSCALER_UPDATE_INTERVAL_S
RAY_UPSCALING_SPEED = 1.0  # the value in Ray's fake_multi_node/example.yaml
METRICS = (
    ("first_new_s", "submission → first task running on a new node"),
    ("all_done_s", "submission → all tasks finished"),
    ("removed_s", "last task end → all workers removed"),
)
EXTRA = (
    ("node_up_s", "submission → first new node alive in `ray.nodes()`"),
)

# --------------------------------------------------------------------------------------------
# The driver: one process per trial, `python bench/autoscale_vs_ray.py --driver ADDRESS`.
# Line 1 (JSON): the tasks' results; line 2 (JSON): when Ray saw the last worker go.
# --------------------------------------------------------------------------------------------


def driver(address: str, scale_timeout: float, removal_timeout: float) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)

    def out(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    @ray.remote(num_cpus=1)
    class HoldHead:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=1)
    def work(seconds: float) -> tuple[str, float, float]:
        start = time.time()
        node = ray.get_runtime_context().get_node_id()
        time.sleep(seconds)
        return node, start, time.time()

    def alive() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    holder = HoldHead.remote()
    head = ray.get(holder.node.remote(), timeout=120)
    # A trial starts from the head alone (workers of a previous trial gone).
    deadline = time.monotonic() + removal_timeout
    while alive() - {head} and time.monotonic() < deadline:
        time.sleep(0.2)
    before = alive()
    if before - {head}:
        out({"error": f"workers still alive before the trial: {sorted(before - {head})}"})
        return
    submitted = time.time()
    refs = [work.remote(TASK_SECONDS) for _ in range(TASKS)]
    # Wait for the tasks, watching Ray's node table: if no new node is alive within
    # `scale_timeout`, the cluster did not scale up; say so instead of waiting on.
    node_up: float | None = None
    deadline = time.monotonic() + scale_timeout + TASKS * TASK_SECONDS + 60
    pending = refs
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1)
        if node_up is None and alive() - before:
            node_up = time.time() - submitted
        waited = time.time() - submitted
        if node_up is None and waited > scale_timeout:
            out({"error": f"no scale-up: no new Ray node alive {scale_timeout:.0f} s after submitting {TASKS} tasks "
                          f"(alive Ray nodes: {len(alive())}, head included)"})
            return
        if pending and time.monotonic() > deadline:
            out({"error": f"scaled up, but the {TASKS} tasks did not finish within {waited:.0f} s "
                          f"(alive Ray nodes: {len(alive())}, head included)"})
            return
    results = ray.get(refs)
    done = time.time()
    starts_new = [start for node, start, _ in results if node not in before]
    last_end = max(end for _, _, end in results)
    out({
        "submitted": submitted,
        "node_up_s": node_up,
        "first_new_s": (min(starts_new) - submitted) if starts_new else None,
        "all_done_s": done - submitted,
        "last_end": last_end,
        "task_nodes": sorted({node for node, _, _ in results}),
        "on_head": sum(node == head for node, _, _ in results),
        "starts_s": sorted(round(start - submitted, 3) for _, start, _ in results),
    })
    deadline = time.monotonic() + removal_timeout
    while time.monotonic() < deadline:
        if not alive() - {head}:
            out({"ray_removed_s": time.time() - last_end})
            return
        time.sleep(0.1)
    out({"error": f"workers still alive in Ray {removal_timeout:.0f} s after the last task ended"})


# --------------------------------------------------------------------------------------------
# Running a driver from the bench side.
# --------------------------------------------------------------------------------------------


def driver_env() -> dict[str, str]:
    # The driver must not inherit the fake-cluster switches or any other Ray setting.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AUTOSCALER_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


class Driver:
    """One trial's driver process; its JSON lines are read by a thread so reads can time out."""

    def __init__(self, address: str, scale_timeout: float, removal_timeout: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--driver", address,
             "--scale-timeout", str(scale_timeout), "--removal-timeout", str(removal_timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=driver_env(), cwd=ROOT)
        self.lines: list[dict] = []
        self.stderr = ""
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            line = line.strip()
            if line.startswith("{"):
                with self._cond:
                    self.lines.append(json.loads(line))
                    self._cond.notify_all()
        with self._cond:
            self.lines.append({"error": "driver exited", "eof": True})
            self._cond.notify_all()

    def _read_err(self) -> None:
        self.stderr = self.proc.stderr.read()  # type: ignore[union-attr]

    def line(self, index: int, timeout: float) -> dict:
        with self._cond:
            self._cond.wait_for(lambda: len(self.lines) > index, timeout)
            if len(self.lines) > index:
                got = self.lines[index]
                if got.get("eof"):
                    got = {"error": f"driver exited (rc {self.proc.wait()}): {self.stderr[-1500:]}"}
                return got
        return {"error": f"no answer from the driver within {timeout:.0f} s"}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# (a) Ray's own autoscaler, inside its own namespaces.
# --------------------------------------------------------------------------------------------


def ray_side_in_namespace(args: argparse.Namespace) -> dict:
    """Run the Ray side in `unshare --pid --fork --mount-proc --net`; returns its JSON result."""
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--", sys.executable, str(Path(__file__).resolve()),
           "--ray-side", "--trials", str(args.trials), "--idle-timeout-minutes", str(args.idle_timeout_minutes),
           "--scale-timeout", str(args.scale_timeout)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AUTOSCALER_"))}
    # AutoscalingCluster runs the `ray` CLI: the one next to this interpreter.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    budget = 180 + args.trials * (300 + args.scale_timeout + TASKS * TASK_SECONDS + 2 * removal_timeout(args))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, timeout=budget)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"Ray side failed (rc {proc.returncode})", "trials": []}
    return json.loads(lines[-1])


def removal_timeout(args: argparse.Namespace) -> float:
    return args.idle_timeout_minutes * 60 + 90


def ray_side(args: argparse.Namespace) -> None:
    """PID 1 of the namespace: reap orphans while a child does the work (ray stop sees zombies otherwise)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _ray_side_work(args)
            code = 0
        except BaseException as exc:  # report and exit; the namespace dies with us
            import traceback

            log(f"Ray side failed: {exc!r}\n{traceback.format_exc()}")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    status = 0
    while True:
        try:
            reaped, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if reaped == pid:
            status = os.waitstatus_to_exitcode(st)
            break
    # Leaving PID 1 kills whatever is left in the namespace.
    os._exit(status)


def _ray_side_work(args: argparse.Namespace) -> None:
    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True)

    # Our own loopback (GCS on 6379, dashboard on 8265, ... without touching the host's ports)
    # and our own /tmp (Ray's session dirs), both gone with the namespace.
    sh("ip", "link", "set", "lo", "up")
    sh("mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", "/tmp")  # noqa: S108 - a private /tmp
    import ray
    import ray.autoscaler._private.fake_multi_node as fake_pkg

    pkg_dir = Path(fake_pkg.__file__).parent
    if not (pkg_dir / "example.yaml").exists():
        overlay = Path(tempfile.mkdtemp(prefix="fake_multi_node-"))
        shutil.copytree(pkg_dir, overlay, dirs_exist_ok=True)
        shutil.copy(FAKE_EXAMPLE_YAML, overlay / "example.yaml")
        sh("mount", "--bind", str(overlay), str(pkg_dir))  # this mount namespace only
    from ray.cluster_utils import AutoscalingCluster

    worker_types = {"ray.worker.cpu": {"resources": {"CPU": 1, "object_store_memory": 100 * 2**20},
                                       "node_config": {}, "min_workers": 0, "max_workers": MAX_WORKERS}}
    cluster = AutoscalingCluster(head_resources={"CPU": 1}, worker_node_types=worker_types, autoscaler_v2=True,
                                 max_workers=MAX_WORKERS, upscaling_speed=RAY_UPSCALING_SPEED,
                                 idle_timeout_minutes=args.idle_timeout_minutes)
    result: dict[str, Any] = {"ray_version": ray.__version__, "trials": []}
    started = time.monotonic()
    cluster.start(override_env={"AUTOSCALER_UPDATE_INTERVAL_S": str(RAY_UPDATE_INTERVAL_S)})
    result["start_s"] = time.monotonic() - started
    log(f"Ray side: AutoscalingCluster up in {result['start_s']:.1f} s")
    try:
        for trial in range(args.trials):
            got = run_trial("127.0.0.1:6379", args, ours=None)
            log(f"Ray trial {trial + 1}/{args.trials}: {fmt_trial(got)}")
            result["trials"].append(got)
            if "error" in got:
                break
    finally:
        cluster.shutdown()
    monitor_log = Path("/tmp/ray/session_latest/logs/monitor.log")  # noqa: S108 - the namespace's own /tmp
    text = monitor_log.read_text(errors="replace") if monitor_log.exists() else ""
    result["monitor_decisions"] = "\n".join(
        line for line in text.splitlines() if any(k in line for k in ("Adding ", "Launching ", "Removing ")))
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# One trial, either side.
# --------------------------------------------------------------------------------------------


def run_trial(address: str, args: argparse.Namespace, ours: tuple[Any, str] | None) -> dict:
    """`ours` = (Api, cluster name) for our side: removal is then read from our API."""
    drv = Driver(address, args.scale_timeout, removal_timeout(args))
    try:
        first = drv.line(0, 120 + removal_timeout(args) + args.scale_timeout + TASKS * TASK_SECONDS + 90)
        if "error" in first:
            return first
        got = dict(first)
        if ours is not None:
            api, name = ours
            deadline = time.monotonic() + removal_timeout(args)
            while time.monotonic() < deadline:
                if not [n for n in api.nodes(name) if n["role"] == "worker"]:
                    got["removed_s"] = time.time() - first["last_end"]
                    break
                time.sleep(0.1)
            else:
                got["error"] = f"workers still listed by our API {removal_timeout(args):.0f} s after the last task"
        second = drv.line(1, removal_timeout(args) + 30)
        if "ray_removed_s" in second:
            got["ray_removed_s"] = second["ray_removed_s"]
            if ours is None:
                got["removed_s"] = second["ray_removed_s"]
        else:
            got.setdefault("error", second.get("error"))
        return got
    finally:
        drv.close()


def fmt_trial(t: dict) -> str:
    if "error" in t and "first_new_s" not in t:
        return "ERROR " + str(t["error"])
    parts = [f"{key} {t[key]:.2f}s" for key, _ in METRICS if isinstance(t.get(key), (int, float))]
    parts.append(f"starts {t.get('starts_s')}, {len(t.get('task_nodes', []))} nodes, on head {t.get('on_head')}")
    if "error" in t:
        parts.append("ERROR " + str(t["error"]))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# (b) Ours.
# --------------------------------------------------------------------------------------------


def our_side(args: argparse.Namespace) -> dict:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.dev")
    sys.path.insert(0, str(ROOT))
    from tests.e2e.harness import ControlPlaneHarness, wait_for

    tmp = Path(tempfile.mkdtemp(prefix="cumulus-bench-"))
    harness = ControlPlaneHarness(tmp)
    result: dict[str, Any] = {"trials": []}
    name = "autoscale"
    try:
        harness.start()
        api = harness.api()
        started = time.monotonic()
        api.create_cluster({
            "name": name,
            "provider": "local",
            "head": {"instance_type": "local.small"},
            "worker_groups": [{"name": "cpu", "instance_type": "local.small", "min_workers": 0,
                               "max_workers": MAX_WORKERS}],
            "idle_timeout_minutes": args.idle_timeout_minutes,
        })
        cluster = api.wait_status(name, "RUNNING", timeout=180)
        result["start_s"] = time.monotonic() - started
        log(f"ours: cluster RUNNING in {result['start_s']:.1f} s, ray_address {cluster['ray_address']}")
        for trial in range(args.trials):
            got = run_trial(cluster["ray_address"], args, ours=(api, name))
            log(f"ours trial {trial + 1}/{args.trials}: {fmt_trial(got)}")
            result["trials"].append(got)
            if "error" in got:
                live = [f"{n['name']}:{n['state']}" for n in api.nodes(name)]
                result["error"] = f"{got['error']} (nodes: {', '.join(live)})"
                break
        result["events"] = api.events(name)[-60:]
        response = api.request("GET", api.cluster_path(name) + "events/", params={"page_size": 500})
        result["timed_events"] = [(e["created_at"], e["message"]) for e in reversed(response.json()["results"])]
        assert api.request("DELETE", api.cluster_path(name)).status_code == 202
        wait_for(lambda: api.cluster(name)["status"] == "TERMINATED", 120, interval=0.5, what=f"{name} TERMINATED")
    except Exception as exc:  # the bench still prints Ray's side
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(harness.logs()[-6000:])
    finally:
        harness.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------


def our_timeline(events: list, trial: dict) -> str:
    """Our cluster's events as offsets from a trial's submission."""
    import datetime as dt

    end = trial["last_end"] - trial["submitted"] + (trial.get("removed_s") or 60) + 1
    marks = []
    for created_at, message in events:
        offset = dt.datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp() - trial["submitted"]
        if -1 <= offset <= end:
            marks.append(f"+{offset:.2f}s {message}")
    return "\n".join(marks)


def ray_timeline(monitor_log: str, trial: dict) -> str:
    """Ray's monitor decisions ("Adding", "Launching", "Removing") as offsets from a trial's submission."""
    import datetime as dt

    marks = []
    for line in monitor_log.splitlines():
        if not any(k in line for k in ("Adding ", "Launching ", "Removing ")):
            continue
        try:
            at = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        offset = at - trial["submitted"]
        end = trial["last_end"] - trial["submitted"] + (trial.get("removed_s") or 60) + 1
        if -1 <= offset <= end:
            what = line.split(" -- ", 1)[-1].strip()
            marks.append(f"+{offset:.2f}s {what}")
    return "\n".join(marks)


def summary(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}] n={len(values)}"


def values(side: dict, key: str) -> list[float]:
    return [t[key] for t in side.get("trials", []) if isinstance(t.get(key), (int, float))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--idle-timeout-minutes", type=float, default=0.25)
    parser.add_argument("--scale-timeout", type=float, default=90.0,
                        help="seconds to wait, beyond the tasks' own run time, for the tasks to finish")
    parser.add_argument("--only", choices=("ray", "ours"), help="run one side only")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's monitor decisions and our cluster's events per trial")
    parser.add_argument("--json", metavar="PATH", help="also write every trial's raw data (and Ray's monitor "
                                                        "decisions) to PATH")
    parser.add_argument("--driver", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--removal-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument("--ray-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(args.driver, args.scale_timeout, args.removal_timeout)
        return
    if args.ray_side:
        ray_side(args)
        return

    ray_result: dict = {"trials": []}
    ours_result: dict = {"trials": []}
    if args.only != "ours":
        log("Ray side (own PID/mount/network namespace) ...")
        ray_result = ray_side_in_namespace(args)
    if args.only != "ray":
        log("our side (ControlPlaneHarness, local provider) ...")
        ours_result = our_side(args)

    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ray": ray_result, "ours": ours_result}, indent=1))
    ray_version = ray_result.get("ray_version") or subprocess.run(
        [sys.executable, "-c", "import ray; print(ray.__version__)"], capture_output=True, text=True).stdout.strip()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"autoscale vs Ray, {args.trials} trials per side, {os.cpu_count()} CPUs (load average now {load}), "
          f"Ray {ray_version}")
    print(f"workload: head's 1 CPU held by an actor, then {TASKS} tasks num_cpus=1 of {TASK_SECONDS:.0f} s; "
          f"worker type 1 CPU, min 0, max {MAX_WORKERS}; idle_timeout_minutes {args.idle_timeout_minutes:g} "
          "on both sides")
    print(f"Ray: AutoscalingCluster, fake_multinode provider, autoscaler v2, AUTOSCALER_UPDATE_INTERVAL_S="
          f"{RAY_UPDATE_INTERVAL_S}, upscaling_speed {RAY_UPSCALING_SPEED:g}, head {{CPU: 1}}, "
          "own PID/mount/net namespace (GCS 127.0.0.1:6379 inside it)")
    print("ours: ControlPlaneHarness (embedded defaults, tests/e2e FAST_SETTINGS), local provider, head local.small, "
          f"group cpu local.small 0..{MAX_WORKERS}")
    print()
    print("| metric (seconds, median [min-max])                    | Ray autoscaler v2            | ours"
          "                         |")
    print("|-------------------------------------------------------|------------------------------|"
          "------------------------------|")
    for key, label in METRICS:
        print(f"| {label:<53} | {summary(values(ray_result, key)):<28} | {summary(values(ours_result, key)):<28} |")
    for key, label in EXTRA:
        print(f"| {label:<53} | {summary(values(ray_result, key)):<28} | {summary(values(ours_result, key)):<28} |")
    print(f"| {'(ours) last task end → Ray shows no alive worker':<53} | {'':<28} | "
          f"{summary(values(ours_result, 'ray_removed_s')):<28} |")
    print()
    for label, side in (("Ray", ray_result), ("ours", ours_result)):
        if args.only and not side.get("trials") and "error" not in side:
            continue
        if side.get("error"):
            print(f"{label}: ERROR {side['error']}")
        for t in side.get("trials", []):
            if t.get("error"):
                print(f"{label}: trial ERROR {t['error']}")
        if side.get("events") and side.get("error"):
            print(f"{label}: last events:\n" + textwrap.indent("\n".join(side["events"]), "    "))
    if args.verbose:
        for i, t in enumerate(ray_result.get("trials", [])):
            if "submitted" in t:
                timeline = ray_timeline(ray_result.get("monitor_decisions", ""), t)
                print(f"Ray trial {i + 1}, monitor decisions after submission (task starts {t['starts_s']}):\n"
                      + textwrap.indent(timeline or "(none in the monitor log)", "    "))
        for i, t in enumerate(ours_result.get("trials", [])):
            if "submitted" in t:
                print(f"ours trial {i + 1}, events after submission (task starts {t['starts_s']}):\n"
                      + textwrap.indent(our_timeline(ours_result.get("timed_events", []), t) or "(none)", "    "))
    ray_first, ours_first = values(ray_result, "first_new_s"), values(ours_result, "first_new_s")
    if not ours_first and args.only != "ray":
        print(f"ours: did NOT scale up: no task ran on a new node (no new Ray node within {args.scale_timeout:.0f} s "
              "of submission, or an error above)")
    if ray_first and ours_first:
        print(f"ratio autoscale_vs_ray: {statistics.median(ours_first) / statistics.median(ray_first):.2f}")
    else:
        print("ratio autoscale_vs_ray: n/a (" + ("no Ray result" if not ray_first else "ours did not scale up") + ")")


if __name__ == "__main__":
    main()
