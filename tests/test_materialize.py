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
import threading
import time
from pathlib import Path

import pytest

from ktenv import ktkernel, lockfile, materialize, tools
from ktenv.errors import KtenvError
from ktenv.hostinfo import cpu_info

from conftest import run_cli
from test_payload import shared_cache

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "lock" / "sm90"
CACHE_ENV = {"KTENV_CACHE_DIR": str(shared_cache().parent)}

needs_lock = pytest.mark.skipif(not (LOCK / "requirements.txt").exists(), reason="lock/sm90 is not committed yet")


def copy_lock(dst_root: Path, mutate=None, meta=None) -> Path:
    """A copy of lock/sm90 under dst_root/sm90, optionally with requirements.txt changed (and its hash kept true)."""
    d = dst_root / "sm90"
    shutil.copytree(LOCK, d)
    req = d / "requirements.txt"
    if mutate:
        req.write_text(mutate(req.read_text()))
        text = (d / "lock.toml").read_text()
        text = re.sub(r'requirements_sha256 = "[^"]+"', f'requirements_sha256 = "{lockfile.sha256_file(req)}"', text)
        (d / "lock.toml").write_text(text)
    if meta:
        (d / "lock.toml").write_text(meta((d / "lock.toml").read_text()))
    return dst_root


def add_comment(text: str) -> str:
    return text + "# a harmless change that makes this a different lock\n"


def tamper_hash(text: str) -> str:
    """Every hash of the idna entry replaced: uv must refuse the artifact."""
    start = text.index("\nidna==")
    end = text.index("\n", text.index("# via", start))
    return text[:start] + re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, text[start:end]) + text[end:]


