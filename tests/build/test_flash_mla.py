"""flash_mla for sm90 (ktenv/build/flash_mla.py): the pin, the source and CUTLASS checks, the toolkit gates,
the SASS audit, the git shim, the "cannot serve" message, and the real build.

The real build needs a FlashMLA checkout (GitHub is not reachable from CI) and a
CUDA toolkit whose major matches the python's torch. Set:
  KTENV_FLASH_MLA_SOURCE     a FlashMLA checkout at the commit envs/sm90.toml pins
  KTENV_FLASH_MLA_CUTLASS    CUTLASS at the pinned commit, when the checkout's csrc/cutlass is empty
  KTENV_FLASH_MLA_PYTHON     the python to build for (default: the stack env's, torch 2.9.1+cu128)
  KTENV_FLASH_MLA_CUDA_HOME  a toolkit for that torch: same major, >= 12.8 (none on PyPI for CUDA 12)
  KTENV_TEST_CUDA12_HOME     a real CUDA 12.x toolkit for the version gate (12.4 must be refused); default:
                             one the toolchain stage provisioned under ktenv's cache
Without them those tests skip and say which is absent.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, cuda12_home, cuda13_home
from ktenv import spec as specmod
from ktenv.build import flash_mla as fm
from ktenv.check.cuobjdump import find_cuobjdump
from ktenv.errors import KtenvError, SpecError


@pytest.fixture(scope="module")
def spec():
    return specmod.load(REPO / "envs")


@pytest.fixture(scope="module")
def pin(spec):
    return fm.pin_for(spec.arch("sm90"))


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_AUTHOR_DATE="2026-01-01T00:00:00Z", GIT_COMMITTER_DATE="2026-01-01T00:00:00Z")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout.strip()


CUTLASS_LINK = "147f5673d0c1c3dcf66f78d677fd647e4a020219"


def _flashmla_like(root: Path, body: str = "kernel v1") -> tuple[Path, str]:
    """A git repo shaped like FlashMLA (setup.py, csrc/ with a cutlass gitlink, flash_mla/); returns (repo, commit)."""
    root.mkdir(parents=True)
    _git(root, "init", "-q")
    (root / "setup.py").write_text("print('setup')\n")
    (root / "csrc" / "sm90").mkdir(parents=True)
    (root / "csrc" / "sm90" / "k.cu").write_text(body + "\n")
    (root / "csrc" / "run.sh").write_text("#!/bin/sh\n")
    (root / "csrc" / "run.sh").chmod(0o755)
    (root / "csrc" / "link.h").symlink_to("sm90/k.cu")
    (root / "flash_mla").mkdir()
    (root / "flash_mla" / "flash_mla_interface.py").write_text("x = 1\n")
    (root / "flash_mla" / "__init__.py").write_text("")
    _git(root, "add", "-A")
    _git(root, "update-index", "--add", "--cacheinfo", f"160000,{CUTLASS_LINK},csrc/cutlass")
    _git(root, "commit", "-q", "-m", "c")
    return root, _git(root, "rev-parse", "HEAD")


def _pin_for_repo(pin: fm.Pin, repo: Path, commit: str) -> fm.Pin:
    trees = {rel: _git(repo, "rev-parse", f"{commit}:{rel}") for rel in ("setup.py", "csrc", "flash_mla")}
    return dataclasses.replace(pin, commit=commit, trees=trees)


# --- the pin -------------------------------------------------------------------------

def test_sm90_pins_flash_mla_as_required_with_its_reason(spec, pin):
    assert pin.required and pin.sass == ("sm_90a",) and pin.min_cuda == "12.8"
    assert re.fullmatch(r"[0-9a-f]{40}", pin.commit) and pin.cutlass_commit == CUTLASS_LINK
    assert set(pin.trees) == {"setup.py", "csrc", "flash_mla"} and set(pin.cutlass_trees) == {"include", "tools/util/include"}
    assert pin.build_env == {"FLASH_MLA_DISABLE_SM100": "1"}
    assert "no fallback" in pin.reason.lower() or "does not avoid" in pin.reason
    assert fm.pin_for(spec.arch("sm89")) is None and fm.pin_for(spec.arch("sm120")) is None
    assert spec.arch("sm90").paths["sparse_mla"] == "flash_mla"


def test_the_import_tier_treats_flash_mla_as_required(spec):
    need = spec.knowledge.loaders.paths[("sparse_mla", "flash_mla")]
    assert need.required is True and not need.fallback
    assert {"flash_mla:get_mla_metadata", "flash_mla:flash_mla_with_kvcache"} <= set(need.symbols)
    assert "--flash-mla-source" in need.remedy and "cannot serve DeepSeek-V4" in need.remedy


@pytest.mark.parametrize("old, new, says", [
    ('commit = "9241ae3ef9bac614dd25e45e507e089f888280e0"', 'commit = "9241ae3"', "not a 40-digit git object id"),
    ('sass = ["sm_90a"]', 'sass = "sm_90a"', "[flash_mla].sass must be a list"),
    ('commit = "147f5673d0c1c3dcf66f78d677fd647e4a020219"\n', '\n', "[flash_mla.cutlass].commit is missing"),
])
def test_a_broken_pin_is_a_spec_error(envs_copy, old, new, says):
    path = envs_copy / "sm90.toml"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(SpecError, match=re.escape(says)):
        fm.pin_for(specmod.load(envs_copy).arch("sm90"))


def test_an_unknown_top_level_table_is_still_refused(envs_copy):
    path = envs_copy / "sm90.toml"
    path.write_text(path.read_text() + "\n[flash_mla_typo]\nx = 1\n")
    with pytest.raises(SpecError, match="unknown key"):
        specmod.load(envs_copy)


# --- what the source is ---------------------------------------------------------------

def test_tree_id_is_gits_object_id(tmp_path):
    repo, commit = _flashmla_like(tmp_path / "r")
    for rel in ("setup.py", "flash_mla", "csrc/sm90"):
        assert fm.tree_id(repo / rel) == _git(repo, "rev-parse", f"{commit}:{rel}")
    # csrc holds an executable, a symlink and the gitlink (absent on disk, as in an archive)
    assert fm.tree_id(repo / "csrc", {"cutlass": CUTLASS_LINK}) == _git(repo, "rev-parse", f"{commit}:csrc")
    # build output that upstream's .gitignore names does not change the identity
    (repo / "flash_mla" / "cuda.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\0")
    (repo / "flash_mla" / "__pycache__").mkdir()
    (repo / "flash_mla" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert fm.tree_id(repo / "flash_mla") == _git(repo, "rev-parse", f"{commit}:flash_mla")


def test_the_pinned_revision_is_accepted_with_and_without_git(tmp_path, pin):
    repo, commit = _flashmla_like(tmp_path / "r")
    p = _pin_for_repo(pin, repo, commit)
    assert fm.check_source(repo, p)["identified_by"] == "git HEAD"
    archive = tmp_path / "archive"
    shutil.copytree(repo, archive, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    assert fm.check_source(archive, p)["identified_by"] == "file contents"


def test_another_revision_is_refused_naming_both_commits(tmp_path, pin):
    repo, first = _flashmla_like(tmp_path / "r")
    p = _pin_for_repo(pin, repo, first)
    (repo / "csrc" / "sm90" / "k.cu").write_text("kernel v2\n")
    _git(repo, "commit", "-q", "-am", "v2")
    second = _git(repo, "rev-parse", "HEAD")
    with pytest.raises(KtenvError) as e:
        fm.check_source(repo, p)
    msg = str(e.value)
    assert f"at commit {second[:12]}" in msg and f"ktenv builds {first[:12]}" in msg and f"checkout {first}" in msg
    assert "nothing was built" in msg


def test_local_edits_at_the_pinned_commit_are_refused(tmp_path, pin):
    repo, commit = _flashmla_like(tmp_path / "r")
    p = _pin_for_repo(pin, repo, commit)
    (repo / "csrc" / "sm90" / "k.cu").write_text("patched\n")
    with pytest.raises(KtenvError, match=r"has local changes\s+in csrc"):
        fm.check_source(repo, p)
    shutil.rmtree(repo / ".git")
    with pytest.raises(KtenvError, match=r"The files of .* \(csrc\) are not those of FlashMLA commit"):
        fm.check_source(repo, p)


def test_a_directory_that_is_not_flashmla_is_refused(tmp_path, pin):
    with pytest.raises(KtenvError, match="is not a FlashMLA checkout"):
        fm.check_source(tmp_path, pin)


def test_cutlass_absent_or_at_another_commit_is_refused(tmp_path, pin):
    src = tmp_path / "flashmla"
    (src / "csrc" / "cutlass").mkdir(parents=True)
    with pytest.raises(KtenvError, match=r"No CUTLASS headers .*submodule update --init csrc/cutlass"):
        fm.find_cutlass(src, pin)
    other = tmp_path / "cutlass"
    (other / "include" / "cutlass").mkdir(parents=True)
    (other / "include" / "cutlass" / "cutlass.h").write_text("// another release\n")
    (other / "tools" / "util" / "include").mkdir(parents=True)
    with pytest.raises(KtenvError, match=rf"differ in include, tools/util/include from commit {CUTLASS_LINK[:12]}"):
        fm.find_cutlass(src, pin, other)


def test_the_git_shim_answers_setup_py_and_nothing_else(tmp_path, pin):
    repo, commit = _flashmla_like(tmp_path / "r")
    p = _pin_for_repo(pin, repo, commit)
    cutlass = tmp_path / "cutlass"
    for rel in p.cutlass_trees:
        (cutlass / rel).mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    stage = fm._stage(repo, cutlass, p, work)
    assert (stage / "csrc" / "sm90" / "k.cu").exists() and not (stage / ".git").exists()
    assert (stage / "csrc" / "cutlass" / "include").resolve() == (cutlass / "include").resolve()
    env = dict(os.environ, PATH=f"{work / 'shim'}:{os.environ['PATH']}")
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=stage, env=env)  # noqa: E731
    assert run("rev-parse", "--short", "HEAD").stdout.strip() == commit[:7]
    assert run("submodule", "update", "--init", "csrc/cutlass").returncode == 0
    other = run("fetch", "origin")
    assert other.returncode == 1 and "unexpected git call" in other.stderr


# --- the env and the toolkit -------------------------------------------------------------

def test_prerequisites_name_every_missing_thing(tmp_path, pin, stack_python):
    py = stack_python
    problems = fm.check_prerequisites(tmp_path, str(py), None, pin)
    assert len(problems) == 3, problems
    assert "is not a FlashMLA checkout" in problems[0]
    assert "No CUTLASS headers" in problems[1]
    assert "No CUDA toolkit was found whose major version matches torch's CUDA 12.8" in problems[2]
    with pytest.raises(KtenvError, match=r"3 prerequisite\(s\) missing"):
        fm.build_wheel(tmp_path, str(py), None, pin, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing started


def test_an_nvcc_of_another_major_than_torch_is_refused(tmp_path, pin, stack_python):
    py, home = stack_python, cuda13_home()
    problems = fm.check_prerequisites(tmp_path, str(py), home, pin)
    assert any(f"nvcc 13.0 ({home}) is CUDA 13, but the env's torch is built for CUDA 12.8" in p for p in problems), problems


def test_a_cuda12_older_than_12_8_is_refused(tmp_path, pin, stack_python):
    py, home = stack_python, str(cuda12_home())
    version = fm.nvcc_version(home)
    assert version and version.startswith("12."), f"{home} is not a CUDA 12 toolkit"
    problems = fm.check_prerequisites(tmp_path, str(py), home, pin)
    refused = [p for p in problems if "older than CUDA 12.8" in p and "__nv_fp8_e8m0" in p]
    assert bool(refused) == (fm._vtuple(version) < (12, 8)), problems


# --- the SASS audit ---------------------------------------------------------------------

def _wheel_with(tmp_path: Path, home: Path, gencode: str) -> Path:
    """A wheel whose flash_mla/cuda*.so is a real nvcc build of a one-line kernel for `gencode`."""
    cu = tmp_path / "k.cu"
    cu.write_text('extern "C" __global__ void k(float* x) { x[threadIdx.x] *= 2.f; }\n')
    so = tmp_path / gencode.replace(",", "_").replace("=", "_") / "cuda.so"
    so.parent.mkdir()
    # Compiled, then linked by the host compiler, as torch's BuildExtension does (nvcc 12.4's own
    # `-shared` adds a device-link cubin that cuobjdump lists as sm_90).
    obj = so.with_suffix(".o")
    subprocess.run([str(home / "bin" / "nvcc"), "-c", "-Xcompiler", "-fPIC", "-gencode", gencode,
                    str(cu), "-o", str(obj)], check=True, capture_output=True)
    subprocess.run(["g++", "-shared", str(obj), "-o", str(so)], check=True, capture_output=True)
    whl = so.parent / "flash_mla-1.0.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(so, "flash_mla/cuda.cpython-311-x86_64-linux-gnu.so")
        z.writestr("flash_mla/__init__.py", "")
    return whl


def test_the_audit_passes_sm90a_only_and_refuses_anything_else(tmp_path, pin):
    home = cuda12_home()
    tool = find_cuobjdump()[0]  # the cuobjdump the project pins
    good = fm.audit_wheel(_wheel_with(tmp_path, home, "arch=compute_90a,code=sm_90a"), pin, tool)
    assert good["sass"] == ["sm_90a"] and good["ptx"] == []
    with pytest.raises(KtenvError, match=r"carries SASS \['sm_89'\] and PTX none, but ktenv builds exactly SASS sm_90a"):
        fm.audit_wheel(_wheel_with(tmp_path, home, "arch=compute_89,code=sm_89"), pin, tool)
    with pytest.raises(KtenvError, match=r"PTX \['sm_90a'\]"):
        fm.audit_wheel(_wheel_with(tmp_path, home, "arch=compute_90a,code=[sm_90a,compute_90a]"), pin, tool)


# --- without flash_mla ----------------------------------------------------------------------

def test_the_cannot_serve_message(spec, pin):
    arch = spec.arch("sm90")
    msg = fm.missing_message(arch, pin, spec.stack)
    assert msg.startswith("This sm90 env cannot serve DeepSeek-V4 on Hopper (H100 / H200): flash_mla is not installed.")
    for part in (f"sglang-kt {spec.stack.default}", "compute capability 9.0", "no fallback", "CUDA 12.8",
                 "--flash-mla-source PATH", pin.repository, pin.commit, "submodule update --init csrc/cutlass",
                 "CUDA 12.8+ toolkit", "needs no GPU"):
        assert part in msg, part


def test_launch_refuses_an_sm90_env_without_flash_mla(spec, pin, stack_env):
    from ktenv import target
    from ktenv.build import flash_mla_env

    t = target.resolve(spec, "sm90", lock_root=REPO / "lock", prefix=stack_env)
    assert fm.verify(str(t.python))["error"].startswith("ModuleNotFoundError: No module named 'flash_mla'")
    assert flash_mla_env.launch_refusal(t) == fm.missing_message(spec.arch("sm90"), pin, spec.stack)
    entry = (t.stamp or {}).get("flash_mla")  # the env build recorded the gap, with the message it ended with
    assert entry["path"] == "missing" and entry["message"] == fm.missing_message(spec.arch("sm90"), pin, spec.stack)
    assert flash_mla_env.summary_lines(entry) == [f"  flash_mla: MISSING -- {entry['message']}"]
    built = dataclasses.replace(t, stamp={**(t.stamp or {}), "flash_mla": {"path": "source"}})
    assert flash_mla_env.launch_refusal(built) is None
    other = target.resolve(spec, "sm120", lock_root=REPO / "lock", prefix=stack_env, follow_stamp=False)
    assert flash_mla_env.launch_refusal(other) is None and flash_mla_env.want(other, None, None) == {}


def test_env_refuses_flash_mla_source_where_it_means_nothing_or_is_wrong(spec, tmp_path, cli):
    p = cli("env", "--arch", "sm120", "--flash-mla-source", str(tmp_path), "--prefix", str(tmp_path / "e"))
    assert p.returncode == 2 and "--flash-mla-source is for archs that need flash_mla" in p.stderr
    p = cli("env", "--arch", "sm90", "--flash-mla-source", str(tmp_path), "--prefix", str(tmp_path / "e"))
    assert p.returncode == 2 and "is not a FlashMLA checkout" in p.stderr
    assert not (tmp_path / "e").exists()  # refused before anything was built


# --- the real build ------------------------------------------------------------------------

@pytest.mark.slow
def test_real_build_audit_install_and_cache(tmp_path, pin, request):
    source = os.environ.get("KTENV_FLASH_MLA_SOURCE")
    if not source:
        pytest.skip("KTENV_FLASH_MLA_SOURCE is not set: no FlashMLA checkout here (GitHub is not reachable from CI); "
                    f"set it to a clone of {pin.repository} at {pin.commit[:12]}")
    home = os.environ.get("KTENV_FLASH_MLA_CUDA_HOME")
    if not home:
        pytest.skip("KTENV_FLASH_MLA_CUDA_HOME is not set: no CUDA toolkit of torch's major >= 12.8 is known here "
                    "(the stack's torch is cu128; PyPI has no CUDA 12 nvcc)")
    python = os.environ.get("KTENV_FLASH_MLA_PYTHON") or str(request.getfixturevalue("stack_python"))
    cutlass = os.environ.get("KTENV_FLASH_MLA_CUTLASS")
    cache = Path(os.environ.get("KTENV_FLASH_MLA_CACHE") or tmp_path / "cache")
    lines: list[str] = []
    tool = find_cuobjdump()[0]
    wheel = fm.build_wheel(source, python, home, pin, cache, lines.append, cutlass=cutlass, heartbeat=60, cuobjdump=tool)
    meta = __import__("json").loads((wheel.parent / "build.json").read_text())
    assert meta["audit"]["sass"] == ["sm_90a"] and meta["audit"]["ptx"] == []
    assert meta["inputs"]["commit"] == pin.commit and wheel.name.startswith(f"flash_mla-1.0.0+{pin.short}-")
    again: list[str] = []
    assert fm.build_wheel(source, python, home, pin, cache, again.append, cutlass=cutlass, cuobjdump=tool) == wheel
    assert again and "from the cache" in again[-1]
    installed = fm.install(python, wheel)
    assert installed["version"] == f"1.0.0+{pin.short}" and "sparse_decode_fwd" in installed["ops"]
