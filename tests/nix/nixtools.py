"""Helpers for the Nix tests: Debian's nix-bin, run for real on this repository's files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A stand-in nixpkgs whose attributes come from the pinned revision's files
# (tests/fixtures/nix/nixpkgs/attributes.json says which).
STUB = REPO / "tests" / "fixtures" / "nix" / "nixpkgs"
FLAKES = ["--extra-experimental-features", "nix-command flakes"]
SYSTEM = "x86_64-linux"


def tool(name: str) -> str:
    """A tool scripts/bootstrap.sh installs: missing is a broken set-up, not a skip."""
    found = shutil.which(name)
    assert found, f"{name} is not on PATH; scripts/bootstrap.sh installs it (nix-bin, shellcheck). Run it and rerun the tests."
    return found


def run(argv: list[str], check: bool = True, cwd: Path = REPO, timeout: int = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def instantiate(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([tool("nix-instantiate"), *args], check=check)


def eval_spec(envs: Path = REPO / "envs", check: bool = True, trace: bool = False, pyproject: Path | None = None):
    args = ["--eval", "--strict", "--json", str(REPO / "nix" / "spec.nix"), "--argstr", "envsDir", str(envs)]
    if pyproject is not None:
        args += ["--argstr", "pyproject", str(pyproject)]
    if trace:
        args.append("--show-trace")
    proc = instantiate(*args, check=check)
    return json.loads(proc.stdout) if check and proc.returncode == 0 else proc


def eval_expr(expr: str, check: bool = True):
    proc = instantiate("--eval", "--strict", "--json", "-E", expr, check=check)
    return json.loads(proc.stdout) if check else proc


def nix(*args: str, check: bool = True, cwd: Path = REPO, timeout: int = 180) -> subprocess.CompletedProcess:
    """The flakes CLI (`nix ...`); Debian's Nix 2.8 needs the features named."""
    return run([tool("nix"), *FLAKES, *args], check=check, cwd=cwd, timeout=timeout)


def copy_envs(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "envs", tmp_path / "envs")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path / "envs"


def copy_flake(dest: Path) -> Path:
    """The files the flake reads, outside git: a `path:` flake sees exactly these,
    whatever is committed or staged in the checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("flake.nix", "flake.lock", "pyproject.toml"):
        shutil.copy(REPO / name, dest / name)
    for name in ("nix", "envs"):
        shutil.copytree(REPO / name, dest / name)
    return dest


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
