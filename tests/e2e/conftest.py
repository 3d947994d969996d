from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ControlPlaneHarness


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneHarness]:
    harness = ControlPlaneHarness(Path(tmp_path_factory.mktemp("cp")))
    try:
        harness.start()
        yield harness
    except BaseException:
        print(harness.logs())
        raise
    finally:
        harness.close()
        assert harness.machines() == [], "machines leaked past the end of the test module"
