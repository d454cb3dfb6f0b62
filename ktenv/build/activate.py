"""Entering an env: the one place that knows what a process run "inside" it needs.

    activation(prefix, toolchain=None, base=None) -> dict   the whole environment
    changes(prefix, toolchain=None, base=None) -> dict      only what activation sets
    shell_exports(changes) -> str                           `export K=V` lines for eval
    kind(prefix) -> "uv" | "conda" | "prefix"

What it sets, and why:

- PATH: the env's bin/ first (tvm-ffi and torch's load_inline run `ninja`
  from PATH; launch and smoke run the env's own tools), then the toolkit's bin/.
- VIRTUAL_ENV (a uv venv), or for a conda prefix what `conda activate` gives
  (build/conda_activate.py: CONDA_PREFIX, targets/x86_64-linux include and
  lib dirs, the compilers' etc/conda/activate.d scripts); PYTHONHOME and
  PYTHONPATH are dropped so the env's python sees only its own packages.
- CUDA_HOME and CUDA_PATH: the toolkit ktenv chose (torch, tvm-ffi, tilelang
  and deep_gemm all read CUDA_HOME first).
- CPATH: the toolkit's include dirs, including `targets/x86_64-linux/include`
  (conda-forge's and NVIDIA's split layout, which torch's extension builder
  does not search: pytorch/pytorch#144690), then the env's own nvidia-*
  wheel include dirs for any library header the toolkit lacks (cublas_v2.h,
  cusparse.h, cusolverDn.h: ATen/cuda/CUDAContext.h includes them, and a
  minimal toolkit of nvcc + cudart + cccl has none of them).
- LIBRARY_PATH: the toolkit's lib dir (JIT links -lcudart).
- CC, CXX, NVCC_CCBIN: a host compiler this nvcc accepts (torch passes CC to
  nvcc as -ccbin; nvcc reads NVCC_CCBIN itself).
- KT_KERNEL_CPU_VARIANT: the variant `build.py tune` measured fastest, when the
  env was tuned on this CPU and the caller has not set one.

`toolchain` is a toolchain.Choice, a Toolkit, or the record the env stamp
keeps (`ktenv-stamp.json` "toolchain"); with None the CUDA variables of
`base` are left alone.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Mapping

from ..target import STAMP

# Library headers the DeepSeek-V4 JIT paths include (via ATen/cuda/CUDAContext.h
# and sglang's own sources), and the nvidia-* wheel that ships each.
WHEEL_HEADERS = {
    "cublas_v2.h": "cublas", "cublasLt.h": "cublas", "cusparse.h": "cusparse",
    "cusolverDn.h": "cusolver", "curand.h": "curand", "cufft.h": "cufft", "nvrtc.h": "cuda_nvrtc",
}


def kind(prefix: str | Path) -> str:
    p = Path(prefix)
    if (p / "conda-meta").is_dir():
        return "conda"
    if (p / "pyvenv.cfg").exists():
        return "uv"
    return "prefix"


def stamp_toolchain(prefix: str | Path) -> dict | None:
    """The toolchain record the env's stamp keeps, or None."""
    try:
        rec = json.loads((Path(prefix) / STAMP).read_text()).get("toolchain")
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _fields(toolchain: Any) -> dict:
    """cuda_home, include_dirs, lib_dir, cc, cxx from a Choice, a Toolkit or a stamp record."""
    if toolchain is None:
        return {}
    if isinstance(toolchain, dict):
        return {k: toolchain.get(k) for k in ("cuda_home", "include_dirs", "lib_dir", "cc", "cxx")}
    tk = getattr(toolchain, "toolkit", toolchain)  # a Choice holds a toolkit
    out = {"cc": getattr(toolchain, "host_cc", None), "cxx": getattr(toolchain, "host_cxx", None)}
    if tk is not None and hasattr(tk, "home"):
        out.update(cuda_home=tk.home, include_dirs=list(tk.include_dirs), lib_dir=tk.lib_dir)
    return out


def _site_packages(prefix: Path) -> list[Path]:
    return sorted(prefix.glob("lib/python3*/site-packages"))


def _paths(*parts: str | None) -> str:
    seen, out = set(), []
    for part in parts:
        for p in (part or "").split(os.pathsep):
            if p and p not in seen:
                seen.add(p)
                out.append(p)
    return os.pathsep.join(out)


def changes(prefix: str | Path | None, toolchain: Any = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables activation sets (values are complete, e.g. the whole new PATH)."""
    env = dict(os.environ if base is None else base)
    out: dict[str, str] = {}
    bins: list[str] = []
    if prefix:
        p = Path(prefix).absolute()
        bins.append(str(p / "bin"))
        k = kind(p)
        if k == "uv":
            out["VIRTUAL_ENV"] = str(p)
        elif k == "conda":
            # What `conda activate` gives (CONDA_PREFIX, the CUDA layout under
            # targets/x86_64-linux, the compilers' activate.d scripts); the
            # toolchain below is laid over it.
            from .conda_activate import activation as conda_activation

            layer = conda_activation(p, env)
            out.update(layer)
            env.update(layer)
    f = _fields(toolchain)
    home = f.get("cuda_home")
    if home:
        out["CUDA_HOME"] = out["CUDA_PATH"] = home
        bins.append(str(Path(home) / "bin"))
        incs = list(f.get("include_dirs") or [])
        have = {h for h in WHEEL_HEADERS if any((Path(d) / h).exists() for d in incs)}
        for site in _site_packages(Path(prefix)) if prefix else []:
            for header, wheel in WHEEL_HEADERS.items():
                d = site / "nvidia" / wheel / "include"
                if header not in have and (d / header).exists():
                    incs.append(str(d))
                    have.add(header)
        out["CPATH"] = _paths(*incs, env.get("CPATH"))
        if f.get("lib_dir"):
            out["LIBRARY_PATH"] = _paths(f["lib_dir"], env.get("LIBRARY_PATH"))
        if f.get("cxx"):
            out["CXX"] = out["NVCC_CCBIN"] = f["cxx"]
            out["CC"] = f.get("cc") or f["cxx"]
    out["PATH"] = _paths(*bins, env.get("PATH"))
    tuned = _tuned_variant(prefix) if prefix and "KT_KERNEL_CPU_VARIANT" not in env else None
    if tuned:
        out["KT_KERNEL_CPU_VARIANT"] = tuned
    return out


def _tuned_variant(prefix: str | Path) -> str | None:
    """The kt-kernel variant `build.py tune` measured fastest for this env, when it was measured on
    this CPU (the stamp's "kt_tune"); a variable the user set always wins (the caller checks)."""
    try:
        tuned = json.loads((Path(prefix) / STAMP).read_text()).get("kt_tune") or {}
    except (OSError, ValueError):
        return None
    from ..host.cpu import cpu_info

    return tuned.get("variant") if tuned.get("cpu_model") == cpu_info().model else None


def activation(prefix: str | Path | None, toolchain: Any = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment for a process inside the env at `prefix` (base: os.environ by default)."""
    env = dict(os.environ if base is None else base)
    for k in ("PYTHONHOME", "PYTHONPATH"):
        env.pop(k, None)
    env.update(changes(prefix, toolchain, env))
    return env


def shell_exports(values: Mapping[str, str]) -> str:
    """`export K=V` lines a POSIX shell can eval."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(values.items())) + "\n"
