"""Shared test helpers: the repository root, a scratch copy of envs/, and the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def envs_copy(tmp_path) -> Path:
    """A writable copy of envs/ for tests that break it on purpose."""
    dst = tmp_path / "envs"
    shutil.copytree(REPO / "envs", dst)
    return dst


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python build.py ...` as a user would, in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(REPO / "build.py"), *args],
        capture_output=True, text=True, cwd=cwd or REPO, env=full_env, timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli
