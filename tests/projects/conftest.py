from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def blob_dir(settings, tmp_path: Path) -> Path:
    """Each test's blobs in a folder of its own."""
    settings.CUMULUS_BLOB_DIR = str(tmp_path / "blobs")
    return tmp_path / "blobs"
