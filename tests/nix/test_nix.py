"""nix/*.nix without nixpkgs, evaluated for real with Debian's nix-bin.

nix/spec.nix evaluates envs/*.toml (and pyproject.toml) to exactly what
ktenv.spec reads in Python; broken input fails the evaluation; the CUDA set
choice. The shellHook is tested in test_nix_hook.py; the flake and the shells,
against a stub nixpkgs, in test_nix_flake.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from ktenv import spec as ktspec
from ktenv.errors import SpecError

from nixtools import REPO, copy_envs, edit, eval_expr, eval_spec, instantiate


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
    instantiate("--parse", str(full))


def test_unparseable_nix_is_reported(tmp_path):
    broken = tmp_path / "flake.nix"
    broken.write_text((REPO / "flake.nix").read_text().replace("outputs =", "outputs = {", 1))
    proc = instantiate("--parse", str(broken), check=False)
    assert proc.returncode != 0
    assert "syntax error" in proc.stderr


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
        # Unfree CUDA allowed; no cudaSupport/cudaCapabilities, which would
        # rebuild CUDA-capable packages (hwloc) instead of taking the cache's.
        assert a["nixpkgsConfig"] == {"allowUnfree": True}


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
    names = [canonicalize_name(Requirement(d).name) for d in deps]
    # Provided outside nixpkgs' Python set, each for a reason in nix/packages.nix.
    otherwise = {"uv", "nvidia-cuda-cuobjdump", "py-rattler"}
    uv_pin = next(str(Requirement(d).specifier).removeprefix("==") for d in deps if Requirement(d).name == "uv")
    assert nixspec["stack"]["python"] == pyspec.stack.python[0]
    for a in nixspec["archs"].values():
        pk = a["packages"]
        assert pk["python"] == "python" + pyspec.stack.python[0].replace(".", "")
        assert pk["pythonPackages"] == [n for n in names if n not in otherwise]
        assert a["uv"]["version"] == uv_pin
        # The system layer the issue asks for, by nixpkgs attribute name.
        assert pk["cuda"]["native"] == ["cuda_nvcc", "cuda_cuobjdump", "cuda_nvdisasm"]
        assert {"cuda_cudart", "cuda_cccl", "libcublas"} <= set(pk["cuda"]["libraries"])
        assert {"cmake", "ninja", "pkg-config"} <= set(pk["tools"]) and "uv" not in pk["tools"]
        assert {"hwloc", "numactl"} <= set(pk["libraries"])
        assert pk["stdenv"] == "backendStdenv"


def copy_with_pyproject(tmp_path: Path, old: str, new: str) -> Path:
    envs = copy_envs(tmp_path)
    edit(tmp_path / "pyproject.toml", old, new)
    return envs


def eval_spec_with(envs: Path):
    return eval_spec(envs, check=False, pyproject=envs.parent / "pyproject.toml")


def test_a_python_dependency_nix_does_not_know_fails_evaluation(tmp_path):
    envs = copy_with_pyproject(tmp_path, '"pyyaml>=6",', '"pyyaml>=6",\n    "rich>=13",')
    proc = eval_spec_with(envs)
    assert proc.returncode != 0
    assert "pyproject.toml depends on rich, which nix/packages.nix neither maps" in proc.stderr


def test_a_python_dependency_pyproject_dropped_fails_evaluation(tmp_path):
    envs = copy_with_pyproject(tmp_path, '"pyyaml>=6",', "")
    proc = eval_spec_with(envs)
    assert proc.returncode != 0
    assert "nix/packages.nix lists the Python dependency pyyaml, which pyproject.toml no longer has" in proc.stderr


def test_a_uv_pin_nix_does_not_fetch_fails_evaluation(tmp_path):
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("uv=="))
    envs = copy_with_pyproject(tmp_path, f'"{pin}"', '"uv==0.99.0"')
    proc = eval_spec_with(envs)
    assert proc.returncode != 0
    assert f"pyproject.toml pins uv==0.99.0, but nix/uv.nix fetches uv {pin[4:]}" in proc.stderr


def test_default_shell_is_the_newest_validated_arch(nixspec, pyspec):
    validated = [a for a in pyspec.supported_archs() if pyspec.archs[a].validated]
    want = max(validated or pyspec.supported_archs(), key=lambda a: pyspec.archs[a].sm_number)
    assert nixspec["default"] == want


# ---------------------------------------------------------------- edits to envs/ follow through


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
    assert got["archs"]["sm121"]["computeCapability"] == "12.1"
    assert got["archs"]["sm121"]["env"]["TORCH_CUDA_ARCH_LIST"] == "12.0+PTX"  # copied from sm120: the TOML decides


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


def pick(wanted: str, available: list[str], check: bool = True, usable: list[str] | None = None):
    names = f"builtins.fromJSON {json.dumps(json.dumps(available))}"
    test = "" if usable is None else f"usable = n: builtins.elem n (builtins.fromJSON {json.dumps(json.dumps(usable))});"
    expr = f"(import {REPO}/nix/cuda.nix).pick {{ wanted = {json.dumps(wanted)}; available = {names}; {test} }}"
    return eval_expr(expr, check=check)


def test_cuda_pick_prefers_the_wanted_set():
    assert pick("12.8", ["cudaPackages", "cudaPackages_12", "cudaPackages_12_9", "cudaPackages_12_8"]) == "cudaPackages_12_8"


def test_cuda_pick_falls_back_to_the_oldest_newer_minor():
    # nixpkgs drops old minors; 12.10 must sort after 12.9.
    assert pick("12.8", ["cudaPackages_12_10", "cudaPackages_12_9", "cudaPackages_13_0"]) == "cudaPackages_12_9"


def test_cuda_pick_skips_a_removed_set_that_is_only_an_alias():
    # nixpkgs keeps a removed set's name as an alias that throws; the name
    # alone must not win.
    names = ["cudaPackages_12_8", "cudaPackages_12_9", "cudaPackages_13_0"]
    assert pick("12.8", names, usable=["cudaPackages_12_9", "cudaPackages_13_0"]) == "cudaPackages_12_9"
    proc = pick("12.8", names, usable=["cudaPackages_13_0"], check=False)
    assert proc.returncode != 0
    assert "no usable CUDA package set 12.8 or a newer 12.x" in proc.stderr


def test_cuda_pick_only_tests_candidates():
    # `usable` evaluates a set, which can be costly or throw: never for names
    # that cannot be chosen anyway.
    expr = (f"(import {REPO}/nix/cuda.nix).pick {{ wanted = \"12.8\"; "
            "available = [ \"cudaPackages_12_5\" \"cudaPackages_12_8\" \"cudaPackages_13_0\" ]; "
            "usable = n: if n == \"cudaPackages_12_8\" then true else throw \"evaluated ${n}\"; }")
    assert eval_expr(expr) == "cudaPackages_12_8"


def test_cuda_pick_refuses_another_major_or_older():
    proc = pick("12.8", ["cudaPackages_12_6", "cudaPackages_13_0"], check=False)
    assert proc.returncode != 0
    assert "no usable CUDA package set 12.8 or a newer 12.x" in proc.stderr
    assert "cudaPackages_12_6, cudaPackages_13_0" in proc.stderr
