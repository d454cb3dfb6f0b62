"""flake.nix, flake.lock and the shells, evaluated for real with Debian's nix-bin.

nixpkgs itself cannot be fetched or realised here, so the flake's nixpkgs
input is replaced (`--override-input nixpkgs path:STUB`) by a stub whose
attribute names and outputs come from the pinned revision's files
(tests/fixtures/nix/nixpkgs/attributes.json records which file, per
attribute). Against it every devShell instantiates, `nix flake check
--no-build` is clean, and each shell's environment is read back from its
.drv. What is not tested: building the shells (nvcc, CUDA headers, Python
from the binary cache and NVIDIA's servers), which needs the network.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest

from nixtools import REPO, STUB, SYSTEM, copy_flake, edit, eval_spec, instantiate, nix, tool

PINNED = {  # nixos-25.11 as public flake.lock files pin it
    "lastModified": 1778430510,
    "narHash": "sha256-Ti+ZBvW6yrWWAg2szExVTwCd4qOJ3KlVr1tFHfyfi8Q=",
    "owner": "NixOS",
    "repo": "nixpkgs",
    "rev": "8fd9daa3db09ced9700431c5b7ad0e8ba199b575",
    "type": "github",
}
OVERRIDE = ["--override-input", "nixpkgs", f"path:{STUB}", "--no-write-lock-file"]


@pytest.fixture(scope="module")
def flake(tmp_path_factory) -> Path:
    return copy_flake(tmp_path_factory.mktemp("flake") / "ktenv")


@pytest.fixture(scope="module")
def nixspec() -> dict:
    return eval_spec()


def flake_eval(flake: Path, attr: str, check: bool = True):
    proc = nix("eval", "--json", f"path:{flake}#{attr}", *OVERRIDE, check=check)
    return json.loads(proc.stdout) if check else proc


def drv_env(flake: Path, shell: str) -> dict:
    drv = flake_eval(flake, f"devShells.{SYSTEM}.{shell}.drvPath")
    shown = json.loads(nix("show-derivation", drv).stdout)
    return shown[drv]["env"]


def stub_path(expr: str) -> str:
    """A store path from the stub nixpkgs, as the shells get it."""
    return json.loads(instantiate("--eval", "--json", "-E", f"let pkgs = import {STUB} {{ config.allowUnfree = true; }}; in {expr}").stdout)


# ---------------------------------------------------------------- the pin


def test_flake_lock_pins_the_branch_flake_nix_names():
    lock = json.loads((REPO / "flake.lock").read_text())
    node = lock["nodes"]["nixpkgs"]
    assert node["locked"] == PINNED
    url = instantiate("--eval", "--json", "-E", f"(import {REPO}/flake.nix).inputs.nixpkgs.url").stdout
    assert json.loads(url) == f"github:NixOS/nixpkgs/{node['original']['ref']}"
    assert node["original"]["ref"] == "nixos-25.11"
    assert lock["nodes"]["root"]["inputs"] == {"nixpkgs": "nixpkgs"} and lock["version"] == 7


def test_nix_accepts_the_lock_offline(flake):
    before = (flake / "flake.lock").read_text()
    nix("flake", "lock", "--offline", "--no-update-lock-file", f"path:{flake}")
    assert (flake / "flake.lock").read_text() == before


def test_a_lock_for_another_branch_is_refused(tmp_path):
    # flake.nix moved to another branch without relocking: Nix must not take
    # the committed lock for it.
    moved = copy_flake(tmp_path / "ktenv")
    edit(moved / "flake.nix", "nixos-25.11", "nixos-unstable")
    proc = nix("flake", "lock", "--offline", "--no-update-lock-file", f"path:{moved}", check=False, timeout=120)
    assert proc.returncode != 0


# ---------------------------------------------------------------- against the stub nixpkgs


def test_every_shell_instantiates(flake, nixspec):
    names = json.loads(nix("eval", "--json", f"path:{flake}#devShells.{SYSTEM}", "--apply", "builtins.attrNames", *OVERRIDE).stdout)
    assert sorted(names) == sorted(nixspec["supported"] + ["default"])
    for name in names:
        drv = flake_eval(flake, f"devShells.{SYSTEM}.{name}.drvPath")
        assert drv.startswith("/nix/store/") and drv.endswith(f"-ktenv-{nixspec['default'] if name == 'default' else name}.drv")
        assert Path(drv).exists()


def test_flake_check_no_build_is_clean(flake):
    proc = nix("flake", "check", "--no-build", f"path:{flake}", *OVERRIDE)
    assert "warning: unknown flake output" not in proc.stderr
    assert "error" not in proc.stderr.lower()


def test_flake_check_fails_on_a_broken_shell(tmp_path):
    # The check above can fail: a shell that asks the stub for a package it
    # does not have (as a nixpkgs without it would) breaks `nix flake check`.
    broken = copy_flake(tmp_path / "ktenv")
    edit(broken / "nix" / "packages.nix", '"pkg-config"', '"pkg-config-that-does-not-exist"')
    proc = nix("flake", "check", "--no-build", f"path:{broken}", *OVERRIDE, check=False)
    assert proc.returncode != 0
    assert re.search(r"this nixpkgs has no pkg-config-that-does-not-exist, which the sm\d+ shell needs", proc.stderr)


def test_checks_lint_each_arch_hook_and_formatter_is_nixfmt(flake, nixspec):
    checks = json.loads(nix("eval", "--json", f"path:{flake}#checks.{SYSTEM}", "--apply", "builtins.attrNames", *OVERRIDE).stdout)
    assert sorted(checks) == sorted(f"hook-{a}" for a in nixspec["supported"])
    drv = flake_eval(flake, f"checks.{SYSTEM}.hook-sm120.drvPath")
    env = json.loads(nix("show-derivation", drv).stdout)[drv]["env"]
    assert env["hook"] == nixspec["archs"]["sm120"]["shellHook"]
    assert "shellcheck -s bash" in env["buildCommand"]
    assert stub_path("pkgs.shellcheck.outPath") in env["nativeBuildInputs"]
    assert flake_eval(flake, f"formatter.{SYSTEM}.name") == "nixfmt-stub"


def test_shell_environment_from_the_derivation(flake, nixspec):
    env = drv_env(flake, "sm120")
    cuda_home = env["CUDA_HOME"]
    assert cuda_home.endswith("-ktenv-cuda-home-12.8") and env["CUDA_PATH"] == cuda_home
    # Triton's and audit's NVIDIA tools are the Nix-built ones in CUDA_HOME.
    for var, tool_name in [("TRITON_PTXAS_PATH", "ptxas"), ("TRITON_CUOBJDUMP_PATH", "cuobjdump"),
                           ("TRITON_NVDISASM_PATH", "nvdisasm"), ("KTENV_CUOBJDUMP", "cuobjdump")]:
        assert env[var] == f"{cuda_home}/bin/{tool_name}", var
    # The arch's variables, from envs/.
    for key, value in nixspec["archs"]["sm120"]["shellEnv"].items():
        assert env[key] == value, key
    assert env["FLASHINFER_CUDA_ARCH_LIST"] == "12.0a" and env["NIX_ENFORCE_NO_NATIVE"] == "1"
    # libstdc++ from the default stdenv, first; never backendStdenv's older one.
    ld = env["LD_LIBRARY_PATH"].split(":")
    default_lib = stub_path("pkgs.stdenv.cc.cc.lib.outPath")
    backend_lib = stub_path("pkgs.cudaPackages_12_8.backendStdenv.cc.cc.lib.outPath")
    assert ld[0] == f"{default_lib}/lib"
    assert f"{backend_lib}/lib" not in ld
    assert ld[1:] == [f"{stub_path('pkgs.hwloc.lib.outPath')}/lib", f"{stub_path('pkgs.numactl.outPath')}/lib",
                      f"{stub_path('pkgs.zlib.outPath')}/lib"]
    # PATH order: the shell's python, then the pinned uv, then CUDA and tools.
    native = env["nativeBuildInputs"].split()
    assert native[0].endswith("-python3-3.11-env")
    assert native[1].endswith("-uv-0.13.9")
    assert native[2] == stub_path("pkgs.cudaPackages_12_8.cuda_nvcc.dev.outPath")
    assert stub_path("pkgs.ninja.outPath") in native
    # The compiler nvcc accepts; the env is built with Nix's plain CPython.
    assert env["stdenv"] == stub_path("pkgs.cudaPackages_12_8.backendStdenv.outPath")
    assert env["KTENV_ENV_PYTHON"] == stub_path("pkgs.python311.interpreter")
    assert env["KTENV_NIX_FIRST"].endswith("-ktenv-nix-first/bin")
    assert env["UV_PYTHON_DOWNLOADS"] == "never"
    assert env["shellHook"] == nixspec["archs"]["sm120"]["shellHook"]


def test_every_arch_shell_has_its_own_variables(flake, nixspec):
    for arch in nixspec["supported"]:
        env = drv_env(flake, arch)
        assert env["TORCH_CUDA_ARCH_LIST"] == nixspec["archs"][arch]["env"]["TORCH_CUDA_ARCH_LIST"], arch
        assert f"local arch={arch}\n" in env["shellHook"]


def test_shell_reports_what_it_was_made_from(flake):
    got = flake_eval(flake, f"devShells.{SYSTEM}.sm120.ktenv")
    assert got["cudaPackages"] == "cudaPackages_12_8" and got["name"] == "sm120"


def shell_expr(nixpkgs: Path, config: str = "") -> str:
    arch = f"(import {REPO}/nix/spec.nix {{ envsDir = {REPO}/envs; }}).archs.sm120"
    if config:
        arch = f"({arch} // {{ nixpkgsConfig = {config}; }})"
    return f'(import {REPO}/nix/shell.nix {{ nixpkgs = {nixpkgs}; system = "{SYSTEM}"; arch = {arch}; }})'


def test_stub_refuses_unfree_without_allow_unfree():
    proc = instantiate("-E", shell_expr(STUB, config="{ }"), check=False)
    assert proc.returncode != 0
    assert "has an unfree license (‘CUDA Toolkit’), refusing to evaluate" in proc.stderr
    instantiate("-E", shell_expr(STUB))  # the spec's config allows it


def test_a_removed_cuda_set_is_skipped_for_the_next(tmp_path):
    # A nixpkgs where 12.8 has become an alias that throws, as 12.0-12.5 are
    # in 25.11: the shell takes 12.9, never the alias.
    variant = tmp_path / "nixpkgs"
    variant.mkdir()
    (variant / "default.nix").write_text(
        f'args: import {STUB} args // {{ cudaPackages_12_8 = throw "CUDA 12.8 has been removed from Nixpkgs"; }}\n')
    got = json.loads(instantiate("--eval", "--json", "-E", f"{shell_expr(variant)}.ktenv.cudaPackages").stdout)
    assert got == "cudaPackages_12_9"
    cuda_home = json.loads(instantiate("--eval", "--json", "-E", f"{shell_expr(variant)}.CUDA_HOME").stdout)
    assert cuda_home.endswith("-ktenv-cuda-home-12.8")  # named for what the arch asked for
    # The stub's own removed sets throw, like nixpkgs' aliases.
    proc = instantiate("--eval", "-E", f"(import {STUB} {{}}).cudaPackages_12_5", check=False)
    assert "CUDA 12.5 has been removed from Nixpkgs" in proc.stderr


# ---------------------------------------------------------------- the stub's provenance


def test_stub_records_the_file_of_every_attribute_the_shells_use():
    data = json.loads((STUB / "attributes.json").read_text())
    assert data["revision"]["rev"] == PINNED["rev"]
    names = json.loads(instantiate("--eval", "--strict", "--json", "-E", f"import {REPO}/nix/packages.nix").stdout)
    for n in names["tools"] + names["libraries"] + ["python311", "unzip", "shellcheck", "nixfmt"]:
        assert data["top"][n]["file"].startswith("pkgs/"), n
    for n in names["cuda"]["native"] + names["cuda"]["libraries"]:
        assert data["cudaPackages"]["packages"][n]["outputs"][0] == "out", n
    for n in names["python"].values():
        assert data["pythonPackages"][n]["file"] == f"pkgs/development/python-modules/{n}/default.nix"
    for n in names["pythonOtherwise"]:
        assert n == "uv" or n in data["notInNixpkgs"], n
    for n in ["mkShell", "stdenv.mkDerivation", "runCommand", "symlinkJoin", "fetchurl"]:
        assert data["builders"][n]["file"].startswith("pkgs/"), n


# ---------------------------------------------------------------- the pinned uv


def test_uv_pin_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("uv=="))
    uv = json.loads(instantiate("--eval", "--json", "-E", f"import {REPO}/nix/uv.nix").stdout)
    assert pin == f"uv=={uv['version']}"
    assert uv["url"].endswith(f"/uv-{uv['version']}-py3-none-musllinux_1_1_x86_64.whl")


@pytest.mark.network
def test_uv_wheel_fetches_and_holds_a_static_uv_of_the_pinned_version(tmp_path):
    # Nix's own fetcher (builtin:fetchurl, what the stub's fetchurl is)
    # realises nix/uv.nix's URL and checks its hash.
    uv = json.loads(instantiate("--eval", "--json", "-E", f"import {REPO}/nix/uv.nix").stdout)
    drv = instantiate("-E", f"(import {STUB} {{}}).fetchurl {{ inherit (import {REPO}/nix/uv.nix) url sha256; }}").stdout.strip()
    wheel = subprocess.run([tool("nix-store"), "--realise", drv], capture_output=True, text=True, timeout=600,
                           check=True).stdout.strip()
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"uv-{uv['version']}.data/scripts/uv", tmp_path)
    binary = tmp_path / f"uv-{uv['version']}.data" / "scripts" / "uv"
    binary.chmod(0o755)
    headers = subprocess.run([tool("readelf"), "-l", str(binary)], capture_output=True, text=True, check=True).stdout
    assert "INTERP" not in headers  # static-pie: starts without /lib64/ld-linux-x86-64.so.2
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env={}, check=True).stdout
    assert out.startswith(f"uv {uv['version']} ")


@pytest.mark.network
def test_the_shells_uv_build_script_runs(flake, tmp_path):
    # The shell's uv derivation, read back from the sm120 .drv, run here with
    # this machine's unzip in place of Nix's builder: it unpacks the real
    # wheel and its own `uv --version` check passes.
    version = json.loads(instantiate("--eval", "--json", "-E", f"(import {REPO}/nix/uv.nix).version").stdout)
    shell = flake_eval(flake, f"devShells.{SYSTEM}.sm120.drvPath")
    inputs = json.loads(nix("show-derivation", shell).stdout)[shell]["inputDrvs"]
    uv_drv = next(d for d in inputs if d.endswith(f"-uv-{version}.drv"))
    shown = json.loads(nix("show-derivation", uv_drv).stdout)[uv_drv]
    env = shown["env"]
    fetch = next(d for d in shown["inputDrvs"] if d.endswith(".whl.drv"))
    subprocess.run([tool("nix-store"), "--realise", fetch], capture_output=True, text=True, timeout=600, check=True)
    out = tmp_path / "out"
    work = tmp_path / "build"
    work.mkdir()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", env["buildCommand"]], cwd=work, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "src": env["src"], "out": str(out)})
    assert proc.returncode == 0, proc.stderr
    assert (out / "bin" / "uv").exists() and (out / "bin" / "uvx").exists()


# ---------------------------------------------------------------- direnv


ENVRC_PROBE = r"""
watch_file() { printf 'watch %s\n' "$*"; }
use() { printf 'use %s skip=%s\n' "$*" "${KTENV_SKIP_BUILD-unset}"; }
. ./.envrc
printf 'after skip=%s\n' "${KTENV_SKIP_BUILD-unset}"
"""


@pytest.mark.parametrize("preset,during,after", [(None, "1", "unset"), ("", "", ""), ("1", "1", "1")])
def test_envrc_skips_the_build_only_while_loading_the_shell(preset, during, after):
    # direnv itself (and a nixpkgs to realise) is not here: its two stdlib
    # functions are stood in for, to see what the shell hook would see.
    env = {"PATH": "/usr/bin:/bin"}
    if preset is not None:
        env["KTENV_SKIP_BUILD"] = preset
    proc = subprocess.run(["bash", "--norc", "-c", ENVRC_PROBE], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"use flake .#default skip={during}\n" in proc.stdout
    assert f"after skip={after}\n" in proc.stdout
    watched = next(line for line in proc.stdout.splitlines() if line.startswith("watch ")).split()[1:]
    assert {"nix/shell.nix", "nix/shell-hook.sh", "envs/sm120.toml", "pyproject.toml"} <= set(watched)


def test_envrc_lints():
    proc = subprocess.run([tool("shellcheck"), "-s", "bash", str(REPO / ".envrc")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
