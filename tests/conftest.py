"""Shared test fixtures: paths to the GPTQModel-written checkpoints under tests/fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# GPTQ_ASCEND_FIXTURES points the suite at a freshly regenerated set before it is committed.
FIXTURES = Path(os.environ.get("GPTQ_ASCEND_FIXTURES", Path(__file__).resolve().parent / "fixtures"))


def gptq_fixture_dirs() -> list[Path]:
    """Every committed GPTQ checkpoint (a folder with expected/fixture.json)."""
    return sorted(p for p in FIXTURES.iterdir() if (p / "expected" / "fixture.json").exists()) \
        if FIXTURES.exists() else []


def fixture_info(path: Path) -> dict:
    return json.loads((path / "expected" / "fixture.json").read_text())


@pytest.fixture(params=gptq_fixture_dirs(), ids=lambda p: p.name)
def gptq_fixture(request) -> Path:
    return request.param
