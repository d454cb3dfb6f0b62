"""`env --backend conda`: the conda prefix made from its lock, through the one build pipeline.

The channel (tests/conda_channel.py) is a local one of real .conda archives in
conda-forge's layout: a real CPython (not a venv), pip, and NVIDIA's real CUDA
12.4 nvcc when this machine has that toolkit. The fast tests drive the conda
backend's own step (build/prefix.py, build/conda.py) with a one-wheel PyPI
lock; the slow one builds the real sm90 env with `build.py env --backend
conda`, enters it with conda_activate.activation and compiles a CUDA torch
extension for sm_90a with the prefix's nvcc.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import conda_channel
from build_helpers import CACHE_ENV
from conda_fixtures import HOST_PY, channel, envs, needs_host_python, own_channel, pypi_lock, serve, spec, url  # noqa: F401
from conftest import REPO, cuda12_home, run_cli
from ktenv import spec as specmod
from ktenv.build import conda as condabuild
from ktenv.build import dists
from ktenv.build.conda_activate import activation, scripts, shell_exports
from ktenv.build.pipeline import Options, build
from ktenv.build.prefix import CondaBackend, backend
from ktenv.errors import KtenvError, LockStale
from ktenv.lock import conda
from ktenv.lock.rattler import index_channel
from ktenv.target import resolve
from ktenv.tools import uv_bin


def target_for(spec, lock_root: Path, prefix: Path, arch="sm120"):
    return resolve(spec, arch, lock_root=lock_root, prefix=prefix, follow_stamp=False)


@pytest.fixture
def locked(spec, url, tmp_path):
    """lock/sm120 with the one-wheel PyPI lock and its conda lock made against the local channel."""
    needs_host_python(spec)
    lock_dir = tmp_path / "lock" / "sm120"
    pypi_lock(lock_dir, tmp_path / "wheels")
    conda.lock(spec, "sm120", out_dir=lock_dir, channel_url=url, python=HOST_PY, exclude_newer=None, progress=lambda *_: None)
    return lock_dir


def make(spec, url, lock_dir, tmp_path, requested=None):
    """The conda backend's step alone: the prefix made in a build directory for a final path elsewhere."""
    final = tmp_path / "final-env"
    work = tmp_path / ".final-env.build"
    t = target_for(spec, lock_dir.parent, final)
    b = CondaBackend(t, requested, url, tmp_path / "cache")
    made = b.make(work, final, uv_bin(), lambda *_: None)
    return b, made, work, final


