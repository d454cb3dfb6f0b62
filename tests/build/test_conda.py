"""The conda layer, end to end against a local channel the tests build.

No conda channel is reachable here, so tests/conda_channel.py builds real
.conda archives of stand-in packages (named and versioned like the
conda-forge ones, tiny payloads), indexes them with rattler and serves them
over HTTP; the lock, the solve, the install and the PyPI layer on top are the
real code paths. conda-lock's own parser and renderer check the lock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

import conda_channel
from ktenv import tools
from ktenv.build import conda as condabuild
from ktenv.lock import conda
from ktenv.lock.rattler import index_channel
from ktenv import spec as specmod
from ktenv.errors import KtenvError, LockStale, ResolveError, SpecError

REPO = Path(__file__).resolve().parents[2]
HOST_PY = "%d.%d" % sys.version_info[:2]


@pytest.fixture(scope="session")
def spec():
    return specmod.load(REPO / "envs")


@pytest.fixture(scope="session")
def channel(tmp_path_factory):
    return conda_channel.build_channel(tmp_path_factory.mktemp("conda") / "channel")


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
        pytest.skip(f"the stand-in python wraps this interpreter ({HOST_PY}), which the stack does not target ({spec.stack.python})")


def write_requirements(lock_dir: Path, wheels: Path) -> Path:
    wheel = conda_channel.make_wheel(wheels)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    req = lock_dir / "requirements.txt"
    req.write_text(f"--no-index\n--find-links {wheels}\nktenv-probe-pkg==0.1.0 --hash=sha256:{digest}\n")
    return req


def conda_lock_python(code: str, *args, cwd: Path) -> dict:
    # -I: the repository root must not be on sys.path, because its build.py
    # shadows the `build` package that conda-lock imports.
    proc = subprocess.run([sys.executable, "-I", "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def conda_lock_defaults() -> dict[str, str]:
    """conda-lock's built-in linux-64 virtual packages, read from its own data file."""
    found = importlib.util.find_spec("conda_lock")
    data = yaml.safe_load((Path(found.submodule_search_locations[0]) / "default-virtual-packages.yaml").read_text())
    return {k: str(v) for k, v in data["subdirs"]["linux-64"]["packages"].items()}


# --- inputs from envs/ --------------------------------------------------------

def test_inputs_come_from_the_spec(spec):
    for arch in spec.supported_archs():
        inputs = conda.load_inputs(spec, arch)
        assert inputs.virtual["__cuda"] == spec.stack.cuda
        assert inputs.virtual["__glibc"] == spec.stack.platform.rsplit("manylinux_", 1)[1].replace("_", ".")
        assert f"python {spec.stack.python[0]}.*" in inputs.specs
        assert f"cuda-nvcc {spec.stack.cuda}.*" in inputs.specs
        assert inputs.exclude_newer == spec.stack.release(None).exclude_newer
    assert conda.load_inputs(spec, "sm90", python="3.12").specs != conda.load_inputs(spec, "sm90").specs


def test_unsupported_arch_refused(spec):
    with pytest.raises(SpecError, match="not supported"):
        conda.load_inputs(spec, "sm86")


def test_arch_cuda_above_stack_refused(envs):
    text = (envs / "sm120.toml").read_text().replace('min_cuda = "12.8"', 'min_cuda = "13.0"')
    (envs / "sm120.toml").write_text(text)
    with pytest.raises(SpecError, match=r"sm120 needs CUDA >= 13.0 .* built for CUDA 12.8"):
        conda.load_inputs(specmod.load(envs), "sm120")


def test_conda_toml_may_not_set_cuda_or_glibc(envs):
    (envs / "conda.toml").write_text((envs / "conda.toml").read_text().replace('__unix = "0"', '__unix = "0"\n__cuda = "11.4"'))
    with pytest.raises(SpecError, match="sets __cuda, which ktenv derives itself"):
        conda.load_inputs(specmod.load(envs), "sm90")


