"""Shared test helpers: the repository root, a scratch copy of envs/, and the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# The arch of the real env the stack tests use. The four 0.7.2 locks hold the
# same packages; sm120 is the arch whose env can pass every CPU tier.
TEST_ARCH = "sm90"
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def stack_env() -> Path:
    """The prefix of a real 0.7.2 env built by ktenv's own pipeline (`build.py env`).

    Built once per session, and only for the tests that ask for it: a no-op
    (~0.2 s) when .envs/<TEST_ARCH> is up to date, seconds from a warm uv
    cache, ~1 min cold. KTENV_TEST_ENV=PREFIX uses another env ktenv built.
    A build that fails fails the tests that need it; it is never a skip.
    """
    given = os.environ.get("KTENV_TEST_ENV")
    if given:
        return Path(given).resolve()
    return _built_env(TEST_ARCH)


def _built_env(arch: str) -> Path:
    """.envs/<arch>, built (or found up to date) by ktenv itself."""
    prefix = REPO / ".envs" / arch
    p = subprocess.run([sys.executable, str(REPO / "build.py"), "env", "--arch", arch, "--prefix", str(prefix)],
                       capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        pytest.fail(f"`build.py env --arch {arch}` failed, so the tests that need a real env cannot run:\n"
                    f"{(p.stderr or p.stdout)[-2000:]}", pytrace=False)
    return prefix


@pytest.fixture(scope="session")
def stack_python(stack_env) -> Path:
    return stack_env / "bin" / "python"


@pytest.fixture(scope="session")
def sm89_env() -> Path:
    """A second real env, for sm89 (the same packages as TEST_ARCH's lock, hard-linked from uv's
    cache: seconds), for what needs an arch that can serve without flash_mla (sm90 cannot)."""
    return _built_env("sm89")


def gone(pid: int, within: float = 10) -> bool:
    """Has process `pid` exited within `within` seconds?"""
    t = time.monotonic()
    while time.monotonic() - t < within:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def cuda12_home() -> Path:
    """A real CUDA 12 toolkit: $KTENV_TEST_CUDA12_HOME, else Debian's 12.4, provisioned from
    envs/toolchain.toml's pinned archives as scripts/bootstrap.sh does (cached in ktenv's
    cache after the first run)."""
    from ktenv.build import cuda_fetch, toolchain

    if os.environ.get("KTENV_TEST_CUDA12_HOME"):
        return Path(os.environ["KTENV_TEST_CUDA12_HOME"])

    debian = next(s for s in toolchain.load(REPO / "envs").sources if s.name == "debian-trixie-12.4")
    return Path(cuda_fetch.provision(debian, progress=lambda m: None))


def cuda13_home() -> Path:
    """A real CUDA 13 nvcc: PyPI's nvidia-cuda-nvcc 13 (a test dependency), the major torch cu128 refuses."""
    import nvidia

    return next(Path(p) / "cu13" for p in nvidia.__path__ if (Path(p) / "cu13" / "bin" / "nvcc").exists())


def sync_raw_env(dest: Path, arch: str = "sm90") -> Path:
    """A plain `uv venv` + `uv pip sync` of lock/<arch> at dest: no ktenv patches, no payload.

    For tests that show what ktenv's own steps change.
    """
    from ktenv.tools import uv_bin

    lock_dir = REPO / "lock" / arch
    subprocess.run([uv_bin(), "venv", "-q", "--python-preference", "only-system", "--python", "3.11", str(dest)], check=True)
    p = subprocess.run([uv_bin(), "pip", "sync", "-q", "--require-hashes", "--python", str(dest / "bin/python"),
                        str(lock_dir / "requirements.txt")], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"could not sync lock/{arch}: {p.stderr[-600:]}", pytrace=False)
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