def test_prefix_is_made_for_its_final_path(spec, url, locked, tmp_path):
    b, made, work, final = make(spec, url, locked, tmp_path)
    doc = yaml.safe_load((locked / conda.LOCK_FILE).read_text())
    lock = {p["name"]: p for p in doc["package"] if p["manager"] == "conda"}
    recorded = {json.loads(m.read_text())["name"]: json.loads(m.read_text()) for m in (work / "conda-meta").glob("*.json")}
    assert set(recorded) == set(lock)
    assert all(recorded[n]["url"] == lock[n]["url"] for n in lock)
    # Linked into the build directory, but every placeholder names the final prefix.
    assert (work / "lib/pkgconfig/hwloc.pc").read_text().startswith(f"prefix={final}\n")
    assert str(final) in (work / "bin/nvcc").read_text() and str(work) not in (work / "bin/nvcc").read_text()
    sysconfig = next((work / "lib").glob(f"python{HOST_PY}/_sysconfigdata_*.py"))
    assert f"'{final}" in sysconfig.read_text() and str(work) not in sysconfig.read_text()
    # A real interpreter, not a venv: no pyvenv.cfg, its own libpython through $ORIGIN/../lib.
    assert not (work / "pyvenv.cfg").exists()
    probe = "import sys, sysconfig; print(sys.prefix, sys.base_prefix, sysconfig.get_config_var('LIBDIR'))"
    out = subprocess.run([str(made.python), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] == str(work) and out[2] == str(final / "lib")
    libs = subprocess.run(["ldd", str(work / f"bin/python{HOST_PY}")], capture_output=True, text=True).stdout
    assert f"{work}/bin/../lib/libpython" in libs or "libpython" not in libs
    assert made.version == HOST_PY and made.python_path == str(final / "bin" / "python")
    assert "numactl" in b._files.values() and "bin/numactl" in b._files
    # conda-forge's CUDA layout: headers and the runtime under targets/x86_64-linux, nothing in include/
    assert (work / "targets/x86_64-linux/include/cuda_runtime_api.h").exists()
    assert not list((work / "include").glob("cuda*.h"))
    assert (work / "lib/libcudart.so").resolve() == (work / "targets/x86_64-linux/lib/libcudart.so.12.8.90").resolve()
    assert b.want()["backend"] == "conda" and b.want()["conda_lock_sha256"].startswith("sha256:")


def _pypi(uv, python, *wheels):
    subprocess.run([uv, "pip", "install", "--no-deps", "--python", str(python), *map(str, wheels)],
                   check=True, capture_output=True)


def test_a_pypi_package_over_a_conda_file_is_refused_by_name(spec, url, locked, tmp_path):
    b, made, work, final = make(spec, url, locked, tmp_path)
    b.after_pypi(work)  # nothing of PyPI's yet: clean
    # A PyPI `pip` would replace the conda package's pip files.
    fake = conda_channel.make_wheel(tmp_path / "w", "pip", "99.0")
    _pypi(uv_bin(), made.python, fake)
    with pytest.raises(KtenvError, match=r"(?s)The PyPI layer would replace files of the conda layer .*PyPI distributions: "
                       r"pip\).*conda package pip, (overwritten by PyPI pip 99.0|removed by the PyPI layer).*drop it from envs/conda.toml"):
        b.after_pypi(work)


def test_console_scripts_point_at_the_final_prefix(spec, url, locked, tmp_path):
    b, made, work, final = make(spec, url, locked, tmp_path)
    _pypi(uv_bin(), made.python, conda_channel.make_wheel(tmp_path / "w", "ktenv_scripted", "1.0", script=True))
    script = work / "bin" / "ktenv-probe"
    assert str(work) in script.read_text().splitlines()[0]
    report = b.before_swap(work, final)
    assert report["conda"]["relocated_scripts"] == 1
    assert script.read_text().splitlines()[0] == f"#!{final}/bin/python"
    # RECORD follows the rewrite, so the import tier's RECORD check stays true.
    dist = dists.installed(dists.site_packages(work))["ktenv-scripted"]
    row = next(r for r in dists.read_record(dist) if r[0].endswith("bin/ktenv-probe"))
    assert row[1] == dists.b64_digest(script.read_bytes())


@pytest.mark.parametrize("how", ["http", "file"])
def test_tampered_package_is_refused(spec, own_channel, tmp_path, how):
    needs_host_python(spec)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(serve(own_channel)) if how == "http" else own_channel.as_uri()
        lock_dir = tmp_path / "lock" / "sm120"
        pypi_lock(lock_dir, tmp_path / "wheels")
        conda.lock(spec, "sm120", out_dir=lock_dir, channel_url=url, python=HOST_PY, exclude_newer=None, progress=lambda *_: None)
        # The channel now serves other bytes under the locked file name.
        shutil.copy(own_channel / "linux-64/cuda-nvcc-tools-12.9.86-h_ktenv_0.conda", own_channel / "linux-64/cuda-nvcc-tools-12.8.93-h_ktenv_0.conda")
        with pytest.raises(KtenvError, match=r"cuda-nvcc-tools-12.8.93-h_ktenv_0.conda does not match the lock: sha256 .*Nothing was installed"):
            make(spec, url, lock_dir, tmp_path)
        assert not (tmp_path / ".final-env.build").exists()


@pytest.mark.parametrize("override, message", [
    ({"CONDA_OVERRIDE_GLIBC": "2.31"}, r"This host's glibc supports 2.31, but the conda lock .* __glibc 2.35"),
    ({"CONDA_OVERRIDE_CUDA": "12.4"}, r"This host's CUDA driver supports 12.4, but the conda lock .* __cuda 12.8.*Update the NVIDIA driver"),
])
def test_host_older_than_the_lock_is_refused(spec, url, locked, tmp_path, monkeypatch, override, message):
    for k, v in override.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(KtenvError, match=message):
        make(spec, url, locked, tmp_path)


def test_pipeline_refuses_before_building(spec, url, locked, tmp_path):
    """Through pipeline.build: a foreign prefix is not touched; --python other than the lock's is refused; a stale lock too."""
    prefix = tmp_path / "mine"
    prefix.mkdir()
    (prefix / "precious.txt").write_text("keep")
    t = target_for(spec, locked.parent, prefix)
    with pytest.raises(KtenvError, match="is not an env ktenv built"):
        build(t, Options(backend="conda", channel=url, conda_cache=tmp_path / "cache"), lambda *_: None)
    assert (prefix / "precious.txt").read_text() == "keep"
    other = "3.12" if HOST_PY != "3.12" else "3.11"
    with pytest.raises(KtenvError, match=rf"--python {other} asks for Python {other}, but with --backend conda the interpreter "
                       r"is the conda lock's python .*--python"):
        backend(t, "conda", other, url)
    with pytest.raises(KtenvError, match="--channel is for --backend conda"):
        backend(t, "uv", None, url)
    with pytest.raises(LockStale, match="channel"):
        backend(t, "conda", None, None)  # the lock was made against the local channel, not envs/conda.toml's


def test_missing_or_stale_locks_are_refused(envs, url, locked, tmp_path):
    t = target_for(specmod.load(envs), locked.parent, tmp_path / "env")
    (envs / "conda.toml").write_text((envs / "conda.toml").read_text().replace('numactl = "*"', 'numactl = ">=2"'))
    with pytest.raises(LockStale, match="out of date"):
        backend(target_for(specmod.load(envs), locked.parent, tmp_path / "env"), "conda", None, url)
    (locked / conda.LOCK_FILE).unlink()
    with pytest.raises(KtenvError, match=r"no conda lock. Write it with"):
        backend(t, "conda", None, url)


def test_lock_entry_without_hash_is_refused(spec, url, locked, tmp_path):
    doc = yaml.safe_load((locked / conda.LOCK_FILE).read_text())
    doc["package"][0]["hash"].pop("sha256")
    (locked / conda.LOCK_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(KtenvError, match=f"the entry for {doc['package'][0]['name']} lacks an md5 and sha256"):
        backend(target_for(spec, locked.parent, tmp_path / "env"), "conda", None, url)


# --- activation -------------------------------------------------------------------

def test_activation_gives_what_conda_activate_would(spec, url, locked, tmp_path):
    b, made, work, final = make(spec, url, locked, tmp_path)
    env = activation(work, base={"PATH": "/usr/bin:/bin"})
    assert env["PATH"] == f"{work}/bin:/usr/bin:/bin" and env["CONDA_PREFIX"] == str(work)
    assert env["CUDA_HOME"] == env["CUDA_PATH"] == str(work)
    inc = f"{work}/targets/x86_64-linux/include"
    assert env["CUDA_INC_PATH"] == inc and env["CPATH"].split(os.pathsep)[0] == inc
    # from the compilers' and cuda-nvcc's activate.d scripts, in conda's order (~cuda-nvcc last)
    assert [p.name for p in scripts(work)][-1] == "~cuda-nvcc_activate.sh"
    assert env["CC"] == f"{work}/bin/x86_64-conda-linux-gnu-cc" and env["CXX"] == f"{work}/bin/x86_64-conda-linux-gnu-c++"
    assert env["NVCC_PREPEND_FLAGS"].strip() == f"-ccbin={env['CXX']}"
    assert f"-I{inc}" in env["CXXFLAGS"]
    # the exports a shell can eval give the same
    out = subprocess.run(["bash", "-c", shell_exports(env) + 'printf %s "$CXX"'], capture_output=True, text=True, env={}).stdout
    assert out == env["CXX"]


def test_activation_puts_targets_include_where_gcc_looks(spec, url, locked, tmp_path):
    """conda-forge's CUDA headers are under targets/x86_64-linux/include: not found without activation (pytorch#144690)."""
    b, made, work, final = make(spec, url, locked, tmp_path)
    src = tmp_path / "use_cuda.cpp"
    src.write_text("#include <cuda_runtime_api.h>\nint main() { int v = 0; return cudaRuntimeGetVersion(&v); }\n")
    base = {"PATH": os.environ["PATH"], "CUDA_HOME": str(work)}
    compile_ = ["g++", "-fsyntax-only", str(src)]
    plain = subprocess.run(compile_, capture_output=True, text=True, env=base)
    assert plain.returncode != 0 and "cuda_runtime_api.h" in plain.stderr
    active = subprocess.run(compile_, capture_output=True, text=True, env={**base, **activation(work, base=base)})
    assert active.returncode == 0, active.stderr


def test_a_failing_activation_script_is_named(spec, url, locked, tmp_path):
    b, made, work, final = make(spec, url, locked, tmp_path)
    (work / "etc/conda/activate.d/zz-broken.sh").write_text("false\n")
    with pytest.raises(KtenvError, match=r"(?s)An activation script of .* failed.*zz-broken.sh"):
        activation(work)
    with pytest.raises(KtenvError, match="not a conda prefix"):
        activation(tmp_path)


# --- the real sm90 env through `build.py env --backend conda` ----------------------

EXT = REPO / "tests" / "fixtures" / "conda" / "cuda_ext.py"


def real_pip_wheel(lock_dir: Path, out: Path) -> Path:
    """The pip wheel the real PyPI lock pins, from PyPI, checked against the lock's hashes:
    conda-forge's pip of that version is made from it (envs/conda.toml pins pip to the PyPI lock's)."""
    from ktenv.lock import model

    pin = next(e for e in model.parse_requirements((lock_dir / "requirements.txt").read_text()) if e.name == "pip")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out),
                    f"pip=={pin.version}"], check=True, capture_output=True, timeout=300)
    wheel = next(out.glob(f"pip-{pin.version}-*.whl"))
    assert "sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest() in pin.hashes
    return wheel


