"""KT-Kernel matched to the CPU: pick the variant, verify the prebuilt wheel, or build one.

KT-Kernel's PyPI wheel ships six builds of its extension, one per x86 ISA
level, and picks one at import from /proc/cpuinfo. ktenv checks that the pick
is the best this CPU runs and that the build has CUDA support (without it
SGLang's hybrid MoE path fails at run time), or builds a wheel from a
ktransformers checkout with every ISA toggle set explicitly, because setup.py's
defaults follow the *build* machine (NATIVE, AMX auto-on).

Public API (stable; materialize, doctor and smoke call it):
  VARIANTS                                   six names, best first
  best_variant(flags) -> str | None          the wheel's own choice; None without AVX2
  runnable_variants(flags) -> list[str]      every variant whose instructions the CPU has
  check_override(flags, environ=None) -> str | None
  build_settings(target_isa, cuda_archs=...) -> dict[str, str]
  compiler_flags(target_isa) -> list[str]
  verify_prebuilt(env_python, flags=None, *, expected=None, environ=None) -> dict
  check_build_prerequisites(source, python, target_isa, environ=None) -> list[str]
  build_from_source(source, target_isa, python, cache_dir, progress=print, ...) -> Path
  stamp_config(path, target_isa, *, verified=None, build=None, flags=None) -> dict
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

from . import hostinfo
from .errors import KtenvError

PROBE = Path(__file__).parent / "probes" / "kt_probe.py"
PROBE_MARKER = "KTENV_KT_PROBE"

# Best first. The order and the requirements are kt_kernel/_cpu_detect.py's
# (kt-kernel 0.7.x): a variant is chosen when every listed flag is present,
# spelled with or without underscores.
VARIANTS = ("amx", "avx512_bf16", "avx512_vbmi", "avx512_vnni", "avx512_base", "avx2")
_AVX512_FULL = ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")
WHEEL_REQUIRES: dict[str, tuple[str, ...]] = {
    "amx": ("amx_tile", "amx_int8", "amx_bf16") + _AVX512_FULL,
    "avx512_bf16": _AVX512_FULL,
    "avx512_vbmi": ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi"),
    "avx512_vnni": ("avx512f", "avx512bw", "avx512_vnni"),
    "avx512_base": ("avx512f", "avx512bw"),
    "avx2": ("avx2",),
}

# The CMake options each variant is built with, as the wheel's multi-variant
# build sets them (kt-kernel/setup.py, build_multi_variants). "AVX512" here is
# setup.py's CPUINFER_ENABLE_AVX512 umbrella (the AMX/AVX512 MoE kernels).
_TOGGLES: dict[str, dict[str, str]] = {
    "avx2": dict(INSTRUCT="AVX2", AVX512="OFF", VNNI="OFF", BF16="OFF", VBMI="OFF", AMX="OFF"),
    "avx512_base": dict(INSTRUCT="AVX512", AVX512="ON", VNNI="OFF", BF16="OFF", VBMI="OFF", AMX="OFF"),
    "avx512_vnni": dict(INSTRUCT="AVX512", AVX512="ON", VNNI="ON", BF16="OFF", VBMI="OFF", AMX="OFF"),
    "avx512_vbmi": dict(INSTRUCT="AVX512", AVX512="ON", VNNI="ON", BF16="OFF", VBMI="ON", AMX="OFF"),
    "avx512_bf16": dict(INSTRUCT="AVX512", AVX512="ON", VNNI="ON", BF16="ON", VBMI="ON", AMX="OFF"),
    "amx": dict(INSTRUCT="AVX512", AVX512="ON", VNNI="ON", BF16="ON", VBMI="ON", AMX="ON"),
}

# Upstream's release wheels use these. kt-kernel compiles no CUDA kernels of
# its own (only host code that calls cudart), so the list matters only to
# CMake's compiler check; it is kept equal to upstream's for that reason.
DEFAULT_CUDA_ARCHS = "80;86;89;90;120"

# -m flag -> the /proc/cpuinfo flag a CPU needs to run code built with it.
_MFLAG_CPU = {
    "-msse3": "pni", "-mavx": "avx", "-mavx2": "avx2", "-mfma": "fma", "-mf16c": "f16c",
    "-mavx512f": "avx512f", "-mavx512bw": "avx512bw", "-mavx512dq": "avx512dq", "-mavx512vl": "avx512vl",
    "-mavx512vnni": "avx512_vnni", "-mavx512bf16": "avx512_bf16", "-mavx512vbmi": "avx512_vbmi",
    "-mamx-tile": "amx_tile", "-mamx-bf16": "amx_bf16", "-mamx-int8": "amx_int8",
}
_ISA_MFLAG = re.compile(r"^-m(sse\d*|ssse3|avx\w*|fma\w*|f16c|amx[\w-]*|bmi\d?|popcnt)$|^-march=")

MIN_SETUPTOOLS = (77, 0)  # kt-kernel's `license = "..."` string needs >= 77 (it declares >= 61)
MIN_CMAKE = (3, 16)


def _level(variant: str) -> int:
    return len(VARIANTS) - 1 - VARIANTS.index(variant)


def _check_isa_name(target_isa: str) -> str:
    if target_isa in VARIANTS:
        return target_isa
    if str(target_isa).upper() == "NATIVE":
        raise KtenvError(
            "A NATIVE kt-kernel build is not offered: it compiles with -march=native, which ties the "
            "wheel to the build machine's exact CPU and which Nix's cc-wrapper strips silently "
            f"(so the result depends on who builds it). Name the ISA instead: one of {', '.join(VARIANTS)} "
            "(`build.py doctor` shows the one this CPU gets).")
    raise KtenvError(
        f"'{target_isa}' is not a kt-kernel CPU variant. kt-kernel knows exactly {', '.join(VARIANTS)}; "
        "pick the one for the CPU that will run the server (`build.py doctor` on that machine shows it).")


def best_variant(flags: Iterable[str]) -> str | None:
    """The variant kt-kernel's loader picks for these /proc/cpuinfo flags.

    None when the CPU lacks even AVX2: the wheel would still load its AVX2
    build there (its last resort) and die on the first AVX2 instruction.
    """
    s = frozenset(f.lower() for f in flags)
    for variant in VARIANTS:
        if all(hostinfo.has_flag(s, f) for f in WHEEL_REQUIRES[variant]):
            return variant
    return None


def missing_instructions(variant: str, flags: Iterable[str]) -> list[str]:
    """CPU flags the variant's compiled code uses that these flags lack."""
    s = frozenset(f.lower() for f in flags)
    need = [_MFLAG_CPU[m] for m in compiler_flags(variant) if m in _MFLAG_CPU]
    return [f for f in dict.fromkeys(need) if not hostinfo.has_flag(s, f)]


