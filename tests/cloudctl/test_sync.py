"""`cloudctl sync`: the walk, the hash cache and the size cap on their own, then whole syncs against the real API."""

from __future__ import annotations

import gc
import hashlib
import json
import marshal
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.signals import request_started
from typer.testing import CliRunner

from cloudctl import sync
from cloudctl.client import Client
from cloudctl.errors import CloudctlError
from cloudctl.main import app
from cloudctl.sync import FileEntry, HashCache, check_size, hash_entries, human_size, parse_size, walk_project

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for var in ("CLOUDCTL_URL", "CLOUDCTL_TOKEN", "CLOUDCTL_WORKSPACE", "CLOUDCTL_SYNC_MAX_BYTES"):
        monkeypatch.delenv(var, raising=False)


def write(root: Path, rel: str, data: bytes | str = b"x", mode: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    return path


def paths(root: Path, excludes: list[str] | None = None) -> list[str]:
    return [e.path for e in walk_project(root, excludes or [])]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    return root


# -- the walk -------------------------------------------------------------------------------------


def test_nested_gitignore_applies_relative_to_its_own_directory(project: Path):
    # given
    write(project, ".gitignore", "*.log\n/build/\n")
    write(project, "app.log")
    write(project, "build/out.bin")
    write(project, "src/build/keep.py")  # `/build/` is anchored to the root's .gitignore
    write(project, "src/.gitignore", "/generated/\nlocal.cfg\n")
    write(project, "src/generated/x.py")
    write(project, "src/local.cfg")
    write(project, "src/pkg/local.cfg")  # an unanchored pattern matches below its directory too
    write(project, "generated/top.py")  # src/.gitignore's /generated/ does not reach up here
    write(project, "main.py")
    # when / then
    assert paths(project) == [".gitignore", "generated/top.py", "main.py", "src/.gitignore", "src/build/keep.py"]


def test_a_negation_keeps_a_file_and_a_deeper_file_has_the_last_word(project: Path):
    write(project, ".gitignore", "*.txt\n!keep.txt\n")
    write(project, "drop.txt")
    write(project, "keep.txt")
    write(project, "docs/keep.txt")
    write(project, "docs/notes.txt")
    write(project, "docs/.gitignore", "!notes.txt\n")
    assert paths(project) == [".gitignore", "docs/.gitignore", "docs/keep.txt", "docs/notes.txt", "keep.txt"]


def test_cloudignore_and_job_excludes(project: Path):
    write(project, ".gitignore", "secret.env\n")
    write(project, ".cloudignore", "data/\n!secret.env\n")  # read after .gitignore: it may re-include
    write(project, "secret.env")
    write(project, "data/big.csv")
    write(project, "notebooks/scratch.ipynb")
    write(project, "notebooks/keep.ipynb")
    write(project, "main.py")
    assert paths(project, ["notebooks/scratch.ipynb", "*.pyc"]) == [
        ".cloudignore", ".gitignore", "main.py", "notebooks/keep.ipynb", "secret.env"]
    # job.excludes outranks the ignore files
    assert "secret.env" not in paths(project, ["secret.env"])


def test_git_is_always_skipped_and_its_info_exclude_honoured(project: Path):
    write(project, ".git/HEAD", "ref: refs/heads/main\n")
    write(project, ".git/info/exclude", "scratch/\n")
    write(project, "scratch/tmp.py")
    write(project, "vendor/lib/.git", "gitdir: ../../.git/modules/lib\n")  # a submodule's .git file
    write(project, "vendor/lib/lib.py")
    write(project, "main.py")
    assert paths(project, ["!.git"]) == ["main.py", "vendor/lib/lib.py"]


def test_a_symlink_to_a_file_inside_is_followed(project: Path):
    write(project, "real/config.yaml", "a: 1\n", mode=0o600)
    (project / "config.yaml").symlink_to("real/config.yaml")
    (project / "linked").symlink_to("real", target_is_directory=True)
    entries = {e.path: e for e in walk_project(project)}
    assert set(entries) == {"config.yaml", "linked/config.yaml", "real/config.yaml"}
    assert entries["config.yaml"].size == 5 and entries["config.yaml"].mode == 0o600
    assert entries["config.yaml"].source == str((project / "real/config.yaml").resolve())
    # each is read where it is: through no link, whether the walk ran here or in its child process
    real = str((project / "real/config.yaml").resolve())
    assert entries["linked/config.yaml"].source == entries["real/config.yaml"].source == real


@pytest.mark.parametrize("kind", ["file", "dir", "broken", "loop"])
def test_a_symlink_out_of_the_project_is_refused_with_one_sentence(project: Path, tmp_path: Path, kind: str):
    outside = tmp_path / "outside"
    write(outside, "secret.txt", "s")
    write(project, "main.py")
    link = project / "sub" / "link"
    link.parent.mkdir()
    target = {"file": outside / "secret.txt", "dir": outside, "broken": project / "gone.txt",
              "loop": project / "sub"}[kind]
    link.symlink_to(target)
    with pytest.raises(CloudctlError) as info:
        walk_project(project)
    message = info.value.message
    assert "sub/link" in message and "\n" not in message and message.endswith(".")
    assert {"file": "outside the project", "dir": "outside the project", "broken": "broken",
            "loop": "loop"}[kind] in message
    # an ignored link is never looked at
    write(project, ".cloudignore", "sub/link\n")
    assert paths(project) == [".cloudignore", "main.py"]


def test_the_executable_bit_is_recorded(project: Path):
    write(project, "run.sh", "#!/bin/sh\n", mode=0o755)
    write(project, "lib.py", "", mode=0o644)
    modes = {e.path: e.mode for e in walk_project(project)}
    assert modes == {"lib.py": 0o644, "run.sh": 0o755}


def test_special_files_are_skipped(project: Path):
    os.mkfifo(project / "pipe")
    write(project, "main.py")
    assert paths(project) == ["main.py"]


@pytest.mark.parametrize(("name", "words"), [(b"caf\xe9.txt", "not valid UTF-8"), (b"a\\b.txt", "backslash")])
def test_a_name_no_snapshot_path_can_hold_is_refused_unless_ignored(project: Path, name: bytes, words: str):
    with open(os.path.join(os.fsencode(project), name), "wb") as f:
        f.write(b"x")
    with pytest.raises(CloudctlError, match=words):
        walk_project(project)
    write(project, ".cloudignore", "*.txt\n")
    assert paths(project) == [".cloudignore"]


def test_an_invalid_pattern_is_one_sentence(project: Path):
    write(project, ".cloudignore", "!\n")
    with pytest.raises(CloudctlError, match=r"^\.cloudignore has a pattern git would not accept"):
        walk_project(project)


# -- sizes and the cap ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("500M", 500 * 1024**2), ("2G", 2 * 1024**3), ("2GiB", 2 * 1024**3), ("1.5gb", int(1.5 * 1024**3)),
    ("100k", 102400), ("1048576", 1048576), (" 3 T ", 3 * 1024**4),
])
def test_sizes_are_parsed(text: str, value: int):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "2X", "1.2.3M"])
def test_a_bad_size_is_one_sentence(text: str):
    with pytest.raises(CloudctlError, match="--max-size"):
        parse_size(text)