def test_conda_toml_unknown_arch_and_placeholder(envs):
    base = (envs / "conda.toml").read_text()
    (envs / "conda.toml").write_text(base + '\n[arch.sm75.packages]\nfoo = "1"\n')
    with pytest.raises(SpecError, match=r"\[arch.sm75\] names an arch that has no envs/sm75.toml"):
        conda.load_inputs(specmod.load(envs), "sm90")
    (envs / "conda.toml").write_text(base.replace('cmake = ">=3.16"', 'cmake = "{cmake}"'))
    with pytest.raises(SpecError, match=r"cmake \('\{cmake\}'\) uses a placeholder other than"):
        conda.load_inputs(specmod.load(envs), "sm90")


def test_platform_without_manylinux_tag_refused(envs):
    text = (envs / "stack.toml").read_text().replace('platform = "x86_64-manylinux_2_35"', 'platform = "x86_64-linux"')
    (envs / "stack.toml").write_text(text)
    with pytest.raises(SpecError, match="carries no manylinux_X_Y tag"):
        conda.load_inputs(specmod.load(envs), "sm90")


def test_channel_names_become_urls(tmp_path):
    assert conda.channel_to_url("conda-forge") == "https://conda.anaconda.org/conda-forge"
    assert conda.channel_to_url("http://mirror.example/conda-forge/") == "http://mirror.example/conda-forge"
    assert conda.channel_to_url(str(tmp_path)) == tmp_path.as_uri()


