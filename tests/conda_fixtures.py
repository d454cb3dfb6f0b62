"""Fixtures shared by the conda tests (lock and build): the local channel, served
over HTTP, and a small PyPI lock whose one wheel is on disk.

The channel is built once per test session (into the session's base temp
directory), whichever module asks first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import shutil
import sys
import threading
from pathlib import Path

import pytest

import conda_channel
from conftest import REPO, cuda12_home
from ktenv import spec as specmod
from ktenv.lock import model

HOST_PY = "%d.%d" % sys.version_info[:2]


@pytest.fixture(scope="session")
def spec():
    return specmod.load(REPO / "envs")


@pytest.fixture(scope="session")
def channel(tmp_path_factory):
    where = tmp_path_factory.getbasetemp() / "conda-shared" / "channel"
    if not (where / "linux-64" / "repodata.json").exists():
        # provisioned as scripts/bootstrap.sh does, so cuda-nvcc 12.4 is NVIDIA's real nvcc
        conda_channel.build_channel(where, toolkit=cuda12_home())
    return where


@contextlib.contextmanager
def serve(directory: Path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def url(channel):
    with serve(channel) as u:
        yield u


@pytest.fixture
def envs(tmp_path):
    """A copy of envs/ a test may edit."""
    dst = tmp_path / "envs"
    shutil.copytree(REPO / "envs", dst)
    return dst


@pytest.fixture
def own_channel(channel, tmp_path):
    """A copy of the channel (packages and index) a test may change."""
    dst = tmp_path / "channel"
    shutil.copytree(channel, dst, symlinks=True)
    return dst


def needs_host_python(spec):
    if HOST_PY not in spec.stack.python:
        pytest.skip(f"the conda python repackages this interpreter ({HOST_PY}), which the stack does not target ({spec.stack.python})")


def pypi_lock(lock_dir: Path, wheels: Path, extra: list[Path] = (), pip: bool = True) -> Path:
    """A PyPI lock (requirements.txt + lock.toml) of ktenv-probe-pkg, pip (as the real locks pin it; the
    channel's pip is the same) and any `extra` wheels, from a local folder."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    found = [conda_channel.make_wheel(wheels), *([conda_channel.pip_wheel(wheels)] if pip else []), *extra]
    lines = ["--no-index", f"--find-links {wheels}"]
    for w in sorted(found):
        name, version = w.name.split("-")[:2]
        lines.append(f"{name.replace('_', '-')}=={version} \\\n    --hash=sha256:{hashlib.sha256(w.read_bytes()).hexdigest()}")
    req = lock_dir / "requirements.txt"
    req.write_text("\n".join(lines) + "\n")
    (lock_dir / "lock.toml").write_text(
        f'arch = "{lock_dir.name}"\nstack = "0.7.2"\npython = ["3.11", "3.12"]\nplatform = "x86_64-manylinux_2_35"\n'
        'cuda = "12.8"\ntorch_cuda = "cu128"\nexclude_newer = "2026-11-20T00:00:00Z"\nindex_url = "https://pypi.org/simple"\n'
        f'uv_version = "0.13.9"\ninput_hash = "test"\nrequirements_sha256 = "{model.sha256_file(req)}"\n')
    return req