def test_human_sizes():
    assert [human_size(n) for n in (0, 999, 12 * 1024, 312.4 * 1024**2, 2 * 1024**3)] == [
        "0 B", "999 B", "12 KB", "312.4 MB", "2.0 GB"]


def test_over_the_cap_lists_the_ten_largest_and_hints_at_cloudignore():
    entries = [FileEntry(path=f"data/f{i:02d}.bin", source="", size=(i + 1) * 1024**2, mtime_ns=0, mode=0o644)
               for i in range(15)]
    with pytest.raises(CloudctlError) as info:
        check_size(entries, 100 * 1024**2)
    error = info.value
    assert error.message == ("The project is 120.0 MB in 15 files, over the sync limit of 100.0 MB; nothing was "
                             "uploaded.")
    listed = [line.split()[-1] for line in error.details[1:-1]]
    assert listed == [f"data/f{i:02d}.bin" for i in range(14, 4, -1)]
    assert error.details[1].strip() == "15.0 MB  data/f14.bin"
    assert ".cloudignore" in error.details[-1] and "--max-size" in error.details[-1]
    check_size(entries, 120 * 1024**2)  # exactly at the cap is fine


# -- the hash cache -------------------------------------------------------------------------------


WALK_IN_A_CHILD = """
import json, sys
import cloudctl.walk
from cloudctl.errors import CloudctlError

project, walk = cloudctl.walk.start_walk(None)
forked = walk.pid is not None
cloudctl.walk.walk_project = lambda *args: sys.exit("walked again in the parent")
try:
    entries = [[e.path, e.source, e.size, e.mtime_ns, e.mode]
               for e in walk.result(str(project.root), project.job.excludes)]
except CloudctlError as exc:
    entries = {"error": exc.lines()}
print(json.dumps({"forked": forked, "entries": entries}))
"""


