"""The head's job staging without a cluster: verified blob cache, the working-directory archive as Ray
unpacks it (Ray's own unzip), and the archive server's unguessable paths."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ray._private.runtime_env.packaging import unzip_package

from runtime_agent.jobs import ArchiveServer, BlobCache, JobError, build_archive

FILES = {
    "main.py": (b"from lib import util\nprint(util.answer())\n", 0o644),
    "lib/__init__.py": (b"", 0o644),
    "lib/util.py": (b"def answer():\n    return 42\n", 0o644),
    "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
    "data/blob.bin": (os.urandom(2 * 1024 * 1024), 0o600),  # above the deflate threshold: stored
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    cache = BlobCache(str(tmp_path / "cache"))
    for data, _ in FILES.values():
        cache.fetch(sha(data), lambda out, data=data: out.write(data))
    return cache


def test_a_blob_whose_bytes_do_not_match_is_refused_and_not_cached(tmp_path: Path):
    cache = BlobCache(str(tmp_path / "cache"))
    digest = sha(b"expected")
    with pytest.raises(JobError, match="refusing it"):
        cache.fetch(digest, lambda out: out.write(b"tampered"))
    assert not cache.has(digest)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no temporary file left


def test_the_archive_unpacks_in_ray_to_the_project_with_its_modes(tmp_path: Path, cache: BlobCache):
    # given
    manifest = [[path, sha(data), len(data), mode] for path, (data, mode) in sorted(FILES.items())]
    archive = tmp_path / "archives" / "snap.zip"
    # when: built, then unpacked by Ray's own code for remote working_dir URIs
    build_archive(manifest, cache, str(archive))
    target = tmp_path / "unpacked"
    unzip_package(package_path=str(archive), target_dir=str(target), remove_top_level_directory=True,
                  unlink_zip=False)
    # then: the project's tree at the top of the working dir, bytes and modes intact
    found = {str(p.relative_to(target)): p for p in target.rglob("*") if p.is_file()}
    assert sorted(found) == sorted(FILES)
    for path, (data, mode) in FILES.items():
        assert found[path].read_bytes() == data
        assert stat.S_IMODE(found[path].stat().st_mode) == mode, path


def test_a_project_with_one_top_level_folder_keeps_it(tmp_path: Path, cache: BlobCache):
    data, _ = FILES["lib/util.py"]
    build_archive([["pkg/util.py", sha(data), len(data), 0o644]], cache, str(tmp_path / "one.zip"))
    target = tmp_path / "unpacked"
    unzip_package(package_path=str(tmp_path / "one.zip"), target_dir=str(target), remove_top_level_directory=True,
                  unlink_zip=False)
    assert (target / "pkg" / "util.py").read_bytes() == data  # Ray strips our wrapper, not the project's folder


def test_the_archive_server_serves_only_under_its_secret(tmp_path: Path):
    root = tmp_path / "archives"
    root.mkdir()
    (root / "snap.zip").write_bytes(b"zip bytes")
    (tmp_path / "outside.txt").write_text("private")
    server = ArchiveServer(str(root), "127.0.0.1")
    try:
        url = server.url_for("snap.zip")
        assert urllib.request.urlopen(url, timeout=5).read() == b"zip bytes"
        base = url.rsplit("/", 2)[0]
        for path in ("/snap.zip", "/wrong-secret/snap.zip", f"/{server.secret}/", f"/{server.secret}/../outside.txt",
                     f"/{server.secret}/%2e%2e%2foutside.txt", f"/{server.secret}/missing.zip"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=5)
            assert refused.value.code == 404, path
    finally:
        server.close()


def test_a_download_is_streamed_into_the_cache(tmp_path: Path):
    cache = BlobCache(str(tmp_path / "cache"))
    data = os.urandom(3 * 1024 * 1024)
    source = io.BytesIO(data)

    def download(out) -> int:  # chunked, as the agent client writes it
        while chunk := source.read(64 * 1024):
            out.write(chunk)
        return len(data)

    assert cache.fetch(sha(data), download) == len(data)
    assert Path(cache.path(sha(data))).read_bytes() == data


def test_only_the_newest_archives_are_kept(tmp_path: Path):
    from runtime_agent.jobs import prune_archives

    for i in range(5):
        archive = tmp_path / f"snap-{i}.zip"
        archive.write_bytes(b"z")
        os.utime(archive, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / ".archive-k2j4.zip").write_bytes(b"")  # another job's archive, still being written
    prune_archives(str(tmp_path), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".archive-k2j4.zip", "snap-3.zip", "snap-4.zip"]


def test_the_blob_cache_drops_the_least_recently_used_but_never_the_jobs_own(tmp_path: Path):
    cache = BlobCache(str(tmp_path / "cache"))
    blobs = [bytes([i]) * 1000 for i in range(4)]
    for age, data in enumerate(blobs):
        cache.fetch(sha(data), lambda out, data=data: out.write(data))
        os.utime(cache.path(sha(data)), (1_000_000 + age, 1_000_000 + age))
    oldest, second, third, newest = (sha(b) for b in blobs)
    # when: trimmed to 2,000 bytes while the job being staged needs the oldest blob
    freed = cache.prune(2000, keep={oldest})
    # then: the least recently used of the others go, the job's own stays
    assert freed == 2000
    assert [cache.has(h) for h in (oldest, second, third, newest)] == [True, False, False, True]