@pytest.fixture(scope="module")
def conda_env(tmp_path_factory, channel):
    assert (cuda12_home() / "nvvm" / "bin" / "cicc").is_file()  # the channel fixture packaged it
    root = tmp_path_factory.mktemp("conda-env")
    # The channel gains conda-forge's pip at the version the real lock pins, made from PyPI's wheel
    # (a build number above the session channel's pip, which may be the same version).
    shutil.copytree(channel, root / "channel", symlinks=True)
    channel = root / "channel"
    conda_channel.pip_package(channel, real_pip_wheel(REPO / "lock" / "sm90", root / "pip"), HOST_PY, "pyh_ktenv_1")
    index_channel(channel)
    envs_dir = root / "envs"
    shutil.copytree(REPO / "envs", envs_dir)
    # The real nvcc here is 12.4 (the stack's 12.8 has no source reachable from this machine); same major as torch's.
    with (envs_dir / "conda.toml").open("a") as f:
        f.write('\n[arch.sm90.packages]\ncuda-version = "12.4.*"\ncuda-nvcc = "12.4.*"\ncuda-cudart-dev = "12.4.*"\n')
    lock_root = root / "lock"
    shutil.copytree(REPO / "lock" / "sm90", lock_root / "sm90")
    with serve(channel) as u:
        conda.lock(specmod.load(envs_dir), "sm90", out_dir=lock_root / "sm90", channel_url=u, exclude_newer=None,
                   progress=lambda *_: None)
        prefix = root / "sm90"
        args = ["env", "--arch", "sm90", "--envs", str(envs_dir), "--lock-dir", str(lock_root), "--prefix", str(prefix),
                "--backend", "conda", "--channel", u]
        first = run_cli(*args, "--json", env=CACHE_ENV, timeout=1200)
        again = run_cli(*args, env=CACHE_ENV, timeout=600)
    yield prefix, first, again
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.network
def test_conda_env_is_the_same_pipeline(conda_env):
    prefix, first, again = conda_env
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(first.stdout)
    assert report["status"] == "built" and report["backend"] == "conda" and report["pip_check"] == "clean"
    assert report["kt_kernel"]["verified"] and report["payload"]["present"] and report["patches"]["changes"]
    assert report["conda"]["relocated_scripts"] > 0
    for step in ("conda: linking", "sync: Installed", "patches:", "payload:", "checks: uv pip check clean", "done:"):
        assert step in first.stderr, step
    stamp = json.loads((prefix / "ktenv-stamp.json").read_text())
    assert stamp["backend"] == "conda" and stamp["conda_lock_sha256"].startswith("sha256:")
    assert "up to date" in again.stdout, again.stdout + again.stderr
    # the interpreter is the conda one, at the final path; console scripts run
    assert not (prefix / "pyvenv.cfg").exists()
    out = subprocess.run([str(prefix / "bin/torchrun"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    # pip, in both layers' lists, is conda's, at the PyPI lock's version, and the env checks intact
    site = dists.site_packages(prefix)
    pips = sorted(site.glob("pip-*.dist-info"))
    assert [p.name for p in pips] == [f"pip-{report_pin(prefix)}.dist-info"]
    assert (pips[0] / "INSTALLER").read_text().strip() == "conda"
    check = run_cli("env", "--arch", "sm90", "--envs", str(prefix.parent / "envs"), "--lock-dir", str(prefix.parent / "lock"),
                    "--prefix", str(prefix), "--check", env=CACHE_ENV, timeout=600)
    assert check.returncode == 0 and "intact" in check.stdout, check.stdout + check.stderr


def report_pin(prefix: Path) -> str:
    from ktenv.lock import model

    return next(e.version for e in model.parse_requirements((prefix.parent / "lock/sm90/requirements.txt").read_text())
                if e.name == "pip")


@pytest.mark.slow
@pytest.mark.network
def test_activated_conda_env_compiles_a_cuda_torch_extension(conda_env, tmp_path):
    """Through activation, the prefix's real nvcc 12.4 and the env's torch build an sm_90a extension (compile only)."""
    prefix, first, _ = conda_env
    assert first.returncode == 0, first.stderr[-3000:]
    env = {**os.environ, **activation(prefix), "TORCH_CUDA_ARCH_LIST": "9.0a", "MAX_JOBS": "2"}
    p = subprocess.run([str(prefix / "bin/python"), str(EXT), str(tmp_path / "build")], capture_output=True, text=True,
                       env=env, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout.split("KTENV-RESULT ", 1)[1])
    assert r["cuda_home"] == str(prefix) and r["nvcc_line"] == f"nvcc = {prefix}/bin/nvcc"
    assert r["cxx_line"] == f"cxx = {prefix}/bin/x86_64-conda-linux-gnu-c++"
    assert f"-isystem {prefix}/targets/x86_64-linux/include" in r["cuda_cflags"] and "code=sm_90a" in r["cuda_cflags"]
    from ktenv.check.cuobjdump import find_cuobjdump, list_codes

    codes = list_codes(find_cuobjdump()[0], Path(r["library"]))
    assert codes["sass"] == {"sm_90a": 1}, codes