def walk_in_a_child(root: Path) -> dict:
    # a process of its own: this one may run threads (a live server), and a walk is not forked from those
    done = subprocess.run([sys.executable, "-c", WALK_IN_A_CHILD], cwd=root / "pkg1", capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_walk_forked_into_a_child_gives_what_the_walk_gives_and_its_errors(project: Path, tmp_path: Path):
    make_tree(project, 300)
    write(project, "cloud.yaml", yaml.safe_dump({"cluster": {"name": "p"}, "job": {"excludes": ["notes/"]}}))
    write(project, ".gitignore", "*.log\nbuild/\n")
    write(project, "pkg1/x.log", "log")
    write(project, "build/out.o", "o")
    write(project, "run.sh", "#!/bin/sh\n", mode=0o755)
    write(project, "notes/ü.md", "ü")
    (project / "link.py").symlink_to("pkg1/mod1.py")
    write(project, "real/x.txt", "x")
    (project / "linked").symlink_to("real", target_is_directory=True)
    # when: the child finds the project from a directory inside it, and walks it
    child = walk_in_a_child(project)
    # then: the same entries, in the same order, as a walk in this process
    here = [[e.path, e.source, e.size, e.mtime_ns, e.mode] for e in walk_project(project, ["notes/"])]
    assert child["forked"] is True
    # 300 modules, cloud.yaml, .gitignore, run.sh, link.py, real/x.txt and linked/x.txt (read from real/x.txt)
    assert child["entries"] == here and len(here) == 306
    assert {e[0]: e[1] for e in here}["linked/x.txt"] == str((project / "real/x.txt").resolve())
    # and what the walk refuses is refused alike, with its message
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (project / "leak.txt").symlink_to(outside)
    with pytest.raises(CloudctlError) as refused:
        walk_project(project, ["notes/"])
    assert walk_in_a_child(project)["entries"] == {"error": refused.value.lines()}


def make_tree(root: Path, count: int) -> None:
    for i in range(count):
        write(root, f"pkg{i % 20}/mod{i}.py", f"value = {i}\n")


def test_an_unchanged_tree_hashes_nothing_and_touching_one_file_rehashes_exactly_it(project: Path):
    # given: a tree hashed once
    make_tree(project, 200)
    first = walk_project(project)
    assert hash_entries(first, HashCache.load(str(project))) == 200
    HashCache.load(str(project)).save(first)
    # when: nothing changed
    again = walk_project(project)
    # then: nothing is read
    assert hash_entries(again, HashCache.load(str(project))) == 0
    assert [e.sha256 for e in again] == [e.sha256 for e in first]
    assert again[0].sha256 == sha((project / again[0].path).read_bytes())
    # when: one file's mtime moves (same bytes, same size)
    touched = project / "pkg3/mod3.py"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    third = walk_project(project)
    read: list[str] = []
    original = sync.hash_file
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sync, "hash_file", lambda e: (read.append(e.path), original(e)))
        assert hash_entries(third, HashCache.load(str(project))) == 1
    assert read == ["pkg3/mod3.py"]


def test_the_cache_is_private_per_root_and_atomic(project: Path, tmp_path: Path):
    make_tree(project, 3)
    entries = walk_project(project)
    hash_entries(entries, HashCache.load(str(project)))
    HashCache.load(str(project)).save(entries)
    files = list((tmp_path / "xdg-cache" / "cloudctl").iterdir())
    assert len(files) == 1 and files[0].name.startswith("sync-") and files[0].suffix == ".marshal"
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert marshal.loads(files[0].read_bytes())["root"] == str(project)
    other = tmp_path / "other"
    make_tree(other, 1)
    assert hash_entries(walk_project(other), HashCache.load(str(other))) == 1  # another root, another cache


@pytest.mark.parametrize("content", [b"{not json", marshal.dumps([]), marshal.dumps({"version": 1, "root": "x"}),
                                     marshal.dumps({"version": 2, "root": "x", "files": 3, "remotes": {}}),
                                     marshal.dumps({"version": 2, "files": {}})[:-3], b"\x00\x01", b""])
def test_a_corrupt_cache_is_ignored(project: Path, content: bytes):
    make_tree(project, 5)
    cache = HashCache.load(str(project))
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_bytes(content)
    entries = walk_project(project)
    assert hash_entries(entries, HashCache.load(str(project))) == 5
    HashCache.load(str(project)).save(entries)
    assert hash_entries(walk_project(project), HashCache.load(str(project))) == 0


def test_a_file_that_changes_while_being_hashed_is_read_again(project: Path, monkeypatch: pytest.MonkeyPatch):
    path = write(project, "live.txt", b"one")
    entry = walk_project(project)[0]
    real_fstat = os.fstat
    calls = {"n": 0}

    def fstat(fd: int) -> os.stat_result:
        calls["n"] += 1
        if calls["n"] == 2:  # after the first read: someone writes
            path.write_bytes(b"three")
        return real_fstat(fd)

    monkeypatch.setattr(sync.os, "fstat", fstat)
    sync.hash_file(entry)
    assert entry.sha256 == sha(b"three") and entry.size == 5


def test_a_sync_that_changed_a_few_files_appends_them_to_the_journal(project: Path):
    # given: a tree hashed and saved once: the whole file, no journal
    make_tree(project, 50)
    entries = walk_project(project)
    hash_entries(entries, HashCache.load(str(project)))
    cache = HashCache.load(str(project))
    cache.save(entries, "http://cp ws", "snap-1")
    assert cache.path.exists() and not cache.journal.exists()
    whole = cache.path.read_bytes()
    # when: nothing changed, nothing is written
    same, loaded = walk_project(project), HashCache.load(str(project))
    assert hash_entries(same, loaded) == 0
    loaded.save(same, "http://cp ws", "snap-1")
    assert cache.path.read_bytes() == whole and not cache.journal.exists()
    # when: one file changes and one goes
    write(project, "pkg3/mod3.py", "changed = True\n")
    (project / "pkg4/mod4.py").unlink()
    again = walk_project(project)
    assert hash_entries(again, HashCache.load(str(project))) == 1
    HashCache.load(str(project)).save(again, "http://cp ws", "snap-2")
    # then: one line in the journal, the file as it was
    assert cache.path.read_bytes() == whole
    (line,) = cache.journal.read_bytes().splitlines()
    assert set(json.loads(line)["files"]) == {"pkg3/mod3.py", "pkg4/mod4.py"}
    assert json.loads(line)["files"]["pkg4/mod4.py"] is None
    # and reading it back gives the new state
    loaded = HashCache.load(str(project))
    assert loaded.last_snapshot("http://cp ws") == "snap-2"
    assert "pkg4/mod4.py" not in loaded.files and len(loaded.files) == 49
    assert hash_entries(walk_project(project), loaded) == 0
    assert stat.S_IMODE(cache.journal.stat().st_mode) == 0o600


