"""The conda lock: envs/conda.toml solved per arch, with the PyPI lock as pip entries.

No conda channel is reachable here, so tests/conda_channel.py builds a local
one of real .conda archives in conda-forge's layout (indexed by rattler,
served over HTTP); the solve, the lock, the pip entries (uv's file listing
of the PyPI lock) and the error paths are the real code. conda-lock's own
parser and renderer read the result.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

import conda_channel
from conda_fixtures import HOST_PY, channel, envs, needs_host_python, own_channel, pypi_lock, spec, url  # noqa: F401
from conftest import REPO
from ktenv import spec as specmod
from ktenv.errors import KtenvError, LockStale, ResolveError, SpecError
from ktenv.lock import conda
from ktenv.lock.conda_pip import _pick, pip_entries, platform_tags, tag_priority
from ktenv.lock.rattler import index_channel


@pytest.fixture
def out(tmp_path):
    """A lock directory holding a small PyPI lock (one local wheel), as `lock --conda` expects."""
    d = tmp_path / "lock" / "sm90"
    pypi_lock(d, tmp_path / "wheels")
    return d


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
        pypi_lock(tmp_path / arch, tmp_path / "wheels")
        path = conda.lock(spec, arch, out_dir=tmp_path / arch, channel_url=url, python=HOST_PY, exclude_newer=None,
                          progress=lambda *_: None)
        pkgs = {p["name"]: p for p in yaml.safe_load(path.read_text())["package"]}
        assert pkgs["cuda-nvcc"]["version"] == "12.8.93"  # 12.9.86 is in the channel too
        assert pkgs["cuda-version"]["version"] == "12.8"
        assert pkgs["gxx_linux-64"]["version"].startswith("13.")
        assert {"python", "cmake", "libhwloc", "libnuma", "numactl", "libstdcxx", "cuda-cudart-dev"} <= set(pkgs)
        assert all(p["hash"]["md5"] and p["hash"]["sha256"] and p["url"].startswith(url) for p in pkgs.values() if p["manager"] == "conda")
        assert pkgs["ktenv-probe-pkg"]["manager"] == "pip" and pkgs["ktenv-probe-pkg"]["hash"]["sha256"]
        # pip is in both layers' specs; it comes from conda, at the PyPI lock's version, and is no pip entry
        assert pkgs["pip"]["manager"] == "conda"
        assert pkgs["pip"]["version"] == conda_channel.pip_wheel(tmp_path / "wheels").name.split("-")[1]


def test_a_package_both_layers_name_comes_from_conda_at_the_pypi_version(spec, url, out, envs, tmp_path):
    needs_host_python(spec)
    # `{locked}` needs the name in the PyPI lock
    bare = tmp_path / "bare" / "sm90"
    pypi_lock(bare, tmp_path / "wheels", pip=False)
    with pytest.raises(SpecError, match=r"the spec of pip is `\{locked\}`, but .*requirements.txt pins no pip"):
        conda.load_inputs(spec, "sm90", lock_dir=bare)
    with pytest.raises(KtenvError, match=r"the spec of pip is `\{locked\}`.*there is no such file.*build.py lock --arch sm90"):
        conda.load_inputs(spec, "sm90", lock_dir=tmp_path / "nowhere")
    # Two versions of one package in the two layers: refused, naming both
    (envs / "conda.toml").write_text((envs / "conda.toml").read_text().replace('pip = "=={locked}"', 'pip = "*"'))
    other = tmp_path / "other" / "sm90"
    pypi_lock(other, tmp_path / "w99", extra=[conda_channel.make_wheel(tmp_path / "w99", "pip", "99.0")], pip=False)
    with pytest.raises(ResolveError, match=r"both install pip \S+ \(conda\) vs 99.0 \(PyPI lock\).*`==\{locked\}`"):
        conda.lock(specmod.load(envs), "sm90", out_dir=other, channel_url=url, python=HOST_PY, exclude_newer=None,
                   progress=lambda *_: None)


def test_pypi_layer_leaves_out_what_conda_provides(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# header\n--no-index\naaa==1.0 \\\n    --hash=sha256:aa\n    # via x\n"
                   "pip==26.3 \\\n    --hash=sha256:p1 \\\n    --hash=sha256:p2\n    # via (root)\n"
                   "zzz==2.0 ; python_version >= '3.11' \\\n    --hash=sha256:zz\n")
    doc = {"package": [{"name": "pip", "version": "26.3", "manager": "conda"},
                       {"name": "python", "version": "3.11.7", "manager": "conda"},
                       {"name": "aaa", "version": "1.0", "manager": "pip"}]}
    assert conda.from_conda(doc, req) == {"pip": "26.3"}
    assert conda.pypi_layer(doc, req) == ("# header\n--no-index\naaa==1.0 \\\n    --hash=sha256:aa\n    # via x\n"
                                          "zzz==2.0 ; python_version >= '3.11' \\\n    --hash=sha256:zz\n")


def test_lock_is_read_by_conda_lock(out, spec, url, tmp_path):
    path = conda.lock(spec, "sm120", out_dir=out, channel_url=url, exclude_newer=None, progress=lambda *_: None)
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
        out, cwd=tmp_path)
    assert parsed["platforms"] == ["linux-64"]
    assert set(parsed["packages"]) == set(ours)
    for name, (version, purl, md5, sha, cats) in parsed["packages"].items():
        assert [version, purl, md5, sha] == [ours[name]["version"], ours[name]["url"], ours[name]["hash"].get("md5"), ours[name]["hash"]["sha256"]]
        assert cats == ["main"]
    # the PyPI layer is in the same file: the probe wheel as a pip entry, and pip to install it with
    assert ours["ktenv-probe-pkg"]["manager"] == "pip" and ours["ktenv-probe-pkg"]["url"].endswith("ktenv_probe_pkg-0.1.0-py3-none-any.whl")
    assert ours["pip"]["manager"] == "conda"
    assert "__cuda-12.8-0.tar.bz2" in parsed["virtual"] and "__glibc-2.35-0.tar.bz2" in parsed["virtual"]
    # conda-lock writes an exact version without "==" (a plain conda version is exact)
    ours_specs = sorted(x.replace(" ==", " ") for x in conda.load_inputs(spec, "sm120", channel_url=url, lock_dir=out).specs)
    assert ours_specs == parsed["specs"]
    assert f"pip {ours['pip']['version']}" in parsed["specs"]  # pip at the PyPI lock's version, from conda


def test_conda_lock_renders_an_explicit_file(out, spec, url, tmp_path):
    """`conda-lock install` renders this before handing it to conda; only the conda executable is missing here."""
    path = conda.lock(spec, "sm89", out_dir=out, channel_url=url, exclude_newer=None, progress=lambda *_: None)
    proc = subprocess.run([sys.executable, "-I", "-m", "conda_lock", "render", "--kind", "explicit", "-p", "linux-64", path.name],
                          capture_output=True, text=True, cwd=out)
    assert proc.returncode == 0, proc.stderr
    explicit = (out / "conda-linux-64.lock").read_text().splitlines()
    assert "@EXPLICIT" in explicit
    pkgs = yaml.safe_load(path.read_text())["package"]
    urls = {f"{p['url']}#{p['hash']['md5']}" for p in pkgs if p["manager"] == "conda"}
    assert urls == {line for line in explicit if line.startswith("http")}
    # every pip entry is rendered for `conda-lock install` to hand to pip, with its sha256
    pips = {f"# pip {p['name']} @ {p['url']}#sha256={p['hash']['sha256']}" for p in pkgs if p["manager"] == "pip"}
    assert pips and pips == {line for line in explicit if line.startswith("# pip ")}


def test_lock_is_byte_stable(spec, url, tmp_path):
    for d in ("a", "b"):
        pypi_lock(tmp_path / d, tmp_path / "wheels")
    a = conda.lock(spec, "sm90", out_dir=tmp_path / "a", channel_url=url, exclude_newer=None, progress=lambda *_: None)
    b = conda.lock(spec, "sm90", out_dir=tmp_path / "b", channel_url=url, exclude_newer=None, progress=lambda *_: None)
    for name in (conda.LOCK_FILE, conda.ENV_FILE, conda.VIRTUAL_FILE):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()


def test_check_notices_a_changed_spec(out, envs, url, tmp_path):
    spec = specmod.load(envs)
    conda.lock(spec, "sm100", out_dir=out, channel_url=url, exclude_newer=None, progress=lambda *_: None)
    conda.check(spec, "sm100", out, channel_url=url)
    with pytest.raises(LockStale, match="channel"):
        conda.check(spec, "sm100", out)  # the lock came from another channel than envs/conda.toml's
    (envs / "conda.toml").write_text((envs / "conda.toml").read_text().replace('cmake = ">=3.16"', 'cmake = ">=3.20"'))
    with pytest.raises(LockStale, match=r"out of date: envs/conda.toml.*build.py lock --arch sm100 --conda"):
        conda.check(specmod.load(envs), "sm100", out, channel_url=url)


def test_check_notices_a_changed_stack_cutoff(out, envs, url, tmp_path):
    # The channel was indexed just now, so only a future cut-off lets it solve.
    stack = (envs / "stack.toml").read_text()
    (envs / "stack.toml").write_text(stack.replace('exclude_newer = "2026-11-20T00:00:00Z"', 'exclude_newer = "2030-01-01T00:00:00Z"'))
    path = conda.lock(specmod.load(envs), "sm90", out_dir=out, channel_url=url, progress=lambda *_: None)
    meta = yaml.safe_load(path.read_text())["metadata"]["custom_metadata"]
    assert meta["ktenv_exclude_newer"] == "2030-01-01T00:00:00Z" and meta["ktenv_exclude_newer_from"] == "stack"
    conda.check(specmod.load(envs), "sm90", out, channel_url=url)
    (envs / "stack.toml").write_text(stack.replace('exclude_newer = "2026-11-20T00:00:00Z"', 'exclude_newer = "2031-01-01T00:00:00Z"'))
    with pytest.raises(LockStale, match="cut-off"):
        conda.check(specmod.load(envs), "sm90", out, channel_url=url)


def test_cutoff_skips_packages_indexed_later(spec, own_channel, tmp_path):
    time.sleep(1.1)
    cutoff = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    time.sleep(1.1)
    conda_channel.make_package(own_channel, "cmake", "3.99.0", "h_ktenv_0", depends=["libgcc >=13"])
    index_channel(own_channel)
    url = own_channel.as_uri()
    for d in ("cut", "all", "none"):
        pypi_lock(tmp_path / d, tmp_path / "wheels")
    with_cut = conda.lock(spec, "sm89", out_dir=tmp_path / "cut", channel_url=url, exclude_newer=cutoff, progress=lambda *_: None)
    without = conda.lock(spec, "sm89", out_dir=tmp_path / "all", channel_url=url, exclude_newer=None, progress=lambda *_: None)
    cmake = lambda p: next(x["version"] for x in yaml.safe_load(p.read_text())["package"] if x["name"] == "cmake")  # noqa: E731
    assert cmake(with_cut) == "3.31.6" and cmake(without) == "3.99.0"
    with pytest.raises(conda.CutoffExcluded, match=r"solve from .*but not with what was published before the cut-off "
                       r"2026-01-01T00:00:00Z: the solution needs .*cmake 3\.99\.0 .*--exclude-newer none"):
        conda.lock(spec, "sm89", out_dir=tmp_path / "none", channel_url=url, exclude_newer="2026-01-01T00:00:00Z", progress=lambda *_: None)




# --- errors: unreachable, unsolvable, cut-off, each named ------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_channel_is_named_as_such(spec, out):
    dead = f"http://127.0.0.1:{_closed_port()}/conda-forge"
    with pytest.raises(conda.ChannelUnreachable, match=r"(?s)Cannot reach the conda channel http://127.0.0.1:\d+/conda-forge "
                       r"from this machine.*--channel URL.*Connection refused"):
        conda.lock(spec, "sm90", out_dir=out, channel_url=dead, exclude_newer=None, progress=lambda *_: None)
    assert not (out / conda.LOCK_FILE).exists()


def test_a_folder_that_is_no_channel_is_named(spec, out, tmp_path):
    with pytest.raises(ResolveError, match="not with a conda index"), serve_dir(tmp_path) as u:
        conda.lock(spec, "sm90", out_dir=out, channel_url=u, exclude_newer=None, progress=lambda *_: None)


def serve_dir(path):
    from conda_fixtures import serve

    (path / "empty").mkdir(exist_ok=True)
    return serve(path / "empty")


def test_unsolvable_specs_are_named_as_such(envs, url, out):
    (envs / "conda.toml").write_text((envs / "conda.toml").read_text().replace('cmake = ">=3.16"', 'cmake = ">=99"'))
    with pytest.raises(ResolveError, match=r"(?s)cannot be solved from .* the specs contradict each other or the channel "
                       r"lacks a version.*cmake.*Change the specs in envs/conda.toml") as err:
        conda.lock(specmod.load(envs), "sm90", out_dir=out, channel_url=url, exclude_newer=None, progress=lambda *_: None)
    assert not isinstance(err.value, (conda.ChannelUnreachable, conda.CutoffExcluded))


@pytest.mark.parametrize("given, want", [
    (None, "stack"), ("none", None), ("NONE", None), ("2026-11-20", "2026-11-20T00:00:00Z"),
    ("2026-11-20T12:30:00+02:00", "2026-11-20T10:30:00Z"), ("2026-11-20T00:00:00Z", "2026-11-20T00:00:00Z"),
])
def test_exclude_newer_values(given, want):
    assert conda.parse_exclude_newer(given) == want


def test_exclude_newer_garbage_is_refused():
    with pytest.raises(KtenvError, match="neither `none` nor a date"):
        conda.parse_exclude_newer("last tuesday")


def test_cli_exclude_newer_needs_conda():
    from conftest import run_cli
    from ktenv import cli

    args = cli.parser().parse_args(["lock", "--arch", "sm90", "--conda", "--exclude-newer", "none", "--python", "3.12"])
    assert (args.exclude_newer, args.python, args.conda) == ("none", "3.12", True)
    p = run_cli("lock", "--arch", "sm90", "--exclude-newer", "none")
    assert p.returncode == 2 and "use them with --conda" in p.stderr


# --- pip entries ---------------------------------------------------------------------

def test_platform_tags_walk_down_to_manylinux1():
    tags_ = platform_tags("x86_64-manylinux_2_35")
    assert tags_[0] == "manylinux_2_35_x86_64" and "manylinux2014_x86_64" in tags_ and tags_[-1] == "linux_x86_64"
    assert tags_.index("manylinux_2_28_x86_64") < tags_.index("manylinux_2_17_x86_64")


def _wheel(name, sha):
    return {"url": f"https://files.example/{name}", "hashes": {"sha256": sha}}


def test_the_wheel_pip_would_pick_is_the_entry():
    rank = tag_priority("3.11", "x86_64-manylinux_2_35")
    pkg = {"name": "aiohttp", "version": "3.14.5",
           "sdist": {"url": "https://files.example/aiohttp-3.14.5.tar.gz", "hashes": {"sha256": "s"}},
           "wheels": [_wheel("aiohttp-3.14.5-py3-none-any.whl", "any"),
                      _wheel("aiohttp-3.14.5-cp312-cp312-manylinux_2_17_x86_64.whl", "cp312"),
                      _wheel("aiohttp-3.14.5-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", "cp311"),
                      _wheel("aiohttp-3.14.5-cp311-cp311-manylinux_2_39_x86_64.whl", "too-new-glibc")]}
    everything = {"s", "any", "cp312", "cp311", "too-new-glibc"}
    assert _pick(pkg, rank, everything)[1:] == ("cp311", "wheel")
    # a wheel the PyPI lock does not vouch for is never chosen
    assert _pick(pkg, rank, everything - {"cp311"})[1:] == ("any", "wheel")
    assert _pick(pkg, rank, {"s"})[1:] == ("s", "sdist")
    with pytest.raises(ResolveError, match="no file the PyPI lock vouches for"):
        _pick(pkg, rank, {"too-new-glibc", "cp312"})


def test_pip_entries_follow_the_pypi_lock(tmp_path):
    d = tmp_path / "sm90"
    pypi_lock(d, tmp_path / "wheels")
    entries = pip_entries(d, "3.11", "linux-64")
    pip_version = conda_channel.pip_wheel(tmp_path / "wheels").name.split("-")[1]
    assert [(e["name"], e["version"], e["manager"]) for e in entries] == [("ktenv-probe-pkg", "0.1.0", "pip"),
                                                                          ("pip", pip_version, "pip")]
    assert all(e["hash"]["sha256"] in (d / "requirements.txt").read_text() for e in entries)
    with pytest.raises(KtenvError, match="made for Python 3.11 or 3.12, not 3.10"):
        pip_entries(d, "3.10", "linux-64")


def test_check_notices_a_relocked_pypi_layer(out, spec, url, tmp_path):
    conda.lock(spec, "sm90", out_dir=out, channel_url=url, exclude_newer=None, progress=lambda *_: None)
    conda.check(spec, "sm90", out, channel_url=url)
    pypi_lock(out, tmp_path / "wheels", extra=[conda_channel.make_wheel(tmp_path / "wheels", "ktenv_other", "1.0")])
    with pytest.raises(LockStale, match="its pip entries were made from another .*requirements.txt.*--conda"):
        conda.check(spec, "sm90", out, channel_url=url)


@pytest.mark.network
def test_pip_entries_of_the_real_lock():
    """Every package of lock/sm90 gets the file pip would install on CPython 3.11, manylinux_2_35."""
    entries = {e["name"]: e for e in pip_entries(REPO / "lock" / "sm90", "3.11", "linux-64")}
    from ktenv.lock import model

    lock = model.read(REPO / "lock" / "sm90")
    assert set(entries) == {e.name for e in lock.entries()}
    torch = entries["torch"]
    assert torch["version"] == lock.version_of("torch") and "-cp311-cp311-manylinux" in torch["url"]
    hashes = {e.name: {h.split(":", 1)[1] for h in e.hashes} for e in lock.entries()}
    assert all(e["hash"]["sha256"] in hashes[n] for n, e in entries.items())
