"""`build.py env`: real envs from a real lock, and the ways a build can go wrong.

Slow tests build the sm90 env from lock/sm90 with the real uv (seconds with a
warm uv cache: files are hard-linked from it; minutes and ~10 GB of downloads
with a cold one) and run its Python. sgl-kernel's payload is taken from a
content-addressed cache shared between test runs (see test_payload.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktenv.build.ktkernel import install as ktinstall
from ktenv.build.ktkernel.variants import best_variant
from ktenv.errors import KtenvError
from ktenv.host.cpu import cpu_info
from ktenv.tools import uv_bin

from conftest import REPO

from ktenv import spec as specmod

KT = specmod.load(REPO / "envs").knowledge.kt_kernel

from build_helpers import (ABSENT_PYTHON, CACHE_ENV, add_comment, copy_lock, debris, env_cli, stamp,
                           tamper_hash)


# ---------------------------------------------------------------- slow: real envs

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("envs") / "sm90"
    p = env_cli(prefix, None, "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    yield prefix, json.loads(p.stdout), p.stderr
    shutil.rmtree(prefix, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.network
def test_env_is_built_and_loads_the_right_kt_kernel(built):
    prefix, report, log = built
    assert report["status"] == "built" and report["pip_check"] == "clean"
    best = best_variant(KT, cpu_info().flags)
    assert report["kt_kernel"]["variant"] == best and report["kt_kernel"]["verified"]
    # progress lines carry elapsed time; the steps are all there
    for step in ("sync: Installed", "patches:", "payload:", "checks: uv pip check clean", "done:"):
        assert re.search(rf"^\[\s*\d+\.\d+s\] {re.escape(step)}", log, re.M), step
    # kt_kernel imports in the env, with the variant this CPU should get
    p = subprocess.run([str(prefix / "bin/python"), "-c", "import kt_kernel; print(kt_kernel.__cpu_variant__)"],
                       capture_output=True, text=True, cwd="/")
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == best, p.stderr[-2000:]
    # uv agrees that the env is consistent
    check = subprocess.run([uv_bin(), "pip", "check", "--python", str(prefix / "bin/python")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # the payload sits where sgl_kernel's loader looks
    assert Path(report["payload"]["dir"]).is_relative_to(prefix) and report["payload_check"]["ok"]
    assert debris(prefix) == []


@pytest.mark.slow
@pytest.mark.network
def test_env_works_at_its_final_path(built):
    prefix, report, _ = built
    p = subprocess.run([str(prefix / "bin/python"), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    assert p.stdout.strip() == str(prefix)
    p = subprocess.run([str(prefix / "bin/tqdm"), "--version"], capture_output=True, text=True)  # a console script
    assert p.returncode == 0 and re.match(r"\d+\.\d+", p.stdout), p.stderr
    for f in (prefix / "bin").iterdir():
        if f.is_file() and not f.is_symlink():
            assert b".ktenv-build-" not in f.read_bytes()[:4096], f


@pytest.mark.slow
@pytest.mark.network
def test_rebuilding_an_up_to_date_env_is_a_no_op(built):
    prefix, report, _ = built
    before = stamp(prefix)
    t0 = time.monotonic()
    p = env_cli(prefix, None, "--json")
    wall = time.monotonic() - t0
    r = json.loads(p.stdout)
    assert p.returncode == 0 and r["status"] == "up-to-date"
    # The no-op itself is milliseconds; the stat pass over every file that it runs since the
    # env check (build/verify.py) is timed by bench/bench_verify.py, not here.
    assert r["seconds"] - r["check"]["seconds"]["total"] < 1.0, r["seconds"]
    assert r["check"]["files"] > 70_000 and r["check"]["hashed"] < 100
    assert wall < 5  # the whole CLI process, interpreter start included (a loaded CI box is slow)
    assert stamp(prefix) == before
    human = env_cli(prefix)
    assert "is up to date" in human.stdout and "nothing to do" in human.stdout


@pytest.mark.slow
@pytest.mark.network
def test_a_killed_build_leaves_the_previous_env_and_no_debris(built, tmp_path):
    prefix, _, _ = built
    before = stamp(prefix)
    root = copy_lock(tmp_path / "lock", mutate=add_comment)
    proc = subprocess.Popen([sys.executable, str(REPO / "build.py"), "env", "--arch", "sm90", "--prefix", str(prefix), "--lock-dir", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, **CACHE_ENV), cwd=REPO)
    build_dir = prefix.parent / f".{prefix.name}.ktenv-build-{proc.pid}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(build_dir.glob("lib/python3*/site-packages/*.dist-info")):
        time.sleep(0.05)
    assert build_dir.exists(), proc.stderr.read().decode() if proc.poll() is not None else "the build never started"
    proc.send_signal(signal.SIGKILL)  # midway through `uv pip sync`
    proc.wait()
    assert stamp(prefix) == before
    assert subprocess.run([str(prefix / "bin/python"), "-c", "import kt_kernel"], capture_output=True, cwd="/").returncode == 0
    # the next build of this prefix (here: a no-op) removes what the killed one left
    p = env_cli(prefix)
    assert p.returncode == 0 and "is up to date" in p.stdout
    assert f"removing .{prefix.name}.ktenv-build-{proc.pid}, left by an interrupted build" in p.stderr
    assert debris(prefix) == []


@pytest.mark.slow
@pytest.mark.network
def test_a_tampered_hash_is_refused_and_nothing_is_installed(built, tmp_path):
    prefix, _, _ = built
    before = stamp(prefix)
    root = copy_lock(tmp_path / "lock", mutate=tamper_hash)
    p = env_cli(prefix, root)
    assert p.returncode == 2
    assert "does not match the sha256 the lock records, so nothing was installed" in p.stderr
    assert "Hash mismatch for `idna" in p.stderr
    assert stamp(prefix) == before and debris(prefix) == []
    fresh = tmp_path / "fresh"
    p = env_cli(fresh, root)
    assert p.returncode == 2 and not fresh.exists() and debris(fresh) == []


@pytest.mark.slow
@pytest.mark.network
def test_a_lock_for_a_missing_python_fails_clearly(tmp_path):
    v = ABSENT_PYTHON
    root = copy_lock(tmp_path / "lock", meta=lambda t: re.sub(r'^python = \[.*\]$', f'python = ["{v}"]', t, flags=re.M))
    prefix = tmp_path / "env"
    p = env_cli(prefix, root)
    assert p.returncode == 2 and f"No interpreter found for Python {v}" in p.stderr
    assert not prefix.exists() and debris(prefix) == []


@pytest.mark.slow
@pytest.mark.network
def test_concurrent_builds_of_one_prefix(tmp_path):
    prefix = tmp_path / "env"
    first = subprocess.Popen([sys.executable, str(REPO / "build.py"), "env", "--arch", "sm90", "--prefix", str(prefix)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **CACHE_ENV), cwd=REPO)
    lock = tmp_path / ".env.ktenv.lock"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and str(first.pid) not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.05)
    busy = env_cli(prefix, None, "--no-wait")
    assert busy.returncode == 75
    assert f"Another build of {prefix} is running (pid {first.pid}" in busy.stderr and "rerun without --no-wait" in busy.stderr
    queued = env_cli(prefix)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    assert queued.returncode == 0, queued.stderr[-2000:]
    assert f"waiting for another build of {prefix} (pid {first.pid}" in queued.stderr
    assert "is up to date" in queued.stdout  # it found the first build's env done
    assert debris(prefix) == []
    shutil.rmtree(prefix)


@pytest.mark.slow
@pytest.mark.network
def test_a_changed_lock_rebuilds_and_swaps(tmp_path):
    prefix = tmp_path / "env"
    a = copy_lock(tmp_path / "a")
    b = copy_lock(tmp_path / "b", mutate=add_comment)
    assert env_cli(prefix, a).returncode == 0
    first = stamp(prefix)
    p = env_cli(prefix, b, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["status"] == "built" and r["swap"] in ("exchange", "rename-pair")
    assert "requirements_sha256 changed" in p.stderr
    assert stamp(prefix)["requirements_sha256"] != first["requirements_sha256"]
    assert subprocess.run([str(prefix / "bin/python"), "-c", "import sys; assert sys.prefix == sys.argv[1]", str(prefix)]).returncode == 0
    assert debris(prefix) == []
    shutil.rmtree(prefix)


@pytest.mark.slow
@pytest.mark.network
def test_target_isa_below_this_cpu_is_loaded_and_checked(built):
    prefix, _, _ = built
    best = best_variant(KT, cpu_info().flags)
    lower = KT.variants[-1]
    if best == lower:
        pytest.skip("this CPU's best kt-kernel variant is already the lowest (avx2)")
    r = ktinstall.verify(KT, prefix, None, lower, None)
    assert r["verified"] and r["variant"] == lower and r["config"]["target_isa"] == lower


@pytest.mark.slow
@pytest.mark.network
def test_target_isa_above_this_cpu_must_at_least_be_shipped(built, tmp_path):
    prefix, _, _ = built
    best = best_variant(KT, cpu_info().flags)
    if best == KT.variants[0]:
        pytest.skip("this CPU runs the highest kt-kernel variant (amx); there is none above it")
    higher = KT.variants[0]
    r = ktinstall.verify(KT, prefix, None, higher, None)
    assert r["verified"] is False and "cannot be loaded here" in r["why"]
    so = next((prefix / "lib").glob(f"python3*/site-packages/kt_kernel/_kt_kernel_ext_{higher}.*.so"))
    moved = tmp_path / so.name
    shutil.move(so, moved)  # a hard link into uv's cache: moving it does not touch the cache
    try:
        with pytest.raises(KtenvError, match=f"has no {higher} build"):
            ktinstall.verify(KT, prefix, None, higher, None)
    finally:
        shutil.move(moved, so)