def test_a_journal_cut_short_is_read_up_to_its_last_whole_line_then_folded_into_the_file(project: Path):
    make_tree(project, 5)
    entries = walk_project(project)
    hash_entries(entries, HashCache.load(str(project)))
    HashCache.load(str(project)).save(entries, "http://cp ws", "snap-1")
    write(project, "pkg1/mod1.py", "one more\n")
    again = walk_project(project)
    hash_entries(again, HashCache.load(str(project)))
    HashCache.load(str(project)).save(again, "http://cp ws", "snap-2")
    cache = HashCache.load(str(project))
    with open(cache.journal, "ab") as f:
        f.write(b'{"version": 2, "files": {"pkg0/mod0.py": [1, 2, ')  # a crash in the middle of a line
    loaded = HashCache.load(str(project))
    assert loaded.last_snapshot("http://cp ws") == "snap-2" and loaded.files["pkg0/mod0.py"][0] != 1
    # the next save writes the whole file again, and the journal is gone
    write(project, "pkg2/mod2.py", "two more\n")
    third = walk_project(project)
    hash_entries(third, loaded)
    loaded.save(third, "http://cp ws", "snap-3")
    assert not cache.journal.exists()
    assert HashCache.load(str(project)).last_snapshot("http://cp ws") == "snap-3"
    assert hash_entries(walk_project(project), HashCache.load(str(project))) == 0


def test_a_long_journal_is_folded_into_the_file(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sync, "JOURNAL_MAX_BYTES", 600)
    make_tree(project, 5)
    for i in range(6):
        write(project, "pkg0/mod0.py", f"version {i}\n")
        entries = walk_project(project)
        hash_entries(entries, HashCache.load(str(project)))
        HashCache.load(str(project)).save(entries, "http://cp ws", f"snap-{i}")
        cache = HashCache.load(str(project))
        assert not cache.journal.exists() or cache.journal.stat().st_size < 600 + 400
        assert cache.last_snapshot("http://cp ws") == f"snap-{i}"
    assert hash_entries(walk_project(project), HashCache.load(str(project))) == 0


# -- without a server: what is refused sends nothing ---------------------------------------------


class RecordingClient:
    """Stands in for `Client` where no request may be made at all."""

    url = "http://cp.invalid"
    workspace = "ws"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"sync called the API ({name}) for a tree it should have refused")


def test_a_refused_tree_sends_nothing(project: Path, tmp_path: Path):
    write(project, "main.py")
    (project / "escape").symlink_to(tmp_path)
    with pytest.raises(CloudctlError, match="outside the project"):
        sync.sync_project(RecordingClient(), project, progress=False)  # type: ignore[arg-type]
    (project / "escape").unlink()
    write(project, "big.bin", b"\0" * 2048)
    with pytest.raises(CloudctlError, match="over the sync limit of 1 KB"):
        sync.sync_project(RecordingClient(), project, max_bytes=1024, progress=False)  # type: ignore[arg-type]


def test_more_files_than_a_snapshot_holds_is_refused(project: Path, monkeypatch: pytest.MonkeyPatch):
    make_tree(project, 4)
    monkeypatch.setattr(sync, "MAX_FILES", 3)
    with pytest.raises(CloudctlError, match="The project has 4 files and a snapshot holds at most 3"):
        sync.sync_project(RecordingClient(), project, progress=False)  # type: ignore[arg-type]


def test_the_cap_comes_from_the_environment(project: Path, monkeypatch: pytest.MonkeyPatch):
    write(project, "big.bin", b"\0" * 2048)
    monkeypatch.setenv("CLOUDCTL_SYNC_MAX_BYTES", "1K")
    with pytest.raises(CloudctlError, match="over the sync limit of 1 KB"):
        sync.sync_project(RecordingClient(), project, progress=False)  # type: ignore[arg-type]
    monkeypatch.setenv("CLOUDCTL_SYNC_MAX_BYTES", "a lot")
    with pytest.raises(CloudctlError, match="CLOUDCTL_SYNC_MAX_BYTES must be a size"):
        sync.sync_project(RecordingClient(), project, progress=False)  # type: ignore[arg-type]


def test_the_cli_reports_the_cap_and_exits_1(project: Path, monkeypatch: pytest.MonkeyPatch):
    write(project, "cloud.yaml", yaml.safe_dump({"cluster": {"name": "p"}, "job": {"excludes": ["skip/"]}}))
    write(project, "data/model.bin", b"\0" * 3000)
    write(project, "skip/huge.bin", b"\0" * 10_000)
    monkeypatch.chdir(project)
    monkeypatch.setenv("CLOUDCTL_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CLOUDCTL_TOKEN", "cu_x")
    monkeypatch.setenv("CLOUDCTL_WORKSPACE", "ws")
    result = runner.invoke(app, ["sync", "--max-size", "2K"])
    assert result.exit_code == 1
    assert "over the sync limit of 2 KB; nothing was uploaded." in result.output
    assert "data/model.bin" in result.output and "skip/huge.bin" not in result.output
    assert ".cloudignore" in result.output and "Traceback" not in result.output
    bad = runner.invoke(app, ["sync", "--max-size", "huge"])
    assert bad.exit_code == 1 and "--max-size must be a size such as 500M or 2G" in bad.output


