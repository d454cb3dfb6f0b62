"""Entering a conda prefix without conda: the environment `conda activate` would give.

`activation(prefix)` returns the variables to set (full values, to lay over
os.environ) for a prefix built by the conda backend:

- PATH with the prefix's bin/ first (its nvcc, numactl, compilers);
  CONDA_PREFIX, which the packages' activation scripts read;
- CUDA_HOME and CUDA_PATH = the prefix, where torch's extension builder,
  flashinfer's and sglang's JIT, and deep_gemm look for nvcc;
- the CUDA headers and libraries: conda-forge's CUDA 12 keeps them under
  targets/x86_64-linux/, which torch's extension builder never searches (it
  adds $CUDA_HOME/include only: pytorch/pytorch#144690). CUDA_INC_PATH is the
  one extra include directory torch's builder honours; CPATH and LIBRARY_PATH
  reach every gcc/g++ (and nvcc's host-compiler pass) whatever the build tool;
- whatever the packages' etc/conda/activate.d/*.sh scripts export (CC and CXX
  from the compilers, nvcc's host-compiler flag from cuda-nvcc), found by
  sourcing them in bash in conda's order and reading the environment back.

Nothing here imports a package of the env; the scripts run in a child bash.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from ..errors import KtenvError

TARGET_DIR = "targets/x86_64-linux"
# Set by bash itself, not by an activation script.
_SHELL_NOISE = {"_", "SHLVL", "PWD", "OLDPWD", "BASH_EXECUTION_STRING"}


def _prepend(value: str, existing: str | None) -> str:
    return value + (os.pathsep + existing if existing else "")


def activation(prefix: Path | str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that enter the conda prefix, on top of `base` (default: this process's environment)."""
    prefix = Path(prefix).resolve()
    base = dict(os.environ if base is None else base)
    if not (prefix / "conda-meta").is_dir():
        raise KtenvError(f"{prefix} is not a conda prefix (no conda-meta/); it was not built with --backend conda.")
    env: dict[str, str] = {
        "CONDA_PREFIX": str(prefix),
        "CONDA_DEFAULT_ENV": str(prefix),
        "CONDA_SHLVL": "1",
        "PATH": _prepend(str(prefix / "bin"), base.get("PATH")),
    }
    if (prefix / "bin" / "nvcc").exists():
        env["CUDA_HOME"] = env["CUDA_PATH"] = str(prefix)
    targets = prefix / TARGET_DIR
    if (targets / "include").is_dir():
        env["CUDA_INC_PATH"] = str(targets / "include")
        env["CPATH"] = _prepend(str(targets / "include"), base.get("CPATH"))
    libs = [str(d) for d in (targets / "lib", targets / "lib" / "stubs") if d.is_dir()]
    if libs:
        env["LIBRARY_PATH"] = _prepend(os.pathsep.join(libs), base.get("LIBRARY_PATH"))
    env.update(_run_scripts(prefix, {**base, **env}))
    return env


def scripts(prefix: Path) -> list[Path]:
    """The activation scripts in the order conda runs them (sorted by file name)."""
    d = Path(prefix) / "etc" / "conda" / "activate.d"
    return sorted(d.glob("*.sh"), key=lambda p: p.name) if d.is_dir() else []


def _run_scripts(prefix: Path, env: dict[str, str]) -> dict[str, str]:
    found = scripts(prefix)
    if not found:
        return {}
    # Each script is sourced as `conda activate` does; a failing one is named.
    body = ('for f in "$@"; do . "$f" || { echo "ktenv-activate-failed $f" >&2; exit 3; }; done; '
            'env -0')
    try:
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-c", body, "activate", *map(str, found)],
                              capture_output=True, env=env, timeout=120)
    except FileNotFoundError:
        raise KtenvError("Entering a conda prefix runs its activation scripts with bash, which is not installed.") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise KtenvError(
            f"An activation script of {prefix} failed, so the prefix cannot be entered the way conda would "
            f"(compilers, nvcc's host compiler):\n{err[-1500:]}\nRebuild the prefix (build.py env --backend conda), "
            "or report the package whose script this is.")
    after = {}
    for item in proc.stdout.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep and key not in _SHELL_NOISE:
            after[key] = value
    return {k: v for k, v in after.items() if env.get(k) != v}


def shell_exports(env: Mapping[str, str]) -> str:
    """The variables as `export K='V'` lines, for `eval "$(...)"` in a shell."""
    def q(v: str) -> str:
        return "'" + v.replace("'", "'\\''") + "'"

    return "".join(f"export {k}={q(v)}\n" for k, v in sorted(env.items()))