def env_cli(prefix: Path, lock_root: Path | None = None, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    args = ["env", "--arch", "sm90", "--prefix", str(prefix)]
    if lock_root:
        args += ["--lock-dir", str(lock_root)]
    return run_cli(*args, *extra, env=CACHE_ENV, timeout=timeout)


def debris(prefix: Path) -> list[str]:
    return sorted(p.name for p in prefix.parent.glob(f".{prefix.name}.ktenv-*") if not p.name.endswith(".lock"))


def stamp(prefix: Path) -> dict:
    return json.loads((prefix / materialize.STAMP).read_text())


# ---------------------------------------------------------------- fast: the pieces

def test_edited_lock_is_refused(tmp_path):
    if not LOCK.exists():
        pytest.skip("lock/sm90 is not committed yet")
    root = copy_lock(tmp_path)
    req = root / "sm90" / "requirements.txt"
    req.write_text(req.read_text().replace("idna==", "idna===", 1))
    with pytest.raises(KtenvError, match="edited after locking"):
        materialize.read_lock(root / "sm90")


def _absent_python() -> str | None:
    for v in ("3.13", "3.10", "3.9", "3.8"):
        p = subprocess.run([tools.uv_bin(), "python", "find", "--python-preference", "only-system", v],
                           capture_output=True, env=materialize._uv_env())
        if p.returncode != 0:
            return v
    return None


def test_missing_python_is_named():
    v = _absent_python()
    if v is None:
        pytest.skip("every candidate Python (3.8-3.13) is installed here; none is missing")
    with pytest.raises(KtenvError, match=rf"No interpreter found for Python {v}: the lock was made for Python {v}.*pass --python"):
        materialize.find_python([v])


def test_python_of_the_wrong_version_is_refused():
    mine = "%d.%d" % sys.version_info[:2]
    other = "3.12" if mine != "3.12" else "3.11"
    with pytest.raises(KtenvError, match=rf"is Python {mine}, but this lock was made for Python {other}"):
        materialize.find_python([other], sys.executable)


def test_python_is_found_for_the_lock():
    mine = "%d.%d" % sys.version_info[:2]
    path, version = materialize.find_python(["3.99", mine])
    assert version == mine and Path(path).exists()


def test_a_held_prefix_fails_with_no_wait_and_queues_without(tmp_path):
    prefix = tmp_path / "env"
    lines = []
    with materialize.BuildLock(prefix):
        with pytest.raises(materialize.BuildBusy, match=rf"Another build of {prefix} is running \(pid {os.getpid()}, started"):
            with materialize.BuildLock(prefix, wait=False):
                pass
        got = threading.Event()

        def second():
            with materialize.BuildLock(prefix, wait=True, progress=lines.append):
                got.set()

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        assert not got.is_set()
        assert lines and lines[0].startswith(f"waiting for another build of {prefix} (pid {os.getpid()}")
    t.join(10)
    assert got.is_set()


def test_leftovers_are_cleaned_and_an_interrupted_swap_is_undone(tmp_path):
    prefix = tmp_path / "env"
    (tmp_path / ".env.ktenv-build-123" / "lib").mkdir(parents=True)
    old = tmp_path / ".env.ktenv-old-456"
    old.mkdir()
    (old / materialize.STAMP).write_text("{}")
    removed = materialize.clean_stale(prefix)
    assert (prefix / materialize.STAMP).exists()  # the previous env is back where it was
    assert removed == [str(tmp_path / ".env.ktenv-build-123")] and debris(prefix) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_replaces_the_env_in_one_step(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(materialize, "_exchange", lambda a, b: False)
    prefix, new = tmp_path / "env", tmp_path / ".env.ktenv-build-1"
    prefix.mkdir()
    (prefix / "old").write_text("previous")
    new.mkdir()
    (new / "new").write_text("next")
    how = materialize.swap_in(new, prefix)
    assert how == ("exchange" if exchange else "rename-pair")
    assert sorted(p.name for p in prefix.iterdir()) == ["new"] and not new.exists() and debris(prefix) == []


def test_a_directory_ktenv_did_not_build_is_left_alone(tmp_path):
    prefix = tmp_path / "mine"
    prefix.mkdir()
    (prefix / "notes.txt").write_text("do not delete")
    with pytest.raises(KtenvError, match="is not an env ktenv built"):
        materialize._check_replaceable(prefix)


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN): {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


@needs_lock
def test_a_prefix_on_a_small_filesystem_is_refused_before_downloading(small_fs):
    prefix = small_fs / "env"
    p = env_cli(prefix)
    assert p.returncode == 4, p.stderr
    assert re.search(r"Not enough disk space to build .*needs about \d+\.\d GB on the filesystem of .*small.*"
                     r"0\.1 GB is free — \d+\.\d GB missing\. Nothing was downloaded or changed", p.stderr), p.stderr
    assert sorted(x.name for x in small_fs.iterdir()) == [".env.ktenv.lock"]  # only the (empty) lock file


# ---------------------------------------------------------------- slow: real envs

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not (LOCK / "requirements.txt").exists():
        pytest.skip("lock/sm90 is not committed yet")
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
    best = ktkernel.best_variant(cpu_info().flags)
    assert report["kt_kernel"]["variant"] == best and report["kt_kernel"]["verified"]
    # progress lines carry elapsed time; the steps are all there
    for step in ("sync: Installed", "patches:", "payload:", "checks: uv pip check clean", "done:"):
        assert re.search(rf"^\[\s*\d+\.\d+s\] {re.escape(step)}", log, re.M), step
    # kt_kernel imports in the env, with the variant this CPU should get
    p = subprocess.run([str(prefix / "bin/python"), "-c", "import kt_kernel; print(kt_kernel.__cpu_variant__)"],
                       capture_output=True, text=True, cwd="/")
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == best, p.stderr[-2000:]
    # uv agrees that the env is consistent
    check = subprocess.run([tools.uv_bin(), "pip", "check", "--python", str(prefix / "bin/python")], capture_output=True, text=True)
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
    assert r["seconds"] < 1.0, r["seconds"]
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
    v = _absent_python()
    if v is None:
        pytest.skip("every candidate Python (3.8-3.13) is installed here; none is missing")
    root = copy_lock(tmp_path / "lock", meta=lambda t: re.sub(r'^python = \[.*\]$', f'python = ["{v}"]', t, flags=re.M))
    prefix = tmp_path / "env"
    p = env_cli(prefix, root)
    assert p.returncode == 2 and f"No interpreter found for Python {v}" in p.stderr
    assert not prefix.exists() and debris(prefix) == []


@pytest.mark.slow
@pytest.mark.network
def test_concurrent_builds_of_one_prefix(tmp_path):
    if not (LOCK / "requirements.txt").exists():
        pytest.skip("lock/sm90 is not committed yet")
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
    if not (LOCK / "requirements.txt").exists():
        pytest.skip("lock/sm90 is not committed yet")
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
    best = ktkernel.best_variant(cpu_info().flags)
    lower = ktkernel.VARIANTS[-1]
    if best == lower:
        pytest.skip("this CPU's best kt-kernel variant is already the lowest (avx2)")
    r = materialize.kt_verify(prefix, None, lower, None)
    assert r["verified"] and r["variant"] == lower and r["config"]["target_isa"] == lower


@pytest.mark.slow
@pytest.mark.network
def test_target_isa_above_this_cpu_must_at_least_be_shipped(built, tmp_path):
    prefix, _, _ = built
    best = ktkernel.best_variant(cpu_info().flags)
    if best == ktkernel.VARIANTS[0]:
        pytest.skip("this CPU runs the highest kt-kernel variant (amx); there is none above it")
    higher = ktkernel.VARIANTS[0]
    r = materialize.kt_verify(prefix, None, higher, None)
    assert r["verified"] is False and "cannot be loaded here" in r["why"]
    so = next((prefix / "lib").glob(f"python3*/site-packages/kt_kernel/_kt_kernel_ext_{higher}.*.so"))
    moved = tmp_path / so.name
    shutil.move(so, moved)  # a hard link into uv's cache: moving it does not touch the cache
    try:
        with pytest.raises(KtenvError, match=f"has no {higher} build"):
            materialize.kt_verify(prefix, None, higher, None)
    finally:
        shutil.move(moved, so)


# ---------------------------------------------------------------- --kt-source: installing the built wheel

def _wheel(path: Path, version: str, files: dict[str, bytes]) -> Path:
    import zipfile

    w = path / f"kt_kernel-{version}-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(w, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"kt_kernel-{version}.dist-info/METADATA", f"Metadata-Version: 2.4\nName: kt-kernel\nVersion: {version}\n")
        z.writestr(f"kt_kernel-{version}.dist-info/RECORD", "")
    return w


def test_a_source_build_replaces_kt_kernel_only(tmp_path):
    from test_patches import make_dist, record_ok

    site = tmp_path / "site"
    di = make_dist(site, "kt-kernel", "0.7.2", files={
        "kt_kernel/__init__.py": b"wheel", "kt_kernel/_kt_kernel_ext_amx.so": b"amx", "kt_kernel/_kt_kernel_ext_avx2.so": b"avx2",
        "sgl_kernel/payload_runtime.py": b"loader", "triton_kernels/__init__.py": b"tk"})
    (site / "kt_kernel/__pycache__").mkdir()
    (site / "kt_kernel/__pycache__/stale.pyc").write_bytes(b"x")
    w = _wheel(tmp_path, "0.7.2", {"kt_kernel/__init__.py": b"source", "kt_kernel/kt_kernel_ext.cpython-311-x86_64-linux-gnu.so": b"native"})
    r = materialize.overlay_wheel(site, w)
    assert r["replaced"] == ["kt_kernel"] and r["version"] == "0.7.2"
    assert sorted(p.name for p in (site / "kt_kernel").iterdir()) == ["__init__.py", "kt_kernel_ext.cpython-311-x86_64-linux-gnu.so"]
    assert (site / "kt_kernel/__init__.py").read_bytes() == b"source"
    # what kt-kernel's wheel carries besides kt_kernel/ stays
    assert (site / "sgl_kernel/payload_runtime.py").read_bytes() == b"loader" and (site / "triton_kernels/__init__.py").exists()
    rows = [r.split(",")[0] for r in (di / "RECORD").read_text().splitlines()]
    assert "kt_kernel/_kt_kernel_ext_amx.so" not in rows and "kt_kernel/kt_kernel_ext.cpython-311-x86_64-linux-gnu.so" in rows
    record_ok(site, di)


def test_a_source_build_of_another_release_is_refused(tmp_path):
    from test_patches import make_dist

    site = tmp_path / "site"
    make_dist(site, "kt-kernel", "0.7.2", files={"kt_kernel/__init__.py": b"wheel"})
    w = _wheel(tmp_path, "0.7.0", {"kt_kernel/__init__.py": b"source"})
    with pytest.raises(KtenvError, match=r"built from source is version 0.7.0, but the lock installs 0.7.2.*git checkout v0.7.2"):
        materialize.overlay_wheel(site, w)
    assert (site / "kt_kernel/__init__.py").read_bytes() == b"wheel"


def test_a_checkout_of_another_release_is_refused_before_building(tmp_path):
    src = tmp_path / "ktransformers"
    src.mkdir()
    (src / "kt-kernel").mkdir(parents=True)
    (src / "version.py").write_text('"""v"""\n\n__version__ = "0.7.0"\n')
    req = tmp_path / "requirements.txt"
    req.write_text("kt-kernel==0.7.2 \\\n    --hash=sha256:" + "a" * 64 + "\n")
    with pytest.raises(KtenvError, match=r"is version 0.7.0, but this lock pins kt-kernel 0.7.2.*nothing was built"):
        materialize.kt_install(tmp_path / "env", req, str(src), "avx2", print)