# -- against the real API -------------------------------------------------------------------------


class Uploads:
    """The blob uploads (PUT blobs/{sha}, POST blobs/batch) the server received, and the sizes of the snapshot
    requests' bodies."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.snapshot_bodies: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, sender: Any, environ: dict, **kwargs: Any) -> None:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if "/blobs/" in path and (method == "PUT" or path.endswith("/blobs/batch")):
            with self.lock:
                self.requests.append((method, path))
        if path.endswith("/snapshots/") and method == "POST":
            with self.lock:
                self.snapshot_bodies.append(int(environ.get("CONTENT_LENGTH") or 0))

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.snapshot_bodies.clear()


@pytest.fixture
def server(live_server: Any, transactional_db: None, settings: Any, tmp_path: Path) -> Iterator[dict]:
    """A live control plane with a workspace, the owner's token and a Client for it; blob uploads counted."""
    from controlplane.choices import Role
    from controlplane.services import token_create
    from tests.factories import MembershipFactory, UserFactory, WorkspaceFactory

    settings.CUMULUS_BLOB_DIR = str(tmp_path / "blobs")
    user = UserFactory()
    workspace = WorkspaceFactory(slug="sync-ws")
    MembershipFactory(workspace=workspace, user=user, role=Role.OWNER)
    _, token = token_create(user=user, name="sync-test")
    uploads = Uploads()
    client = Client(live_server.url, token, workspace.slug)
    request_started.connect(uploads)
    try:
        yield {"url": live_server.url, "token": token, "workspace": workspace, "uploads": uploads,
               "client": client, "blobs": tmp_path / "blobs"}
    finally:
        request_started.disconnect(uploads)
        # A kept-alive HTTP connection keeps its server thread, and that thread's database
        # connection, until it closes; PostgreSQL then cannot drop the test database.
        client.session.close()
        gc.collect()  # the clients `cloudctl` made in the CLI tests, and their connections


def use_server(monkeypatch: pytest.MonkeyPatch, server: dict) -> None:
    """Point `cloudctl` (its environment variables) at the test's control plane and workspace."""
    monkeypatch.setenv("CLOUDCTL_URL", server["url"])
    monkeypatch.setenv("CLOUDCTL_TOKEN", server["token"])
    monkeypatch.setenv("CLOUDCTL_WORKSPACE", server["workspace"].slug)


def server_snapshot(client: Client, snapshot_id: str) -> dict:
    return client.request("GET", f"workspaces/{client.workspace}/snapshots/{snapshot_id}/")


def test_a_second_sync_uploads_only_the_changed_file_of_5000(server: dict, project: Path):
    from controlplane.models import AuditEvent
    from projects.models import Blob, Snapshot, SnapshotFile

    # given: a 5,000-file project, synced once
    client, uploads = server["client"], server["uploads"]
    for i in range(5000):
        write(project, f"pkg{i % 50:02d}/mod{i:04d}.py", f"# module {i}\nVALUE = {i}\n")
    first = sync.sync_project(client, project, progress=False)
    assert (first.files, first.uploaded_blobs, first.hashed_files) == (5000, 5000, 5000)
    assert Blob.objects.filter(workspace=server["workspace"]).count() == 5000
    assert uploads.snapshot_bodies[0] > 5000 * 100  # the whole manifest
    # when: one file changes
    uploads.clear()
    write(project, "pkg07/mod0007.py", "# module 7, edited\nVALUE = 'seven'\n")
    second = sync.sync_project(client, project, progress=False)
    # then: exactly one blob is uploaded, and only that file is read
    assert (second.uploaded_blobs, second.hashed_files, second.files) == (1, 1, 5000)
    assert second.uploaded_bytes == len("# module 7, edited\nVALUE = 'seven'\n")
    assert Blob.objects.filter(workspace=server["workspace"]).count() == 5001
    assert AuditEvent.objects.filter(action="blob.upload", target_id=sha(b"# module 7, edited\nVALUE = 'seven'\n")
                                     ).count() == 1
    manifest = {f["path"]: f for f in server_snapshot(client, second.snapshot_id)["files"]}
    assert len(manifest) == 5000
    assert manifest["pkg07/mod0007.py"]["sha256"] == sha(b"# module 7, edited\nVALUE = 'seven'\n")
    # and in one request: the snapshot, asked for as the first one plus that one entry, with the blob's bytes
    assert uploads.requests == []
    (body,) = uploads.snapshot_bodies
    assert body < 700, body
    created = AuditEvent.objects.get(action="snapshot.create", target_id=second.snapshot_id)
    assert created.data["base"] == first.snapshot_id
    # when: nothing changes
    uploads.clear()
    third = sync.sync_project(client, project, progress=False)
    # then: nothing is uploaded, nothing hashed, no row written: the snapshot is the second one, same id
    assert (third.uploaded_blobs, third.uploaded_bytes, third.hashed_files) == (0, 0, 0)
    assert uploads.requests == []
    assert third.snapshot_id == second.snapshot_id
    assert len(uploads.snapshot_bodies) == 1 and uploads.snapshot_bodies[0] < 300
    assert Snapshot.objects.filter(workspace=server["workspace"]).count() == 2
    assert SnapshotFile.objects.count() == 5001  # the second snapshot is one row over the first
    assert Blob.objects.filter(workspace=server["workspace"]).count() == 5001


