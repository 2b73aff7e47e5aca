"""In-process controller fixtures: a data dir made by `sitewarden controller init` (one per module) and a
`Runtime` opened on it for each test. Modules that need another kind of data dir define their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.runtime import Runtime
from tests.controller_server import sitewarden


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("controller") / "controller"
    done = sitewarden("controller", "init", "--data", str(data), "--root-key-online")
    assert done.returncode == 0, done.stderr
    return data


@pytest.fixture
def runtime(data_dir: Path) -> Iterator[Runtime]:
    opened = Runtime.open(data_dir)
    yield opened
    opened.close()
