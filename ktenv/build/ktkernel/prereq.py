"""What a kt-kernel source build needs, checked before compiling (each would fail minutes
into CMake): a ktransformers checkout with its submodules, pkg-config and hwloc, CMake,
a C++20 compiler with OpenMP and libnuma that takes the variant's ISA flags, setuptools,
Python headers, and (for the CUDA build SGLang needs) an nvcc the toolchain stage accepts
for torch's CUDA and every arch in CPUINFER_CUDA_ARCHS."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping

from ...errors import KtenvError
from ...spec.model import KtKernel
from .. import toolchain
from .variants import compiler_flags


def _version_tuple(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


def _run(cmd: list[str], env: Mapping[str, str] | None = None, input: str | None = None,
         cwd: str | Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(env) if env is not None else None,
                          input=input, cwd=cwd, timeout=timeout)


def cxx_compiler(environ: Mapping[str, str] | None = None) -> str | None:
    """The C++ compiler kt-kernel's CMake will use.

    Its CMakeLists forces /usr/bin/g++ whenever /usr/bin/gcc and /usr/bin/g++
    exist (unless USE_CONDA_TOOLCHAIN), ignoring CXX; otherwise CMake's usual
    choice (CXX, then c++ on PATH).
    """
    env = os.environ if environ is None else environ
    if Path("/usr/bin/gcc").exists() and Path("/usr/bin/g++").exists():
        return "/usr/bin/g++"
    for cand in (env.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand.split()[0], path=env.get("PATH")):
            return shutil.which(cand.split()[0], path=env.get("PATH"))
    return None


def _find_nvcc(environ: Mapping[str, str]) -> str | None:
    # The same places kt-kernel's setup.py looks, in its order.
    home = environ.get("CUDA_HOME")
    if home and (Path(home) / "bin/nvcc").exists():
        return str(Path(home) / "bin/nvcc")
    found = shutil.which("nvcc", path=environ.get("PATH"))
    if found:
        return found
    for p in ("/usr/local/cuda/bin/nvcc", "/usr/bin/nvcc", "/usr/lib/nvidia-cuda-toolkit/bin/nvcc"):
        if Path(p).exists():
            return p
    return None


def _python_facts(python: str) -> dict:
    code = (
        "import json, sys, sysconfig, importlib.metadata as m\n"
        "def v(d):\n"
        "    try: return m.version(d)\n"
        "    except Exception: return None\n"
        "print(json.dumps({'version': sys.version.split()[0], 'abi': sysconfig.get_config_var('SOABI'),"
        " 'include': sysconfig.get_paths()['include'], 'purelib': sysconfig.get_paths()['purelib'],"
        " 'setuptools': v('setuptools'), 'torch': v('torch')}))\n"
    )
    try:
        proc = _run([python, "-c", code])
    except (FileNotFoundError, PermissionError):
        raise KtenvError(f"The build python {python} does not exist or cannot run; point --python (or the env) "
                         "at the interpreter of the environment kt-kernel is for.")
    if proc.returncode != 0:
        raise KtenvError(f"The build python {python} failed to report its version: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cublas_include(nvcc: str | None, py: dict) -> str | None:
    """Where cublas_v2.h is: the CUDA toolkit's include dir, else the env's nvidia-cublas wheel.

    kt-kernel's CUDA vendor header includes cublas_v2.h (declarations only,
    nothing links against cuBLAS). Minimal toolkits (a bare nvcc + cudart)
    lack it; torch's nvidia-cublas wheel in the target env carries it.
    """
    if nvcc:
        inc = Path(nvcc).resolve().parent.parent / "include"
        if (inc / "cublas_v2.h").exists():
            return str(inc)
    inc = Path(py["purelib"]) / "nvidia" / "cublas" / "include"
    return str(inc) if (inc / "cublas_v2.h").exists() else None


def arch_list_problems(tk: toolchain.Toolkit, sms: str, torch_cuda: str | None,
                       envs_dir: str | Path | None = None) -> dict[str, str]:
    """toolchain.problems() for an arch list such as CPUINFER_CUDA_ARCHS ("80;86;89;90;120")."""
    policy = toolchain.load(envs_dir or toolchain.default_envs())
    return toolchain.problems(tk, toolchain.need_for_sms(policy, sms, torch_cuda, int(tk.version.split(".")[0])))


def check_build_prerequisites(kt: KtKernel, source: str | Path, python: str, target_isa: str,
                              environ: Mapping[str, str] | None = None, *, cuda: bool = True,
                              cxx: str | None = None, cuda_archs: str | None = None,
                              envs_dir: str | Path | None = None) -> list[str]:
    """Every reason a kt-kernel build from `source` would fail here; [] when none.

    Checked before compiling because the build fails 3+ minutes in, deep inside
    CMake, for each of these.
    """
    env = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    kt_dir = Path(source) / "kt-kernel"
    if not (kt_dir / "setup.py").exists() or not (kt_dir / "CMakeLists.txt").exists():
        problems.append(f"{source} is not a ktransformers checkout: {kt_dir}/setup.py and CMakeLists.txt are missing. "
                        "Pass the repository root (the directory that contains kt-kernel/).")
    for sub in ("pybind11", "llama.cpp"):
        d = Path(source) / "third_party" / sub
        if not (d / "CMakeLists.txt").exists():
            problems.append(f"The git submodule third_party/{sub} is empty, and kt-kernel's CMake adds it as a "
                            f"subdirectory. Run `git -C {source} submodule update --init third_party/pybind11 "
                            "third_party/llama.cpp`.")
    pkgconf = shutil.which("pkg-config", path=env.get("PATH"))
    if not pkgconf:
        problems.append("pkg-config is not on PATH; kt-kernel's CMake finds hwloc through it. Install it "
                        "(Debian/Ubuntu: apt install pkg-config).")
    elif _run([pkgconf, "--exists", "hwloc"], env=env).returncode != 0:
        problems.append("pkg-config cannot find hwloc (no hwloc.pc), which kt-kernel's CMake requires. Install "
                        "the hwloc development files (Debian/Ubuntu: apt install libhwloc-dev; Fedora: "
                        "dnf install hwloc-devel) or add their pkgconfig dir to PKG_CONFIG_PATH.")
    cmake = shutil.which("cmake", path=env.get("PATH"))
    if not cmake:
        problems.append("cmake is not on PATH; kt-kernel's setup.py runs it. Install CMake >= 3.16 "
                        "(apt install cmake, or `pip install cmake` into the build python).")
    else:
        ver = _version_tuple(_run([cmake, "--version"], env=env).stdout)
        if ver < kt.min_cmake:
            problems.append(f"cmake {'.'.join(map(str, ver)) or '?'} at {cmake} is older than 3.16, which "
                            "kt-kernel's CMakeLists.txt requires. Install a newer CMake.")
    cxx = cxx or cxx_compiler(env)
    if not cxx:
        problems.append("No C++ compiler found (no /usr/bin/g++, CXX, c++ or g++ on PATH). Install g++ >= 11 "
                        "(apt install g++).")
    else:
        probe = "#include <numa.h>\n#include <omp.h>\n#include <concepts>\nint main(){return numa_available() + omp_get_max_threads();}\n"
        with tempfile.TemporaryDirectory() as tmp:
            base = [cxx, "-std=c++20", "-fopenmp", "-x", "c++", "-", "-o", os.path.join(tmp, "a.out")]
            r = _run(base + ["-lnuma"], env=env, input=probe)
            if r.returncode != 0:
                err = r.stderr
                if "numa.h" in err:
                    problems.append(f"{cxx} cannot find numa.h; kt-kernel includes it. Install the libnuma "
                                    "development files (Debian/Ubuntu: apt install libnuma-dev; Fedora: "
                                    "dnf install numactl-devel).")
                elif "omp.h" in err or "fopenmp" in err:
                    problems.append(f"{cxx} has no OpenMP (omp.h / -fopenmp), which kt-kernel's CMake requires. "
                                    "Install GCC's libgomp development files (they come with g++ on Debian).")
                elif "-lnuma" in err or "cannot find" in err:
                    problems.append(f"{cxx} cannot link -lnuma; kt-kernel's CMake stops with 'NUMA library not "
                                    "found'. Install libnuma-dev (Debian/Ubuntu) or numactl-devel (Fedora).")
                else:
                    problems.append(f"{cxx} cannot compile C++20 with OpenMP and libnuma (kt-kernel needs all "
                                    f"three): {err.strip()[-300:]}. Use g++ >= 11.")
            isa = compiler_flags(kt, target_isa) if target_isa in kt.variants else []
            r = _run([cxx, *isa, "-x", "c++", "-c", "-", "-o", os.path.join(tmp, "b.o")], env=env,
                     input="int main(){return 0;}\n")
            if isa and r.returncode != 0:
                problems.append(f"{cxx} rejects the {target_isa} flags ({' '.join(isa)}): "
                                f"{r.stderr.strip()[-200:]}. AMX needs GCC >= 11, AVX512-BF16 GCC >= 10.")
    py = None
    try:
        py = _python_facts(python)
    except KtenvError as e:
        problems.append(str(e))
    if py is not None:
        st = py.get("setuptools")
        if not st:
            problems.append(f"setuptools is not installed in the build python {python}; kt-kernel builds "
                            "with it. Install setuptools >= 77 there.")
        elif _version_tuple(st) < kt.min_setuptools:
            problems.append(f"setuptools {st} in {python} is too old: kt-kernel's pyproject.toml uses the "
                            "`license = \"...\"` string form, which setuptools < 77 rejects (kt-kernel declares "
                            ">= 61, which is wrong). Install setuptools >= 77 there.")
        if not Path(py["include"], "Python.h").exists():
            problems.append(f"Python.h is missing for {python} ({py['include']}); pybind11 needs the "
                            "interpreter's headers (Debian: apt install python3-dev, or use a full CPython build).")
    nvcc = _find_nvcc(env) if cuda else None
    if cuda and not nvcc:
        problems.append("nvcc was not found (CUDA_HOME/bin, PATH, /usr/local/cuda/bin). ktenv builds kt-kernel "
                        "with CUDA (CPUINFER_USE_CUDA=1) because SGLang's hybrid path needs "
                        "submit_with_cuda_stream (#1760). Install the CUDA toolkit or set CUDA_HOME.")
    elif cuda:
        # The toolchain stage's own test, on the nvcc kt-kernel's setup.py will pick: the major of the
        # build python's torch, and new enough for every arch in CPUINFER_CUDA_ARCHS (upstream #2098).
        torch_cuda = toolchain.torch_cuda_of(py["purelib"]) if py is not None and py.get("torch") else None
        tk = toolchain.inspect(Path(nvcc).resolve().parent.parent, nvcc)
        if tk is None:
            problems.append(f"{nvcc} does not run (`nvcc --version` failed); kt-kernel's build would use it.")
        else:
            found = arch_list_problems(tk, cuda_archs or kt.default_cuda_archs, torch_cuda, envs_dir)
            for why in (found.get("major"), found.get("arch")):
                if why:
                    problems.append(f"{nvcc} (kt-kernel's setup.py picks it: CUDA_HOME, then PATH): {why}. Point CUDA_HOME "
                                    "at a fitting toolkit (`python build.py toolchain --arch ... --print-env`)"
                                    + (" or narrow the arch list." if "arch" in found else "."))
    if cuda and nvcc and py is not None and not _cublas_include(nvcc, py):
        problems.append(f"cublas_v2.h is in neither the CUDA toolkit of {nvcc} nor the env's nvidia-cublas "
                        "wheel; kt-kernel's CUDA header includes it. Install the toolkit's cuBLAS headers "
                        "(e.g. cuda-libraries-dev) or install torch (with nvidia-cublas) into the env first.")
    return problems
