"""`cloudctl sync` against `rsync -a` to a local folder, on the same generated project.

    .venv/bin/python bench/sync_vs_rsync.py [--runs 5] [--files 10000] [--mb 300]

The project: `--files` files of random bytes (nothing dedups) totalling about `--mb` MB: 0.6 %
of them data files of 2 to 6.6 MB, the rest source-sized files (a few KB each), in about 200
directories. One control plane for the whole run (a `ControlPlaneHarness`: gunicorn, Celery
worker and beat on the embedded defaults unless DATABASE_URL / CELERY_BROKER_URL are set).

Per run, interleaved so that both sides see the same machine and the same page cache:
1. rsync, first: `rsync -a project/ dest/` into an empty folder;
2. ours, first: the installed `.venv/bin/cloudctl sync --json` as a subprocess, with a cold
   hash cache (an empty XDG_CACHE_HOME) into a new workspace (an empty blob store);
3. one file of the project is rewritten (new bytes, same size);
4. rsync, incremental: `rsync -a project/ dest/` again;
5. ours, incremental: `cloudctl sync --json` again (warm cache, same workspace).
Each of ours is checked: the first uploads every file, the incremental exactly one blob and
hashes exactly one file. Every step starts after `sync(2)`, so that no step pays for the
writeback of the one before (neither rsync nor the local blob store fsyncs each file).

`cloudctl` runs as installed: its modules compiled to bytecode first, as pip does when it installs
a package (and Python itself does on a first run, where PYTHONDONTWRITEBYTECODE is not set).

Prints a markdown table (median, min, max seconds), then, last, `ratio sync_first_vs_rsync: X`
and `ratio sync_incremental_vs_rsync: Y`: our median divided by rsync's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.dev")

from tests.e2e.harness import ControlPlaneHarness  # noqa: E402

CLOUDCTL = ROOT / ".venv" / "bin" / "cloudctl"
DATA_FRACTION = 0.006
DATA_MIN, DATA_MAX = 2_000_000, 6_600_000


def generate(root: Path, files: int, total_mb: int, seed: int = 7) -> tuple[int, list[Path]]:
    """Write the project; return its size in bytes and its small files (the ones the runs edit)."""
    rng = random.Random(seed)
    n_data = max(1, round(files * DATA_FRACTION))
    data_sizes = [rng.randint(DATA_MIN, DATA_MAX) for _ in range(n_data)]
    n_small = max(files - n_data - 1, 1)  # and train.sh
    mean_small = max(256, (total_mb * 1_000_000 - sum(data_sizes)) // n_small)
    total = 0
    small: list[Path] = []
    for i in range(n_small):
        size = max(16, min(int(rng.expovariate(1 / mean_small)), 20 * mean_small))
        path = root / f"pkg{i % 50:02d}" / f"sub{(i // 50) % 4}" / f"mod{i:05d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        small.append(path)
        total += size
    for i, size in enumerate(data_sizes):
        path = root / "data" / f"part{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        total += size
    (root / "train.sh").write_text("#!/bin/sh\npython pkg00/sub0/mod00000.py\n")
    (root / "train.sh").chmod(0o755)
    return total, small


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    # Each step starts with no dirty pages: otherwise the writeback of the previous step's
    # writes (rsync never fsyncs) throttles whichever command comes next.
    os.sync()
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return took, result.stdout


def row(label: str, values: list[float]) -> str:
    return (f"| {label:<52} | {statistics.median(values):6.2f} | {min(values):6.2f} | {max(values):6.2f} | "
            f"{len(values):2d} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=300, help="total project size, about")
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        raise SystemExit("rsync is not installed (apt-get install -y rsync).")

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "cloudctl")], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="cumulus-bench-sync-"))
    project = tmp / "project"
    project.mkdir()
    total, small = generate(project, args.files, args.mb)
    files = sum(1 for p in project.rglob("*") if p.is_file())
    print(f"project: {files:,} files, {total / 1e6:.1f} MB", file=sys.stderr, flush=True)

    harness = ControlPlaneHarness(tmp / "cp")
    results: dict[str, list[float]] = {k: [] for k in ("rsync_first", "ours_first", "rsync_incr", "ours_incr")}
    rng = random.Random(11)
    try:
        harness.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDCTL_")}
        env.update({"XDG_CONFIG_HOME": str(tmp / "xdg-config"), "NO_COLOR": "1",
                    "CLOUDCTL_URL": harness.plane.url, "CLOUDCTL_TOKEN": harness.token})
        for run in range(args.runs):
            workspace = f"bench-{run}"  # a new workspace: an empty blob store
            harness.manage("create_user", "e2e@example.com", "--workspace", workspace)
            dest = tmp / f"rsync-{run}"
            cache = tmp / f"xdg-cache-{run}"  # a cold hash cache
            ours_env = {**env, "CLOUDCTL_WORKSPACE": workspace, "XDG_CACHE_HOME": str(cache)}
            sync_cmd = [str(CLOUDCTL), "sync", "--json"]
            rsync_cmd = ["rsync", "-a", f"{project}/", f"{dest}/"]

            took, _ = timed(rsync_cmd)
            results["rsync_first"].append(took)
            os.chdir(project)
            took, out = timed(sync_cmd, ours_env)
            first = json.loads(out)
            assert first["files"] == files and first["uploaded_blobs"] == files, first
            results["ours_first"].append(took)

            edited = rng.choice(small)
            edited.write_bytes(os.urandom(edited.stat().st_size))

            took, _ = timed(rsync_cmd)
            results["rsync_incr"].append(took)
            took, out = timed(sync_cmd, ours_env)
            incr = json.loads(out)
            assert (incr["uploaded_blobs"], incr["hashed_files"]) == (1, 1), incr
            results["ours_incr"].append(took)
            print(f"run {run + 1}/{args.runs}: first rsync {results['rsync_first'][-1]:.2f}s ours "
                  f"{results['ours_first'][-1]:.2f}s; incremental rsync {results['rsync_incr'][-1]:.2f}s ours "
                  f"{results['ours_incr'][-1]:.2f}s", file=sys.stderr, flush=True)
            shutil.rmtree(dest, ignore_errors=True)
    except BaseException:
        print(harness.logs(), file=sys.stderr)
        raise
    finally:
        os.chdir(ROOT)
        harness.close()
        shutil.rmtree(tmp, ignore_errors=True)

    db = "PostgreSQL" if harness.db_name else "SQLite"
    rsync_version = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"project sync, {args.runs} runs, {files:,} files / {total / 1e6:.1f} MB, {os.cpu_count()} CPUs, "
          f"control plane on {db}, local blob store; {rsync_version.strip()}")
    print(f"| {'what (seconds)':<52} | median |    min |    max |  n |")
    print(f"|{'-' * 54}|--------|--------|--------|----|")
    print(row("rsync -a, first copy into an empty folder", results["rsync_first"]))
    print(row("cloudctl sync, first (cold cache, empty blob store)", results["ours_first"]))
    print(row("rsync -a, one file changed", results["rsync_incr"]))
    print(row("cloudctl sync, one file changed", results["ours_incr"]))
    first_ratio = statistics.median(results["ours_first"]) / statistics.median(results["rsync_first"])
    incr_ratio = statistics.median(results["ours_incr"]) / statistics.median(results["rsync_incr"])
    print(f"ratio sync_first_vs_rsync: {first_ratio:.2f}")
    print(f"ratio sync_incremental_vs_rsync: {incr_ratio:.2f}")


if __name__ == "__main__":
    main()
