"""Disk preflight: a build that cannot fit is refused before anything is downloaded."""

from __future__ import annotations

import re
import subprocess

import pytest



from build_helpers import (env_cli)


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN): {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_prefix_on_a_small_filesystem_is_refused_before_downloading(small_fs):
    prefix = small_fs / "env"
    p = env_cli(prefix)
    assert p.returncode == 4, p.stderr
    assert re.search(r"Not enough disk space to build .*needs about \d+\.\d GB on the filesystem of .*small.*"
                     r"0\.1 GB is free — \d+\.\d GB missing\. Nothing was downloaded or changed", p.stderr), p.stderr
    assert sorted(x.name for x in small_fs.iterdir()) == [".env.ktenv.lock"]  # only the (empty) lock file
