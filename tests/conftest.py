"""Shared test helpers: the repository root, a scratch copy of envs/, and the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """Build the real 0.7.2 env (sm90) once, for the tests that import the stack.

    `python build.py env` is a no-op when the env is up to date (~0.2 s) and
    takes seconds from a warm uv cache, ~1 min cold. Tests find its python in
    KTENV_TEST_ENV_PYTHON; set that to use another env, or KTENV_TEST_SKIP_ENV=1
    to skip those tests (each says why).
    """
    if os.environ.get("KTENV_TEST_ENV_PYTHON") or os.environ.get("KTENV_TEST_SKIP_ENV"):
        return
    prefix = REPO / ".envs" / "sm90"
    p = subprocess.run([sys.executable, str(REPO / "build.py"), "env", "--arch", "sm90", "--prefix", str(prefix)],
                       capture_output=True, text=True, cwd=REPO)
    if p.returncode == 0:
        os.environ["KTENV_TEST_ENV_PYTHON"] = str(prefix / "bin" / "python")
    else:
        os.environ["KTENV_TEST_ENV_ERROR"] = (p.stderr or p.stdout).strip()[-500:]


def stack_python() -> Path | None:
    """The real stack env's python, or None (then `stack_skip_reason()` says why)."""
    py = os.environ.get("KTENV_TEST_ENV_PYTHON")
    return Path(py) if py and Path(py).exists() else None


def stack_skip_reason() -> str:
    err = os.environ.get("KTENV_TEST_ENV_ERROR")
    if err:
        return f"the test env (.envs/sm90) could not be built: {err}"
    return "no real stack env (KTENV_TEST_SKIP_ENV is set, or KTENV_TEST_ENV_PYTHON points nowhere)"


def sync_raw_env(dest: Path, arch: str = "sm90") -> Path:
    """A plain `uv venv` + `uv pip sync` of lock/<arch> at dest: no ktenv patches, no payload.

    For tests that show what ktenv's own steps change. Skips (with uv's reason)
    when the lock is absent or cannot be synced.
    """
    from ktenv.tools import uv_bin

    lock_dir = REPO / "lock" / arch
    if not (lock_dir / "requirements.txt").exists():
        pytest.skip(f"lock/{arch} is not committed yet")
    subprocess.run([uv_bin(), "venv", "-q", "--python-preference", "only-system", "--python", "3.11", str(dest)], check=True)
    p = subprocess.run([uv_bin(), "pip", "sync", "-q", "--require-hashes", "--python", str(dest / "bin/python"),
                        str(lock_dir / "requirements.txt")], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"could not sync lock/{arch} (network or uv cache): {p.stderr[-300:]}")
    return dest


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