def runnable_variants(flags: Iterable[str]) -> list[str]:
    """Best first: the variants whose every compiled instruction set this CPU has."""
    s = frozenset(f.lower() for f in flags)
    return [v for v in VARIANTS if not missing_instructions(v, s)]


def check_override(flags: Iterable[str], environ: Mapping[str, str] | None = None) -> str | None:
    """The KT_KERNEL_CPU_VARIANT in effect, or None; refuses one that cannot be right.

    kt-kernel lower-cases the value and accepts only its six names; anything
    else (say `avx512`) is ignored without a word, so the user's intent is
    silently dropped. A valid name skips kt-kernel's ISA check entirely, so
    one above this CPU loads and then dies with SIGILL mid-serve (#1713).
    """
    env = os.environ if environ is None else environ
    raw = env.get("KT_KERNEL_CPU_VARIANT", "")
    if not raw:
        return None
    value = raw.lower()
    if value not in VARIANTS:
        raise KtenvError(
            f"KT_KERNEL_CPU_VARIANT={raw!r} is not a kt-kernel variant, so kt-kernel ignores it without a "
            f"word and picks by itself. The valid names are exactly {', '.join(VARIANTS)}. Unset the "
            "variable (recommended: kt-kernel then picks the best this CPU runs) or set one of those names.")
    best = best_variant(flags)
    if best is None or _level(value) > _level(best):
        missing = missing_instructions(value, flags)
        raise KtenvError(
            f"KT_KERNEL_CPU_VARIANT={value} asks for instructions this CPU lacks ({', '.join(missing) or 'AVX2'}); "
            f"the best it runs is {best or 'none'}. kt-kernel skips its ISA check when the variable is set, "
            "so the server would load and then die with 'Illegal instruction' (SIGILL) on the first MoE "
            "forward (kvcache-ai/ktransformers#1713). Unset KT_KERNEL_CPU_VARIANT"
            + (f" or set it to {best}." if best else "."))
    return value


