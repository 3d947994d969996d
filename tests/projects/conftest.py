from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

S3_PREFIX = "cumulus/blobs"
# Dummy credentials for the loopback server, given explicitly: boto3's chain must never go
# looking further (shared files, the instance metadata endpoint).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(autouse=True)
def blob_dir(settings, tmp_path: Path) -> Path:
    """Each test's blobs in a folder of its own."""
    settings.CUMULUS_BLOB_DIR = str(tmp_path / "blobs")
    return tmp_path / "blobs"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server) on loopback, for the session; started only if a test asks."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_admin(s3_endpoint: str) -> Any:
    """A boto3 client of the tests' own, to set up buckets and look past the store."""
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing", aws_session_token="testing",
    )


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials in the environment, where the store's boto3 chain finds them first."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def s3_bucket(settings, s3_endpoint: str, s3_admin: Any, s3_env: None) -> str:
    """A fresh bucket, and the settings pointing the s3 store at it (under a prefix)."""
    bucket = f"cumulus-test-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=bucket)
    settings.CUMULUS_BLOB_STORE = "s3"
    settings.CUMULUS_BLOB_S3_BUCKET = bucket
    settings.CUMULUS_BLOB_S3_PREFIX = S3_PREFIX
    settings.CUMULUS_BLOB_S3_ENDPOINT_URL = s3_endpoint
    settings.CUMULUS_BLOB_S3_REGION = "us-east-1"
    return bucket


class StoreProbe:
    """What a blob store holds, read past the code under test (the folder's files, the bucket's objects)."""

    def __init__(self, kind: str, blob_dir: Path, s3_admin: Any = None, bucket: str = "") -> None:
        self.kind = kind
        self.blob_dir = blob_dir
        self.s3 = s3_admin
        self.bucket = bucket

    def contents(self) -> list[str]:
        """Everything stored, finished or not: every file (temporary ones too), or every object
        and every multipart upload still open."""
        if self.kind == "local":
            root = self.blob_dir
            return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()] if root.exists() else []
        objects = self.s3.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        uploads = self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return [o["Key"] for o in objects] + [f"upload:{u['Key']}" for u in uploads]

    def uploads(self) -> list[str]:
        """Multipart uploads left open (always none for the folder)."""
        if self.kind == "local":
            return []
        return [u["Key"] for u in self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])]

    def read(self, key: str) -> bytes:
        """The raw bytes at a blob key (`<workspace id>/<sha[:2]>/<sha>`)."""
        if self.kind == "local":
            return (self.blob_dir / key).read_bytes()
        return self.s3.get_object(Bucket=self.bucket, Key=f"{S3_PREFIX}/{key}")["Body"].read()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, blob_dir: Path) -> StoreProbe:
    """The test runs once against each blob store; this looks at what it holds."""
    if request.param == "local":
        return StoreProbe("local", blob_dir)
    bucket = request.getfixturevalue("s3_bucket")
    return StoreProbe("s3", blob_dir, request.getfixturevalue("s3_admin"), bucket)