def test_the_snapshot_on_the_server_has_the_manifest_with_modes(server: dict, project: Path, tmp_path: Path):
    client = server["client"]
    write(project, "run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    write(project, "src/app.py", "print('app')\n", mode=0o640)
    write(project, "src/copy.py", "print('app')\n", mode=0o644)  # the same bytes: one blob
    write(project, "data/weights.bin", os.urandom(sync.SINGLE_UPLOAD_MIN + 10))  # big enough for its own PUT
    write(project, "empty.txt", b"")
    (project / "link.sh").symlink_to("run.sh")
    write(project, ".cloudignore", "data/*.tmp\n")
    write(project, "data/scratch.tmp", "x")
    result = sync.sync_project(client, project, progress=False)
    assert result.uploaded_blobs == 5  # run.sh (and link.sh), app.py (and copy.py), weights, empty, .cloudignore
    shown = server_snapshot(client, result.snapshot_id)
    expected = [
        {"path": p, "sha256": sha((project / p).read_bytes()), "size": (project / p).stat().st_size, "mode": m}
        for p, m in [(".cloudignore", 0o644), ("data/weights.bin", 0o644), ("empty.txt", 0o644),
                     ("link.sh", 0o755), ("run.sh", 0o755), ("src/app.py", 0o640), ("src/copy.py", 0o644)]
    ]
    assert shown["files"] == expected
    assert shown["file_count"] == 7 and shown["total_size"] == result.bytes
    stored = server["blobs"] / str(server["workspace"].pk)
    weights = (project / "data/weights.bin").read_bytes()
    assert (stored / sha(weights)[:2] / sha(weights)).read_bytes() == weights


def test_uploads_are_streamed_never_read_whole(server: dict, project: Path, monkeypatch: pytest.MonkeyPatch):
    # given: a 50 MB file, and a look at what is handed to requests
    size = 50 * 1024**2
    write(project, "big.bin", os.urandom(size))
    write(project, "small.py", "x = 1\n")
    client = server["client"]
    bodies: list[Any] = []
    original = client.session.request

    def spy(method: str, url: str, **kwargs: Any) -> Any:
        if method in ("PUT", "POST") and "/blobs/" in url and not url.endswith("/missing"):
            body = kwargs["data"]
            assert not isinstance(body, bytes | bytearray | memoryview)
            chunks: list[int] = []

            def counted() -> Iterator[bytes]:
                for chunk in body:
                    chunks.append(len(chunk))
                    yield chunk

            bodies.append((url, len(body), chunks))
            kwargs["data"] = sync._Body(len(body), counted())
        return original(method, url, **kwargs)

    monkeypatch.setattr(client.session, "request", spy)
    # when
    result = sync.sync_project(client, project, progress=False)
    # then: the big file went in chunks of at most 1 MiB, with its length declared up front
    assert result.uploaded_blobs == 2
    (put,) = [b for b in bodies if not b[0].endswith("/batch")]
    assert put[1] == size and sum(put[2]) == size and max(put[2]) <= sync.CHUNK


def test_a_file_changed_after_hashing_is_hashed_again_and_said_so(
    server: dict, project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    write(project, "a.py", "a = 1\n")
    path = write(project, "b.py", "b = 1\n")
    original = sync.upload_blobs
    calls = {"n": 0}

    def edit_then_upload(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:  # the editor saves between the hash and the upload (same size)
            path.write_text("b = 2\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(sync, "upload_blobs", edit_then_upload)
    result = sync.sync_project(server["client"], project, progress=False)
    assert "b.py changed while it was being synced; hashed it again" in capsys.readouterr().err
    manifest = {f["path"]: f["sha256"] for f in server_snapshot(server["client"], result.snapshot_id)["files"]}
    assert manifest == {"a.py": sha(b"a = 1\n"), "b.py": sha(b"b = 2\n")}
    assert result.hashed_files == 3 and result.uploaded_blobs == 2


def test_a_blob_the_server_lost_is_sent_again(server: dict, project: Path):
    from projects.models import Blob

    write(project, "a.py", "a = 1\n")
    write(project, "b.py", "b = 1\n")
    client = server["client"]
    sync.sync_project(client, project, progress=False)
    Blob.objects.filter(sha256=sha(b"b = 1\n")).delete()  # e.g. garbage-collected since
    again = sync.sync_project(client, project, progress=False)
    assert (again.uploaded_blobs, again.hashed_files) == (1, 0)
    assert Blob.objects.filter(sha256=sha(b"b = 1\n")).exists()


def test_cloudctl_sync_human_and_json(server: dict, project: Path, monkeypatch: pytest.MonkeyPatch):
    write(project, "cloud.yaml", yaml.safe_dump({"cluster": {"name": "p"}, "job": {"excludes": ["data/"]}}))
    write(project, "train.py", "print('train')\n")
    write(project, "data/big.csv", "1,2,3\n")
    (project / "src").mkdir()
    monkeypatch.chdir(project / "src")  # the project is found from below, like git
    use_server(monkeypatch, server)
    human = runner.invoke(app, ["sync"])
    assert human.exit_code == 0, human.output
    line = human.stdout.strip()
    assert line.startswith("Synced 2 files (")
    assert ": 2 uploaded (" in line and ", 0 unchanged. Snapshot " in line
    as_json = runner.invoke(app, ["sync", "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert set(data) == {"snapshot_id", "files", "bytes", "uploaded_blobs", "uploaded_bytes", "hashed_files"}
    assert (data["files"], data["uploaded_blobs"], data["uploaded_bytes"], data["hashed_files"]) == (2, 0, 0, 0)
    assert data["bytes"] == len("print('train')\n") + (project / "cloud.yaml").stat().st_size
    manifest = server_snapshot(server["client"], data["snapshot_id"])["files"]
    assert [f["path"] for f in manifest] == ["cloud.yaml", "train.py"]


def test_a_base_the_server_no_longer_has_falls_back_to_the_whole_manifest(server: dict, project: Path):
    from projects.models import Snapshot

    client, uploads = server["client"], server["uploads"]
    make_tree(project, 300)
    first = sync.sync_project(client, project, progress=False)
    Snapshot.objects.filter(pk=first.snapshot_id).delete()
    write(project, "pkg1/mod1.py", "edited\n")
    uploads.clear()
    second = sync.sync_project(client, project, progress=False)
    assert second.uploaded_blobs == 1
    small, whole = uploads.snapshot_bodies  # the delta, refused; then the whole manifest
    assert small < 600 < whole
    manifest = {f["path"]: f["sha256"] for f in server_snapshot(client, second.snapshot_id)["files"]}
    assert len(manifest) == 300 and manifest["pkg1/mod1.py"] == sha(b"edited\n")
    # and the next sync makes its delta from the new snapshot
    uploads.clear()
    assert sync.sync_project(client, project, progress=False).snapshot_id == second.snapshot_id
    assert len(uploads.snapshot_bodies) == 1 and uploads.snapshot_bodies[0] < 600


def test_a_cache_that_is_wrong_about_its_base_is_caught_by_the_digest(server: dict, project: Path):
    client, uploads = server["client"], server["uploads"]
    make_tree(project, 100)
    first = sync.sync_project(client, project, progress=False)
    write(project, "pkg2/mod2.py", "edited\n")
    second = sync.sync_project(client, project, progress=False)
    # given: a cache whose files are the second tree but which names the first snapshot as their snapshot
    cache = HashCache.load(os.path.realpath(project))
    remote = f"{client.url} {client.workspace}"
    assert cache.last_snapshot(remote) == second.snapshot_id
    cache._rewrite(cache.files, cache.remotes, {"remote": remote, "id": first.snapshot_id})
    # when: nothing changed, the delta against the first snapshot is empty and would record the first tree
    uploads.clear()
    third = sync.sync_project(client, project, progress=False)
    # then: the server refuses it (its digest is not the first tree's), and the whole manifest gives the second
    assert third.snapshot_id == second.snapshot_id
    assert len(uploads.snapshot_bodies) == 2


def test_a_mode_change_alone_is_synced(server: dict, project: Path):
    client = server["client"]
    write(project, "run.sh", "#!/bin/sh\n", mode=0o644)
    write(project, "other.py", "x = 1\n")
    first = sync.sync_project(client, project, progress=False)
    (project / "run.sh").chmod(0o755)
    second = sync.sync_project(client, project, progress=False)
    assert second.snapshot_id != first.snapshot_id and second.hashed_files == 0
    modes = {f["path"]: f["mode"] for f in server_snapshot(client, second.snapshot_id)["files"]}
    assert modes == {"other.py": 0o644, "run.sh": 0o755}
    (project / "run.sh").chmod(0o644)  # back: the first snapshot again
    assert sync.sync_project(client, project, progress=False).snapshot_id == first.snapshot_id


def test_an_unchanged_project_keeps_its_snapshot_id_through_the_cli_and_cold_caches(
    server: dict, project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    write(project, "train.py", "print('train')\n")
    write(project, "lib/util.py", "X = 1\n")
    monkeypatch.chdir(project)
    use_server(monkeypatch, server)
    first = json.loads(runner.invoke(app, ["sync", "--json"]).stdout)
    again = json.loads(runner.invoke(app, ["sync", "--json"]).stdout)
    assert again["snapshot_id"] == first["snapshot_id"] and again["hashed_files"] == 0
    # another machine (no cache at all) with the same tree gets the same snapshot
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-cache"))
    cold = json.loads(runner.invoke(app, ["sync", "--json"]).stdout)
    assert cold["snapshot_id"] == first["snapshot_id"] and cold["hashed_files"] == 2


# -- the fast path: `cloudctl sync` without typer ---------------------------------------------------


@pytest.mark.parametrize(("args", "expected"), [
    ([], {"file": None, "max_size": None, "json_out": False}),
    (["--json"], {"file": None, "max_size": None, "json_out": True}),
    (["-f", "a/cloud.yaml", "--max-size", "2G"], {"file": "a/cloud.yaml", "max_size": "2G", "json_out": False}),
    (["--file=c.yaml", "--max-size=500M", "--json"], {"file": "c.yaml", "max_size": "500M", "json_out": True}),
    (["--help"], None),
    (["-h"], None),
    (["--json", "--json"], None),
    (["-f"], None),
    (["-f", "--json"], None),
    (["-f=x.yaml"], None),
    (["--json=1"], None),
    (["--max-size", ""], None),
    (["extra"], None),
    (["--", "x"], None),
    (["--bogus"], None),
])
def test_the_fast_path_reads_only_what_it_plainly_understands(args: list[str], expected: dict | None):
    from cloudctl.cli import sync_options

    assert sync_options(args) == expected


def test_the_fast_path_syncs_like_the_typer_command(server: dict, project: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture):
    from cloudctl import cli

    monkeypatch.setattr(cli, "end", sys.exit)  # the executable leaves with os._exit, which would end pytest too
    write(project, "cloud.yaml", yaml.safe_dump({"cluster": {"name": "p"}, "job": {"excludes": ["data/"]}}))
    write(project, "train.py", "print('train')\n")
    write(project, "data/big.csv", "1,2,3\n")
    monkeypatch.chdir(project)
    use_server(monkeypatch, server)

    def cloudctl(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["cloudctl", *args])
        with pytest.raises(SystemExit) as exited:
            cli.main()
        out, err = capsys.readouterr()
        return exited.value.code, out, err

    code, out, err = cloudctl("sync")
    assert (code, err) == (0, "")
    assert out.startswith("Synced 2 files (") and ": 2 uploaded (" in out and out.endswith("\n")
    code, out, _ = cloudctl("sync", "--json")
    data = json.loads(out)
    assert code == 0 and (data["files"], data["uploaded_blobs"], data["hashed_files"]) == (2, 0, 0)
    assert list(data) == ["snapshot_id", "files", "bytes", "uploaded_blobs", "uploaded_bytes", "hashed_files"]
    typer_run = runner.invoke(app, ["sync", "--json"])
    assert json.loads(typer_run.stdout) == data
    # failures: the same sentences and exit codes as through typer
    code, out, err = cloudctl("sync", "--max-size", "huge")
    assert (code, out) == (1, "") and err.strip() == "--max-size must be a size such as 500M or 2G, not 'huge'."
    code, out, err = cloudctl("sync", "--max-size", "20")
    assert code == 1 and "over the sync limit of 20 B; nothing was uploaded." in err
    monkeypatch.setenv("CLOUDCTL_URL", "http://127.0.0.1:9")
    code, _, err = cloudctl("sync")
    assert code == 1 and err.strip() == "Cannot reach the control plane at http://127.0.0.1:9; is it running?"
    assert gc.isenabled()  # as it was before


def test_anything_else_goes_to_typer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    from cloudctl import cli

    for args, code, words in ((["sync", "--help"], 0, "--max-size"), (["--help"], 0, "sync"),
                              (["sync", "--bogus"], 2, "No such option"), (["frobnicate"], 2, "No such command")):
        monkeypatch.setattr(sys, "argv", ["cloudctl", *args])
        with pytest.raises(SystemExit) as exited:
            cli.main()
        captured = capsys.readouterr()
        assert exited.value.code == code, args
        assert words in captured.out + captured.err, args


def test_an_incremental_sync_imports_no_cli_framework(server: dict, project: Path):
    import subprocess

    write(project, "train.py", "print('train')\n")
    write(project, "sub/.gitignore", "# only a comment\n")
    env = {**os.environ, "CLOUDCTL_URL": server["url"], "CLOUDCTL_TOKEN": server["token"],
           "CLOUDCTL_WORKSPACE": server["workspace"].slug}
    script = ("import sys\n"
              "sys.argv = ['cloudctl', 'sync', '--json']\n"
              "from cloudctl import cli\n"
              "cli.end = sys.exit  # to report what was imported once it is done\n"
              "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
              "heavy = ['typer', 'click', 'rich', 'requests', 'urllib3', 'pathspec', 'yaml', 'dataclasses',\n"
              "         'concurrent.futures', 'tempfile']\n"
              "print(code, [m for m in heavy if m in sys.modules], file=sys.stderr)\n")

    def run() -> tuple[str, dict]:
        result = subprocess.run([sys.executable, "-c", script], cwd=project, env=env, capture_output=True, text=True,
                                timeout=120)
        return result.stderr.strip().splitlines()[-1], json.loads(result.stdout)

    run()  # the first sync hashes its files in a thread pool
    write(project, "train.py", "print('train again')\n")
    imported, data = run()
    assert imported == "0 []"
    assert (data["files"], data["hashed_files"], data["uploaded_blobs"]) == (2, 1, 1)
    imported, data = run()
    assert imported == "0 []" and data["hashed_files"] == 0


def test_the_client_names_a_manifest_as_the_server_does_and_follows_a_change_from_the_state_alone():
    from projects import manifests

    rows = [("b.py", "1" * 64, 2, 0o644), ("a/ü.py", "0" * 64, 1, 0o755), ("a", "2" * 64, 0, 0o644)]
    assert sync.manifest_digest(sync.manifest_state(rows)) == manifests.manifest_digest(rows)
    assert sync.manifest_digest(sync.manifest_state([])) == manifests.manifest_digest([])
    changed = [rows[0], rows[1], ("a", "3" * 64, 5, 0o644)]
    moved = (sync.manifest_state(rows) - sync.manifest_state(rows[2:]) + sync.manifest_state(changed[2:]))
    assert sync.manifest_digest(moved % sync.STATE_MODULUS) == manifests.manifest_digest(changed)