def build_settings(target_isa: str, cuda_archs: str = DEFAULT_CUDA_ARCHS, *, cuda: bool = True) -> dict[str, str]:
    """The CPUINFER_* environment for a portable, CUDA-enabled build for target_isa.

    Every toggle is explicit: any one left unset falls back to the build
    machine's CPU (AMX switches itself on where the builder has it; an unset or
    unknown CPUINFER_CPU_INSTRUCT means NATIVE), so the wheel would not run on
    the machine it was built for. cuda=False gives the CPU-only build that
    SGLang's hybrid path cannot use (#1760); ktenv's envs never ask for it.
    """
    t = _TOGGLES[_check_isa_name(target_isa)]
    settings = {
        "CPUINFER_CPU_INSTRUCT": t["INSTRUCT"],
        "CPUINFER_ENABLE_AVX512": t["AVX512"],
        "CPUINFER_ENABLE_AVX512_VNNI": t["VNNI"],
        "CPUINFER_ENABLE_AVX512_BF16": t["BF16"],
        "CPUINFER_ENABLE_AVX512_VBMI": t["VBMI"],
        "CPUINFER_ENABLE_AMX": t["AMX"],
        # oneDNN needs its own source tree; BLIS/KML are AMD-BLAS and ARM paths.
        "CPUINFER_ENABLE_ONEDNN_VNNI": "OFF",
        "CPUINFER_ENABLE_BLIS": "OFF",
        "CPUINFER_ENABLE_KML": "OFF",
        "CPUINFER_BUILD_TYPE": "Release",
        # SGLang's hybrid path needs CPUInfer.submit_with_cuda_stream (#1760).
        "CPUINFER_USE_CUDA": "1",
        "CPUINFER_CUDA_ARCHS": cuda_archs,
        # Static cudart: the env's torch brings its own libcudart, maybe another major.
        "CPUINFER_CUDA_STATIC_RUNTIME": "ON",
    }
    if not cuda:
        for k in ("CPUINFER_CUDA_ARCHS", "CPUINFER_CUDA_STATIC_RUNTIME"):
            del settings[k]
        settings["CPUINFER_USE_CUDA"] = "0"
    return settings


def compiler_flags(target_isa: str) -> list[str]:
    """The ISA flags kt-kernel's CMakeLists.txt passes for these settings, in its order."""
    t = _TOGGLES[_check_isa_name(target_isa)]
    flags = ["-mf16c", "-mfma", "-mavx", "-msse3", "-mavx2"]
    if t["INSTRUCT"] == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
    flags += [m for key, m in (("VBMI", "-mavx512vbmi"), ("VNNI", "-mavx512vnni"), ("BF16", "-mavx512bf16"))
              if t[key] == "ON"]
    if t["AMX"] == "ON":
        flags += ["-mamx-tile", "-mamx-bf16", "-mamx-int8"]
    return flags


# --- the prebuilt path ------------------------------------------------------------