def test_missing_rattler_is_explained(tmp_path, monkeypatch):
    # A Python where `import rattler` fails, as on a machine without py-rattler.
    (tmp_path / "rattler").mkdir()
    (tmp_path / "rattler" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'rattler'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(KtenvError, match="The conda backend needs py-rattler, which .* cannot import .*pip install py-rattler"):
        index_channel(tmp_path / "channel")


# --- solving: the virtual packages matter --------------------------------------

def test_conda_lock_default_virtual_packages_are_too_old():
    defaults = conda_lock_defaults()
    assert defaults["__cuda"] == "11.4" and defaults["__glibc"] == "2.28"


@pytest.mark.parametrize("probe, needs", [
    ("ktenv-probe-cuda128", "__cuda >=12.8"),
    ("ktenv-probe-glibc234", "__glibc >=2.34"),
    ("cuda-version 12.8.*", "__cuda >=12"),  # conda-forge's own constraint
])
def test_virtual_package_spec_decides_the_solve(spec, url, probe, needs):
    arch = conda.load_inputs(spec, "sm120", channel_url=url, exclude_newer=None)
    default = conda.CondaInputs("sm120", "linux-64", (url,), (probe,), conda_lock_defaults(), "3.11", "11.4", None)
    with pytest.raises(ResolveError, match="cannot be solved") as err:
        conda.solve(default)
    assert needs in str(err.value) and "__cuda 11.4, __glibc 2.28" in str(err.value)
    records = conda.solve(conda.CondaInputs("sm120", "linux-64", (url,), (probe,), arch.virtual, "3.11", "12.8", None))
    assert probe.split()[0] in [r["name"] for r in records]


# --- the lock -------------------------------------------------------------------

def test_lock_for_every_arch_pins_the_stack_cuda(spec, url, tmp_path):
    needs_host_python(spec)
    for arch in spec.supported_archs():
        path = conda.lock(spec, arch, out_dir=tmp_path / arch, channel_url=url, python=HOST_PY, exclude_newer=None,
                          progress=lambda *_: None)
        pkgs = {p["name"]: p for p in yaml.safe_load(path.read_text())["package"]}
        assert pkgs["cuda-nvcc"]["version"] == "12.8.93"  # 12.9.86 is in the channel too
        assert pkgs["cuda-version"]["version"] == "12.8"
        assert pkgs["gxx_linux-64"]["version"].startswith("13.")
        assert {"python", "cmake", "libhwloc", "libnuma", "numactl", "libstdcxx", "cuda-cudart-dev"} <= set(pkgs)
        assert all(p["hash"]["md5"] and p["hash"]["sha256"] and p["url"].startswith(url) for p in pkgs.values())


def test_lock_is_read_by_conda_lock(spec, url, tmp_path):
    path = conda.lock(spec, "sm120", out_dir=tmp_path, channel_url=url, exclude_newer=None, progress=lambda *_: None)
    ours = {p["name"]: p for p in yaml.safe_load(path.read_text())["package"]}
    parsed = conda_lock_python(
        "import json, sys, pathlib\n"
        "from conda_lock.lockfile import parse_conda_lock_file\n"
        "from conda_lock.virtual_package import virtual_package_repo_from_specification\n"
        "from conda_lock.src_parser.environment_yaml import parse_environment_file\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "lf = parse_conda_lock_file(d / 'conda-lock.yml')\n"
        "vp = virtual_package_repo_from_specification(d / 'conda-virtual-packages.yml')\n"
        "env = parse_environment_file(d / 'conda-environment.yml', platforms=['linux-64'], mapping_url='unused-for-conda-deps')\n"
        "print(json.dumps({'packages': {p.name: [p.version, p.url, p.hash.md5, p.hash.sha256, sorted(p.categories)] for p in lf.package},\n"
        "  'platforms': lf.metadata.platforms,\n"
        "  'virtual': sorted(vp.all_repodata['linux-64']['packages']),\n"
        "  'specs': sorted(f'{x.name} {x.version}'.strip() for x in env.dependencies['linux-64'])}))\n",
        tmp_path, cwd=tmp_path)
    assert parsed["platforms"] == ["linux-64"]
    assert set(parsed["packages"]) == set(ours)
    for name, (version, purl, md5, sha, cats) in parsed["packages"].items():
        assert [version, purl, md5, sha] == [ours[name]["version"], ours[name]["url"], ours[name]["hash"]["md5"], ours[name]["hash"]["sha256"]]
        assert cats == ["main"]
    assert "__cuda-12.8-0.tar.bz2" in parsed["virtual"] and "__glibc-2.35-0.tar.bz2" in parsed["virtual"]
    assert sorted(conda.load_inputs(spec, "sm120", channel_url=url).specs) == parsed["specs"]


def test_conda_lock_renders_an_explicit_file(spec, url, tmp_path):
    """`conda-lock install` renders this before handing it to conda; only the conda executable is missing here."""
    path = conda.lock(spec, "sm89", out_dir=tmp_path, channel_url=url, exclude_newer=None, progress=lambda *_: None)
    proc = subprocess.run([sys.executable, "-I", "-m", "conda_lock", "render", "--kind", "explicit", "-p", "linux-64", path.name],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    explicit = (tmp_path / "conda-linux-64.lock").read_text().splitlines()
    assert "@EXPLICIT" in explicit
    urls = {f"{p['url']}#{p['hash']['md5']}" for p in yaml.safe_load(path.read_text())["package"]}
    assert urls == {line for line in explicit if line.startswith("http")}


def test_lock_is_byte_stable(spec, url, tmp_path):
    a = conda.lock(spec, "sm90", out_dir=tmp_path / "a", channel_url=url, exclude_newer=None, progress=lambda *_: None)
    b = conda.lock(spec, "sm90", out_dir=tmp_path / "b", channel_url=url, exclude_newer=None, progress=lambda *_: None)
    for name in (conda.LOCK_FILE, conda.ENV_FILE, conda.VIRTUAL_FILE):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()


def test_check_notices_a_changed_spec(envs, url, tmp_path):
    spec = specmod.load(envs)
    conda.lock(spec, "sm100", out_dir=tmp_path, channel_url=url, exclude_newer=None, progress=lambda *_: None)
    conda.check(spec, "sm100", tmp_path, channel_url=url)
    with pytest.raises(LockStale, match="channel"):
        conda.check(spec, "sm100", tmp_path)  # the lock came from another channel than envs/conda.toml's
    (envs / "conda.toml").write_text((envs / "conda.toml").read_text().replace('cmake = ">=3.16"', 'cmake = ">=3.20"'))
    with pytest.raises(LockStale, match=r"out of date: envs/conda.toml.*build.py lock --arch sm100 --conda"):
        conda.check(specmod.load(envs), "sm100", tmp_path, channel_url=url)


def test_check_notices_a_changed_stack_cutoff(envs, url, tmp_path):
    # The channel was indexed just now, so only a future cut-off lets it solve.
    stack = (envs / "stack.toml").read_text()
    (envs / "stack.toml").write_text(stack.replace('exclude_newer = "2026-11-20T00:00:00Z"', 'exclude_newer = "2030-01-01T00:00:00Z"'))
    path = conda.lock(specmod.load(envs), "sm90", out_dir=tmp_path, channel_url=url, progress=lambda *_: None)
    meta = yaml.safe_load(path.read_text())["metadata"]["custom_metadata"]
    assert meta["ktenv_exclude_newer"] == "2030-01-01T00:00:00Z" and meta["ktenv_exclude_newer_from"] == "stack"
    conda.check(specmod.load(envs), "sm90", tmp_path, channel_url=url)
    (envs / "stack.toml").write_text(stack.replace('exclude_newer = "2026-11-20T00:00:00Z"', 'exclude_newer = "2031-01-01T00:00:00Z"'))
    with pytest.raises(LockStale, match="cut-off"):
        conda.check(specmod.load(envs), "sm90", tmp_path, channel_url=url)


def test_cutoff_skips_packages_indexed_later(spec, own_channel, tmp_path):
    time.sleep(1.1)
    cutoff = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    time.sleep(1.1)
    conda_channel.make_package(own_channel, "cmake", "3.99.0", "h_ktenv_0", depends=["libgcc >=13"])
    index_channel(own_channel)
    url = own_channel.as_uri()
    with_cut = conda.lock(spec, "sm89", out_dir=tmp_path / "cut", channel_url=url, exclude_newer=cutoff, progress=lambda *_: None)
    without = conda.lock(spec, "sm89", out_dir=tmp_path / "all", channel_url=url, exclude_newer=None, progress=lambda *_: None)
    cmake = lambda p: next(x["version"] for x in yaml.safe_load(p.read_text())["package"] if x["name"] == "cmake")  # noqa: E731
    assert cmake(with_cut) == "3.31.6" and cmake(without) == "3.99.0"
    with pytest.raises(ResolveError, match="cut-off 2026-01-01T00:00:00Z .* stamps every package with its indexing time"):
        conda.lock(spec, "sm89", out_dir=tmp_path / "none", channel_url=url, exclude_newer="2026-01-01T00:00:00Z", progress=lambda *_: None)


# --- building the prefix ----------------------------------------------------------

@pytest.fixture
def locked(spec, url, tmp_path):
    needs_host_python(spec)
    lock_dir = tmp_path / "lock" / "sm120"
    conda.lock(spec, "sm120", out_dir=lock_dir, channel_url=url, python=HOST_PY, exclude_newer=None, progress=lambda *_: None)
    write_requirements(lock_dir, tmp_path / "wheels")
    return lock_dir


def test_build_prefix_end_to_end(spec, url, locked, tmp_path):
    prefix = tmp_path / "env"
    lines = []
    out = condabuild.build_conda_prefix(spec, "sm120", prefix, channel_url=url, progress=lines.append,
                                   lock_dir=locked, cache_dir=tmp_path / "cache")
    assert out == prefix.resolve()
    lock = {p["name"]: p for p in yaml.safe_load((locked / conda.LOCK_FILE).read_text())["package"]}
    # every locked package is installed, recorded under the lock's URL
    recorded = {json.loads(m.read_text())["name"]: json.loads(m.read_text()) for m in (prefix / "conda-meta").glob("*.json")}
    assert set(recorded) == set(lock)
    assert all(recorded[n]["url"] == lock[n]["url"] and recorded[n]["version"] == lock[n]["version"] for n in lock)
    # conda's prefix placeholder was rewritten to the real prefix
    nvcc = subprocess.run([str(prefix / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True).stdout
    assert "release 12.8, V12.8.93" in nvcc
    assert str(prefix.resolve()) in (prefix / "bin" / "nvcc").read_text()
    assert (prefix / "lib/pkgconfig/hwloc.pc").read_text().startswith(f"prefix={prefix.resolve()}\n")
    if shutil.which("pkg-config"):
        got = subprocess.run(["pkg-config", "--variable=prefix", "hwloc"], capture_output=True, text=True, check=True,
                             env={"PKG_CONFIG_PATH": str(prefix / "lib/pkgconfig"), "PATH": "/usr/bin:/bin"}).stdout.strip()
        assert got == str(prefix.resolve())
    # the PyPI layer is in the conda python's site-packages and imports
    probe = ("import sys, ktenv_probe_pkg; print(sys.prefix); print(ktenv_probe_pkg.VALUE); "
             "print(ktenv_probe_pkg.__file__)")
    got = subprocess.run([str(prefix / "bin/python"), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert got[0] == str(prefix.resolve()) and got[1] == "42"
    assert got[2].startswith(str(prefix.resolve() / "lib" / f"python{HOST_PY}" / "site-packages"))
    # the stand-in CUDA runtime is a real shared library and loads from the prefix
    if (prefix / "lib/libcudart.so.12").exists():
        load = ("import ctypes, sys; lib = ctypes.CDLL(sys.prefix + '/lib/libcudart.so'); v = ctypes.c_int(); "
                "lib.cudaRuntimeGetVersion(ctypes.byref(v)); print(v.value)")
        assert subprocess.run([str(prefix / "bin/python"), "-c", load], capture_output=True, text=True, check=True).stdout.strip() == "12080"
    stamp = json.loads((prefix / conda.STAMP).read_text())
    assert stamp["state"] == "complete" and stamp["arch"] == "sm120"
    assert any("PyPI layer" in line for line in lines)
    # a second build replaces the prefix it made before
    (prefix / "leftover").write_text("x")
    condabuild.build_conda_prefix(spec, "sm120", prefix, channel_url=url, progress=lambda *_: None, lock_dir=locked, cache_dir=tmp_path / "cache")
    assert not (prefix / "leftover").exists() and (prefix / "bin/python").exists()


def test_pypi_layer_failure_and_hook(spec, url, locked, tmp_path):
    req = locked / "requirements.txt"
    good = req.read_text()
    req.write_text(good.replace("--hash=sha256:", "--hash=sha256:0000"))  # a wheel that is not the locked one
    prefix = tmp_path / "env"
    with pytest.raises(KtenvError, match=r"uv could not install the PyPI layer .* The conda packages are in place"):
        condabuild.build_conda_prefix(spec, "sm120", prefix, channel_url=url, progress=lambda *_: None,
                                 lock_dir=locked, cache_dir=tmp_path / "cache")
    assert json.loads((prefix / conda.STAMP).read_text())["state"] == "building"  # not taken for a finished env
    req.write_text(good)
    calls = []

    def pypi_layer(python, where):
        calls.append((python, where))
        subprocess.run([tools.uv_bin(), "pip", "sync", "--python", str(python), str(req)], check=True, capture_output=True)

    condabuild.build_conda_prefix(spec, "sm120", prefix, channel_url=url, progress=lambda *_: None, lock_dir=locked,
                             cache_dir=tmp_path / "cache", pypi_layer=pypi_layer)
    assert calls == [(prefix.resolve() / "bin/python", prefix.resolve())]
    assert json.loads((prefix / conda.STAMP).read_text())["state"] == "complete"


@pytest.mark.parametrize("how", ["http", "file"])
def test_tampered_package_is_refused(spec, own_channel, tmp_path, how):
    needs_host_python(spec)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(serve(own_channel)) if how == "http" else own_channel.as_uri()
        lock_dir = tmp_path / "lock"
        conda.lock(spec, "sm120", out_dir=lock_dir, channel_url=url, python=HOST_PY, exclude_newer=None, progress=lambda *_: None)
        write_requirements(lock_dir, tmp_path / "wheels")
        # The channel now serves other bytes under the locked file name.
        shutil.copy(own_channel / "linux-64/cuda-nvcc-12.9.86-h_ktenv_0.conda", own_channel / "linux-64/cuda-nvcc-12.8.93-h_ktenv_0.conda")
        prefix = tmp_path / "env"
        with pytest.raises(KtenvError, match=r"cuda-nvcc-12.8.93-h_ktenv_0.conda does not match the lock: sha256 .*Nothing was installed"):
            condabuild.build_conda_prefix(spec, "sm120", prefix, channel_url=url, progress=lambda *_: None,
                                     lock_dir=lock_dir, cache_dir=tmp_path / "cache")
        assert not prefix.exists()


@pytest.mark.parametrize("override, message", [
    ({"CONDA_OVERRIDE_GLIBC": "2.31"}, r"This host's glibc supports 2.31, but the conda lock .* __glibc 2.35"),
    ({"CONDA_OVERRIDE_CUDA": "12.4"}, r"This host's CUDA driver supports 12.4, but the conda lock .* __cuda 12.8.*Update the NVIDIA driver"),
])
def test_host_older_than_the_lock_is_refused(spec, url, locked, tmp_path, monkeypatch, override, message):
    for k, v in override.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(KtenvError, match=message):
        condabuild.build_conda_prefix(spec, "sm120", tmp_path / "env", channel_url=url, progress=lambda *_: None,
                                 lock_dir=locked, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "env").exists()


def test_foreign_prefix_is_not_deleted(spec, url, locked, tmp_path):
    prefix = tmp_path / "mine"
    prefix.mkdir()
    (prefix / "precious.txt").write_text("keep")
    with pytest.raises(KtenvError, match="was not made by ktenv's conda backend"):
        condabuild.build_conda_prefix(spec, "sm120", prefix, channel_url=url, progress=lambda *_: None,
                                 lock_dir=locked, cache_dir=tmp_path / "cache")
    assert (prefix / "precious.txt").read_text() == "keep"


def test_missing_or_stale_locks_are_refused(envs, url, locked, tmp_path):
    spec = specmod.load(envs)
    (locked / "requirements.txt").rename(locked / "elsewhere.txt")
    with pytest.raises(KtenvError, match=r"no PyPI lock for sm120. Write it first: python build.py lock --arch sm120"):
        condabuild.build_conda_prefix(spec, "sm120", tmp_path / "env", channel_url=url, progress=lambda *_: None, lock_dir=locked)
    (locked / "elsewhere.txt").rename(locked / "requirements.txt")
    with pytest.raises(KtenvError, match=r"no conda lock. Write it with"):
        condabuild.build_conda_prefix(spec, "sm120", tmp_path / "env", channel_url=url, progress=lambda *_: None, lock_dir=tmp_path / "nothing")
    (envs / "conda.toml").write_text((envs / "conda.toml").read_text().replace('numactl = "*"', 'numactl = ">=2"'))
    with pytest.raises(LockStale):
        condabuild.build_conda_prefix(specmod.load(envs), "sm120", tmp_path / "env", channel_url=url, progress=lambda *_: None, lock_dir=locked)
    assert not (tmp_path / "env").exists()


def test_lock_entry_without_hash_is_refused(spec, url, locked, tmp_path):
    text = (locked / conda.LOCK_FILE).read_text()
    doc = yaml.safe_load(text)
    doc["package"][0]["hash"].pop("sha256")
    (locked / conda.LOCK_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(KtenvError, match=f"the entry for {doc['package'][0]['name']} lacks an md5 and sha256"):
        condabuild.build_conda_prefix(spec, "sm120", tmp_path / "env", channel_url=url, progress=lambda *_: None, lock_dir=locked)


def test_python_that_is_not_the_prefix_is_refused(spec, own_channel, tmp_path):
    """A python whose sys.prefix is elsewhere would make uv install the PyPI layer outside the env."""
    needs_host_python(spec)
    version, files = conda_channel.python_shim(sys.executable, venv_cfg=False)
    conda_channel.make_package(own_channel, "python", version, "h_ktenv_0", depends=["__glibc >=2.17,<3.0.a0", "libgcc >=13"], files=files)
    index_channel(own_channel, force=True)
    url = own_channel.as_uri()
    lock_dir = tmp_path / "lock"
    conda.lock(spec, "sm120", out_dir=lock_dir, channel_url=url, python=HOST_PY, exclude_newer=None, progress=lambda *_: None)
    write_requirements(lock_dir, tmp_path / "wheels")
    with pytest.raises(KtenvError, match=r"reports sys.prefix .*uv would install the PyPI layer into another environment"):
        condabuild.build_conda_prefix(spec, "sm120", tmp_path / "env", channel_url=url, progress=lambda *_: None,
                                 lock_dir=lock_dir, cache_dir=tmp_path / "cache")


@pytest.mark.network
def test_pypi_layer_from_pypi(spec, url, tmp_path):
    """The PyPI layer from the real index: a hash-locked wheel uv downloads into the conda prefix."""
    needs_host_python(spec)
    lock_dir = tmp_path / "lock"
    conda.lock(spec, "sm89", out_dir=lock_dir, channel_url=url, python=HOST_PY, exclude_newer=None, progress=lambda *_: None)
    (tmp_path / "in.txt").write_text("six==1.17.0\n")
    subprocess.run([tools.uv_bin(), "pip", "compile", str(tmp_path / "in.txt"), "--generate-hashes", "--python-version", HOST_PY,
                    "-q", "-o", str(lock_dir / "requirements.txt")], check=True)
    prefix = condabuild.build_conda_prefix(spec, "sm89", tmp_path / "env", channel_url=url, progress=lambda *_: None, lock_dir=lock_dir)
    got = subprocess.run([str(prefix / "bin/python"), "-c", "import six, sys; print(six.__version__, sys.prefix)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert got == ["1.17.0", str(prefix)]


# --- the same lock with the conda tools, where they exist ------------------------

def test_micromamba_installs_the_lock(spec, url, tmp_path):
    exe = shutil.which("micromamba")
    if not exe:
        pytest.skip("no micromamba executable on this machine (none installs from PyPI or Debian); "
                    "the lock is checked with conda-lock's own parser and renderer instead")
    path = conda.lock(spec, "sm120", out_dir=tmp_path, channel_url=url, exclude_newer=None, progress=lambda *_: None)
    subprocess.run([exe, "create", "-y", "-p", str(tmp_path / "mm"), "-f", str(path)], check=True)
    assert (tmp_path / "mm/bin/nvcc").exists()


def test_conda_lock_solves_the_same(spec, url, tmp_path):
    exe = next((shutil.which(x) for x in ("micromamba", "mamba", "conda") if shutil.which(x)), None)
    if not exe:
        pytest.skip("conda-lock's solver shells out to conda/mamba/micromamba, and none is installed here")
    ours = conda.lock(spec, "sm120", out_dir=tmp_path, channel_url=url, exclude_newer=None, progress=lambda *_: None)
    subprocess.run([sys.executable, "-I", "-m", "conda_lock", "lock", "--conda", exe, "-f", conda.ENV_FILE,
                    "--virtual-package-spec", conda.VIRTUAL_FILE, "-p", "linux-64", "--lockfile", "theirs.yml"],
                   cwd=tmp_path, check=True)
    pick = lambda p: {(x["name"], x["version"]) for x in yaml.safe_load(p.read_text())["package"]}  # noqa: E731
    assert pick(ours) == pick(tmp_path / "theirs.yml")