def run_probe(env_python: str, environ: Mapping[str, str] | None = None, timeout: float = 300) -> dict:
    """Run probes/kt_probe.py with the env's python; its JSON, or KtenvError."""
    env = dict(os.environ if environ is None else environ)
    try:
        proc = subprocess.run([env_python, str(PROBE)], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=tempfile.gettempdir())
    except FileNotFoundError:
        raise KtenvError(f"The environment's python {env_python} does not exist; build the environment first.")
    except subprocess.TimeoutExpired:
        raise KtenvError(f"Importing kt_kernel with {env_python} took over {timeout:.0f} s; the env or "
                         "the filesystem is stuck. Try `python -c 'import kt_kernel'` there by hand.")
    if proc.returncode < 0:
        sig = -proc.returncode
        why = (" (SIGILL: the loaded build uses instructions this CPU lacks)" if sig == 4 else "")
        raise KtenvError(f"Importing kt_kernel in {env_python} was killed by signal {sig}{why}. "
                         f"stderr ends: {proc.stderr.strip()[-600:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_MARKER + " "):
            return json.loads(line[len(PROBE_MARKER) + 1:])
    raise KtenvError(f"The kt-kernel probe printed no report (exit {proc.returncode}) with {env_python}. "
                     f"stderr ends: {proc.stderr.strip()[-600:]}")


def verify_prebuilt(env_python: str, flags: Iterable[str] | None = None, *,
                    expected: str | None = None, environ: Mapping[str, str] | None = None) -> dict:
    """Check the env's kt-kernel: importable, the right variant, built with CUDA.

    flags: the CPU that will run it (default: this host's /proc/cpuinfo).
    expected: the variant that must load (default: the best for `flags`).
    Returns the probe's report plus `best`, `expected`, `override`.
    """
    flags = hostinfo.cpu_info().flags if flags is None else frozenset(f.lower() for f in flags)
    best = best_variant(flags)
    if best is None:
        raise KtenvError(
            "This CPU lacks AVX2, the least any kt-kernel build needs; its CPU MoE kernels cannot run "
            "here. Serve on an x86-64 CPU with AVX2 (AVX512 or AMX is much faster).")
    want = _check_isa_name(expected) if expected else best
    override = check_override(flags, environ)  # refuses SIGILL-bound or ignored overrides first
    report = run_probe(env_python, environ)
    if not report.get("ok"):
        raise KtenvError(
            f"kt_kernel does not import in {env_python}: {report.get('error')}. Without it the server cannot "
            "start. Rebuild the environment (`build.py env --arch ...`); if it persists, see the traceback "
            f"below.\n{report.get('traceback', '')}")
    loaded = report.get("variant") or ""
    report.update(best=best, expected=want, override=override)
    if loaded not in VARIANTS:
        raise KtenvError(f"kt_kernel loaded an extension that names its variant {loaded!r}, not one of "
                         f"{', '.join(VARIANTS)}; ktenv cannot tell whether it suits this CPU. Reinstall "
                         "the env's kt-kernel.")
    if _level(loaded) > _level(best):
        raise KtenvError(
            f"kt_kernel loaded its {loaded} build, which needs {', '.join(missing_instructions(loaded, flags))} "
            f"that this CPU lacks (best here: {best}); the first MoE forward would die with SIGILL "
            "(kvcache-ai/ktransformers#1713). "
            + ("Unset KT_KERNEL_CPU_VARIANT." if override else
               f"Rebuild kt-kernel for this CPU: `build.py env --arch ... --kt-source PATH --target-isa {best}`."))
    if loaded != want:
        if override:
            fix = f"Unset KT_KERNEL_CPU_VARIANT (it forces {override}) so kt-kernel picks {want}."
        elif report.get("single_variant_build"):
            fix = (f"This kt-kernel is a single-variant source build; rebuild it with --target-isa {want}, "
                   "or install the PyPI wheel, which carries all six.")
        else:
            fix = (f"The installed wheel ships {', '.join(report.get('variants_shipped') or []) or 'no variants'}; "
                   f"reinstall kt-kernel from PyPI (all six variants) or build it with --target-isa {want}.")
        raise KtenvError(
            f"kt_kernel loaded its {loaded} build, but this CPU runs {want}; the MoE layers would run on "
            f"slower kernels than the CPU supports. {fix}")
    if not report.get("cuda_stream"):
        raise KtenvError(
            f"The env's kt-kernel ({report.get('kt_kernel_version')}, {loaded}) was built without CUDA: "
            "CPUInfer has no submit_with_cuda_stream, which SGLang's hybrid CPU/GPU MoE path calls on every "
            "step, so the server fails at the first request (kvcache-ai/ktransformers#1760). Install the "
            "PyPI wheel (built with CUDA) or rebuild from source, where ktenv sets CPUINFER_USE_CUDA=1 "
            "(needs nvcc).")
    return report


# --- the source path --------------------------------------------------------------

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


def check_build_prerequisites(source: str | Path, python: str, target_isa: str,
                              environ: Mapping[str, str] | None = None, *, cuda: bool = True,
                              cxx: str | None = None) -> list[str]:
    """Every reason a kt-kernel build from `source` would fail here; [] when none.

    Checked before compiling because the build fails 3+ minutes in, deep inside
    CMake, for each of these.
    """
    env = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    kt = Path(source) / "kt-kernel"
    if not (kt / "setup.py").exists() or not (kt / "CMakeLists.txt").exists():
        problems.append(f"{source} is not a ktransformers checkout: {kt}/setup.py and CMakeLists.txt are missing. "
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
        if ver < MIN_CMAKE:
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
            isa = compiler_flags(target_isa) if target_isa in VARIANTS else []
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
        elif _version_tuple(st) < MIN_SETUPTOOLS:
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
    elif py is not None and not _cublas_include(nvcc, py):
        problems.append(f"cublas_v2.h is in neither the CUDA toolkit of {nvcc} nor the env's nvidia-cublas "
                        "wheel; kt-kernel's CUDA header includes it. Install the toolkit's cuBLAS headers "
                        "(e.g. cuda-libraries-dev) or install torch (with nvidia-cublas) into the env first.")
    return problems


def _git(source: Path, *args: str) -> str | None:
    try:
        r = _run(["git", "-C", str(source), *args])
    except FileNotFoundError:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def source_identity(source: str | Path) -> dict:
    """What the build's source is: commit, uncommitted changes, submodule heads.

    A checkout that is not a git repository is identified by the hash of its
    kt-kernel/ files, so an edit still invalidates the cache.
    """
    src = Path(source).resolve()
    ident: dict = {"path": str(src)}
    commit = _git(src, "rev-parse", "HEAD")
    if commit:
        ident["commit"] = commit
        # Only kt-kernel/ and the two submodules it builds matter; the rest of the repo does not.
        diff = _git(src, "diff", "HEAD", "--", "kt-kernel", "version.py") or ""
        untracked = _git(src, "ls-files", "--others", "--exclude-standard", "--", "kt-kernel") or ""
        ident["dirty"] = hashlib.sha256((diff + "\0" + untracked).encode()).hexdigest()[:16] if (diff or untracked) else None
    else:
        h = hashlib.sha256()
        for p in sorted((src / "kt-kernel").rglob("*")):
            if p.is_file() and "build" not in p.relative_to(src / "kt-kernel").parts[:1] and ".egg-info" not in str(p):
                h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes())
        ident["tree"] = h.hexdigest()[:16]
    subs = {}
    for sub in ("pybind11", "llama.cpp"):
        d = src / "third_party" / sub
        subs[sub] = _git(d, "rev-parse", "HEAD") if (d / ".git").exists() else None
    ident["submodules"] = subs
    pinned = {}
    for sub in ("pybind11", "llama.cpp"):
        line = _git(src, "ls-tree", "HEAD", f"third_party/{sub}") if commit else None
        pinned[sub] = line.split()[2] if line and len(line.split()) > 2 else None
    ident["submodules_pinned"] = pinned
    return ident


def _tool_version(cmd: list[str]) -> str | None:
    try:
        r = _run(cmd)
    except (FileNotFoundError, PermissionError):
        return None
    out = (r.stdout or r.stderr).strip().splitlines()
    return (out[0] if cmd[0].endswith("++") else out[-1]) if out else None


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _run_logged(cmd: list[str], cwd: Path, env: Mapping[str, str], log: Path,
                progress: Callable[[str], None]) -> int:
    """Run cmd, every line to `log`, CMake's [ NN%] steps to progress (each percent once)."""
    last = -1
    with open(log, "w") as fh, subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            m = _PERCENT.match(line)
            if m and int(m.group(1)) // 10 != last // 10:
                last = int(m.group(1))
                progress(f"kt-kernel build {last:3d}%: {line[m.end():].strip()[:100]}")
        return proc.wait()


def verify_compile_flags(build_dir: Path, target_isa: str) -> dict:
    """Read CMake's compile_commands.json: did every translation unit get exactly the ISA flags asked for?

    The guard against a build that quietly follows the build machine
    (-march=native) or leaks a higher ISA into a lower variant (upstream
    fixed AVX512 flags leaking into the AVX2 wheel in #2164).
    """
    files = sorted(build_dir.rglob("compile_commands.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise KtenvError(f"The kt-kernel build left no compile_commands.json under {build_dir}; cannot check "
                         "which instructions it was compiled for.")
    want = set(compiler_flags(target_isa))
    bad: dict[str, list[str]] = {}
    units = 0
    for entry in json.loads(files[-1].read_text()):
        args = entry.get("arguments") or entry.get("command", "").split()
        isa = {a for a in args if _ISA_MFLAG.match(a)}
        units += 1
        if isa != want and str(entry.get("file", "")).endswith((".c", ".cpp", ".cc")):
            extra, missing = sorted(isa - want), sorted(want - isa)
            bad[entry["file"]] = [f"+{x}" for x in extra] + [f"-{x}" for x in missing]
    if bad:
        first = next(iter(bad.items()))
        raise KtenvError(
            f"The kt-kernel build for {target_isa} compiled {len(bad)} of {units} files with other ISA flags "
            f"than asked for (e.g. {first[0]}: {' '.join(first[1])}); the wheel would not match the CPU it "
            "is meant for. Check CMAKE_ARGS/CFLAGS in your environment, or report it upstream.")
    return {"compile_commands": str(files[-1]), "units": units, "isa_flags": sorted(want)}


def build_from_source(source: str | Path, target_isa: str, python: str, cache_dir: str | Path,
                      progress: Callable[[str], None] = print, *, cuda_archs: str = DEFAULT_CUDA_ARCHS,
                      parallel: int | None = None, environ: Mapping[str, str] | None = None,
                      cuda: bool = True) -> Path:
    """Build (or reuse) a kt-kernel wheel from <source>/kt-kernel for target_isa; returns the wheel.

    python: the interpreter of the env the wheel is for (its ABI, setuptools
    and torch version go into the wheel and the cache key).
    Cached in <cache_dir>/kt-kernel/<key>/ by source commit (+ local edits and
    submodule heads), the CPUINFER_* settings, python version, torch version,
    compiler and nvcc versions. Builds run one at a time per cache dir.
    """
    target_isa = _check_isa_name(target_isa)
    src = Path(source).resolve()
    env = dict(os.environ if environ is None else environ)
    problems = check_build_prerequisites(src, python, target_isa, env, cuda=cuda)
    if problems:
        raise KtenvError(f"Cannot build kt-kernel from {src}; {len(problems)} prerequisite(s) missing:\n"
                         + "\n".join(f"  - {p}" for p in problems))
    py = _python_facts(python)
    nvcc = _find_nvcc(env) if cuda else None
    settings = build_settings(target_isa, cuda_archs, cuda=cuda)
    ident = source_identity(src)
    for sub, head in ident["submodules"].items():
        pin = ident["submodules_pinned"].get(sub)
        if head and pin and head != pin:
            progress(f"note: third_party/{sub} is at {head[:12]}, the checkout pins {pin[:12]}; "
                     "building with what is there.")
    nvcc_version = _tool_version([nvcc, "--version"]) if nvcc else None
    inputs = {
        "source": {k: v for k, v in ident.items() if k != "path"},
        "settings": settings,
        "python": py["version"], "abi": py["abi"], "torch": py["torch"],
        "cxx": _tool_version([cxx_compiler(env) or "c++", "--version"]),
        "nvcc": nvcc_version,
        "cmake_args": env.get("CMAKE_ARGS", ""),
    }
    return build_wheel_cached(src, inputs, settings, python, Path(cache_dir), progress, target_isa=target_isa,
                              parallel=parallel, environ=env, nvcc=nvcc, py=py)


def build_wheel_cached(src: Path, inputs: dict, settings: dict[str, str], python: str, cache_dir: Path,
                       progress: Callable[[str], None] = print, *, target_isa: str | None = None,
                       parallel: int | None = None, environ: Mapping[str, str] | None = None,
                       nvcc: str | None = None, py: dict | None = None) -> Path:
    """The cache and build step of build_from_source, without its prerequisite checks.

    inputs: everything that identifies the result (the cache key is its hash);
    target_isa: when given, the compile flags are checked after the build.
    """
    env = dict(os.environ if environ is None else environ)
    py = py or _python_facts(python)
    key = cache_key(inputs)
    entry = cache_dir / "kt-kernel" / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / ".lock", "w") as lock:
        # One build at a time: each compiler process takes ~3.5 GB, and two
        # builds of one checkout would share its build/ directory.
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheels = sorted(entry.glob("*.whl"))
        if wheels and (entry / "build.json").exists():
            progress(f"kt-kernel wheel for {target_isa or 'this source'} from the cache: {wheels[0]}")
            return wheels[0]
        work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
        work.chmod(0o755)  # mkdtemp makes it 0700; a cache may be shared
        try:
            benv = {k: v for k, v in env.items() if not k.startswith("CPUINFER_")}
            benv.update(settings)
            benv["CPUINFER_PARALLEL"] = str(parallel or max(1, min(os.cpu_count() or 1, 2)))
            # A pip-installed cmake in the build env should win over none at all.
            benv["PATH"] = os.pathsep.join([str(Path(python).parent), benv.get("PATH", "")])
            if nvcc and "CPUINFER_USE_CUDA" in settings:
                inc = _cublas_include(nvcc, py)
                if inc and not (Path(nvcc).resolve().parent.parent / "include" / "cublas_v2.h").exists():
                    benv["CPATH"] = os.pathsep.join(p for p in (inc, benv.get("CPATH", "")) if p)
                    progress(f"note: cublas_v2.h taken from {inc} (the toolkit of {nvcc} has none)")
            out = work / "dist"
            code = ("import sys\nfrom setuptools import build_meta as b\n"
                    "print('KTENV_WHEEL', b.build_wheel(sys.argv[1]))\n")
            progress(f"building kt-kernel for {target_isa or 'the given settings'} from {src} "
                     f"({benv['CPUINFER_PARALLEL']} jobs; a few minutes per variant), log: {work / 'build.log'}")
            t0 = time.monotonic()
            rc = _run_logged([python, "-c", code, str(out)], src / "kt-kernel", benv, work / "build.log", progress)
            seconds = round(time.monotonic() - t0, 1)
            if rc != 0:
                keep = entry.parent / f"failed-{key}.log"
                shutil.copy(work / "build.log", keep)
                tail = "".join((work / "build.log").read_text(errors="replace").splitlines(True)[-25:])
                raise KtenvError(f"Building kt-kernel from {src} for {target_isa or 'the given settings'} failed (exit {rc}) after "
                                 f"{seconds} s. Full log: {keep}. It ends:\n{tail}")
            wheels = sorted(out.glob("*.whl"))
            if len(wheels) != 1:
                raise KtenvError(f"The kt-kernel build finished but left {len(wheels)} wheels in {out}; "
                                 "expected one. See the log in the cache.")
            checked = verify_compile_flags(src / "kt-kernel" / "build", target_isa) if target_isa else {}
            meta = {"key": key, "inputs": inputs, "settings": settings, "target_isa": target_isa, "seconds": seconds,
                    "wheel": wheels[0].name, "flags_check": checked,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            shutil.move(str(wheels[0]), work / wheels[0].name)
            (work / "build.json").write_text(json.dumps(meta, indent=1) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            if entry.exists():
                shutil.rmtree(entry)
            work.rename(entry)  # atomic: a cache entry is complete or absent
            progress(f"kt-kernel wheel built in {seconds} s: {entry / meta['wheel']}")
            return entry / meta["wheel"]
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)


def stamp_config(path: str, target_isa: str, *, verified: dict | None = None,
                 build: Path | None = None, flags: Iterable[str] | None = None) -> dict:
    """The kt-kernel part of an env's stamp and report.

    path: "prebuilt" (the PyPI wheel, verified) or "source" (built by ktenv).
    verified: verify_prebuilt's report; build: the wheel build_from_source returned.
    """
    if path not in ("prebuilt", "source"):
        raise ValueError(f"path must be 'prebuilt' or 'source', not {path!r}")
    target_isa = _check_isa_name(target_isa)
    host = hostinfo.cpu_info().flags if flags is None else frozenset(flags)
    stamp: dict = {
        "path": path,
        "target_isa": target_isa,
        "host_best": best_variant(host),
        "host_isa": hostinfo.isa_summary(host),
        "compiler_flags": compiler_flags(target_isa),
    }
    if verified:
        stamp.update({k: verified.get(k) for k in
                      ("variant", "kt_kernel_version", "cuda_stream", "extension_file", "override", "int8_kernel")})
    if path == "source":
        stamp["build_settings"] = build_settings(target_isa)
        if build is not None:
            stamp["wheel"] = str(build)
            meta = Path(build).parent / "build.json"
            if meta.exists():
                m = json.loads(meta.read_text())
                stamp.update(cache_key=m["key"], source=m["inputs"]["source"], built_seconds=m["seconds"])
    return stamp


if __name__ == "__main__":  # a quick look: python -m ktenv.ktkernel
    cpu = hostinfo.cpu_info()
    print(json.dumps({"cpu": cpu.model, "isa": hostinfo.isa_summary(cpu.flags),
                      "best": best_variant(cpu.flags), "runnable": runnable_variants(cpu.flags)}, indent=1))
    sys.exit(0)
