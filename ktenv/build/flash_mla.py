"""flash_mla for Hopper: FlashMLA's SM90 kernels, built from a pinned revision and installed into an env.

On compute capability 9.0 sglang-kt 0.7.2 imports flash_mla for every batch's
DeepSeek-V4 attention metadata and decodes through it, with no fallback; no
wheel on PyPI fits the stack's torch and CUDA (envs/sm90.toml [flash_mla] says
which revision and why). So ktenv builds one, the way it builds kt-kernel:

  check      the checkout is the pinned revision: git's object ids of setup.py,
             csrc/ and flash_mla/ computed from the files on disk, so an archive
             without .git is identified as well, and a local edit is refused;
             CUTLASS headers at the submodule's commit, the same way; the env's
             python, torch and setuptools; a toolkit (`cuda_home`, found by the
             toolchain stage) whose nvcc major is torch's CUDA major and whose
             version is at least the pin's min_cuda, compiling a test kernel for
             sm_90a with the host compiler. Every problem is reported, one
             sentence each, before anything is built.
  build      FlashMLA's own setup.py, run from a staged copy of the checked
             files (the checkout is never written to) with FLASH_MLA_DISABLE_SM100,
             so only sm_90a is compiled; no GPU is needed. Its two git calls
             (`submodule update`, which would go to the network, and the
             `rev-parse` that names the version) are answered by a shim so the
             wheel is `1.0.0+<short commit>`, as upstream's own build names it.
  cache      <cache>/flash-mla/<key>/ by commit, CUTLASS commit, setup env,
             python, torch, torch's CUDA, nvcc and host compiler versions.
  audit      cuobjdump (the caller passes check/cuobjdump's pinned one; else
             $KTENV_CUOBJDUMP or the toolkit's) must list exactly the pin's
             SASS (sm_90a) in the extension, and no PTX.
  install    `uv pip install --no-deps` into the env, then a probe imports it
             and checks the calls sglang-kt makes exist.

Public API (the first four live in flash_mla_source.py, audit_wheel in flash_mla_audit.py; all re-exported):
  Pin, pin_for(arch) -> Pin | None
  tree_id(path, gitlinks=None) -> str | None
  check_source(source, pin) -> dict                  raises KtenvError
  find_cutlass(source, pin, cutlass=None) -> Path    raises KtenvError
  nvcc_version(cuda_home) -> str | None
  check_prerequisites(source, python, cuda_home, pin, cutlass=None) -> list[str]
  build_wheel(source, python, cuda_home, pin, cache, progress=print, cutlass=None, jobs=None) -> Path
  install(env_python, wheel) -> dict                 the stamp entry, after a verified import
  audit_wheel(wheel, pin, cuobjdump) -> dict         exactly the pin's SASS, no PTX
  verify(env_python) -> dict                         is flash_mla there and what sglang-kt calls (`ok`)
  provide(env_python, source, cuda_home, pin, ...) -> dict   all of the above
  missing_message(arch, pin, stack=None) -> str      what an env without flash_mla says

flash_mla_env.py joins this to `build.py env` (the step, the stamp entry, the
summary) and to `launch` (its refusal).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from .. import probe
from ..errors import KtenvError
from ..tools import uv_bin
from . import wheelcache
from .cuda_fetch import nvcc_release
from .flash_mla_audit import audit_wheel
from .flash_mla_source import (  # noqa: F401 (re-exported)
    _IGNORED,
    Pin,
    check_source,
    find_cutlass,
    pin_for,
    tree_id,
)

PROBE = "flash_mla_probe.py"
MIN_SETUPTOOLS = (70, 1)  # bdist_wheel is built into setuptools from 70.1; the env has no `wheel`
_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s")


# --- the env and the toolkit ---------------------------------------------------------

def _probe(python: str, mode: str, timeout: float = 300) -> dict:
    run = probe.run(os.path.abspath(python), PROBE, [mode], timeout=timeout)
    if run.result is None:
        raise KtenvError(f"The flash_mla probe ({mode}) with {python} {run.why}.")
    return run.result


def _vtuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def nvcc_version(cuda_home: str | Path) -> str | None:
    """'12.8' for a toolkit whose nvcc says 'release 12.8'; None when there is no working nvcc."""
    v = nvcc_release(Path(cuda_home) / "bin" / "nvcc")
    return ".".join(v.split(".")[:2]) if v else None


def _try_compile(cuda_home: Path, env: Mapping[str, str]) -> str | None:
    """Compile a one-line kernel for sm_90a with C++20, as FlashMLA's build will; the error, or None."""
    with tempfile.TemporaryDirectory(prefix="ktenv-flashmla-") as d:
        cu = Path(d, "t.cu")
        cu.write_text("#include <cuda_fp8.h>\n__global__ void k(float* x) { x[threadIdx.x] += 1.f; }\n")
        cmd = [str(cuda_home / "bin" / "nvcc"), "-std=c++20", "-gencode", "arch=compute_90a,code=sm_90a",
               "-c", str(cu), "-o", str(Path(d, "t.o"))]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=dict(env), timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        return None if p.returncode == 0 else " ".join((p.stderr or p.stdout).split())[-500:]


def check_prerequisites(source: str | Path, python: str, cuda_home: str | Path | None, pin: Pin,
                        cutlass: str | Path | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Everything a build needs, one sentence per missing thing; [] when it can start."""
    problems: list[str] = []
    for check in (lambda: check_source(source, pin), lambda: find_cutlass(source, pin, cutlass)):
        try:
            check()
        except KtenvError as e:
            problems.append(str(e))
    facts: dict = {}
    try:
        facts = _probe(python, "facts")
    except KtenvError as e:
        problems.append(str(e))
    torch_cuda = facts.get("torch_cuda")
    if facts and facts.get("torch_error"):
        problems.append(f"torch does not import with {python} ({facts['torch_error']}); FlashMLA compiles against the "
                        "env's torch. Build the env first.")
    elif facts and not torch_cuda:
        problems.append(f"The torch in {python} ({facts.get('torch')}) is a CPU build; FlashMLA needs a CUDA build of torch.")
    if facts and _vtuple(facts.get("setuptools", "0")) < MIN_SETUPTOOLS:
        problems.append(f"setuptools {facts.get('setuptools', 'is missing')} in {python}: FlashMLA's setup.py needs "
                        f"setuptools >= {'.'.join(map(str, MIN_SETUPTOOLS))} to write a wheel. Install it there.")
    if facts and not facts.get("python_h"):
        problems.append(f"Python.h is missing for {python} ({facts.get('include')}); the extension includes it "
                        "(Debian: apt install python3-dev).")
    if facts and not (Path(facts["bin"], "ninja").exists() or shutil.which("ninja")):
        problems.append(f"ninja is in neither {facts['bin']} nor PATH; torch's extension builder needs it to compile "
                        "in parallel (and to report progress). Install ninja into the env.")
    version = None
    if cuda_home is None:
        problems.append(f"No CUDA toolkit was found whose major version matches torch's CUDA {torch_cuda or '?'} and "
                        f"that is at least {pin.min_cuda}; FlashMLA's SM90 V4 kernels need it to compile (no GPU "
                        f"needed). Install CUDA {pin.min_cuda} or newer of that major and pass --cuda-home (or set "
                        f"CUDA_HOME); `python build.py toolchain` lists what was found and what ktenv can fetch.")
    else:
        version = nvcc_version(cuda_home)
        if version is None:
            problems.append(f"{Path(cuda_home) / 'bin' / 'nvcc'} does not exist or does not run; "
                            f"CUDA_HOME={cuda_home} is not a usable CUDA toolkit.")
        elif torch_cuda and _vtuple(version)[0] != _vtuple(torch_cuda)[0]:
            problems.append(f"nvcc {version} ({cuda_home}) is CUDA {_vtuple(version)[0]}, but the env's torch is built "
                            f"for CUDA {torch_cuda}; torch refuses to build extensions with an nvcc of another major "
                            f"version. Use a CUDA {_vtuple(torch_cuda)[0]}.x toolkit >= {pin.min_cuda}.")
        elif _vtuple(version) < _vtuple(pin.min_cuda):
            problems.append(f"nvcc {version} ({cuda_home}) is older than CUDA {pin.min_cuda}, which FlashMLA's SM90 V4 "
                            f"decode kernel needs (cuda_fp8.h's __nv_fp8_e8m0 type; {pin.source.name} [flash_mla] "
                            f"min_cuda). Point --cuda-home at a CUDA {_vtuple(version)[0]}.x toolkit >= {pin.min_cuda} "
                            f"(`python build.py toolchain` lists what was found and what ktenv can fetch).")
    if not problems and cuda_home is not None:
        err = _try_compile(Path(cuda_home), _build_env(environ, Path(cuda_home), None, pin, 1, None))
        if err:
            problems.append(f"nvcc {version} ({cuda_home}) cannot compile a C++20 kernel for sm_90a with this host "
                            f"compiler: {err}. Install a host compiler that nvcc {version} supports (set CC/CXX).")
    return problems


# --- the build ---------------------------------------------------------------------

def env_includes(site: str | Path) -> list[str]:
    """The env's nvidia-* wheel header dirs (cuBLAS, cuSPARSE, cuSOLVER ...).

    torch's CUDA headers include cusparse.h, cublas_v2.h and cusolverDn.h; a
    toolkit that has only the compiler (a minimal or PyPI-assembled one) lacks
    them, while the env's own nvidia-* wheels ship them for torch's CUDA.
    They go on CPATH, which the compilers search after every -I, so a full
    toolkit's own headers still win.
    """
    return sorted(str(p) for p in Path(site).glob("nvidia/*/include") if p.is_dir())


def _build_env(environ: Mapping[str, str] | None, cuda_home: Path, shim: Path | None, pin: Pin, jobs: int,
               python: str | None, includes: list[str] | None = None) -> dict:
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if not k.startswith("FLASH_MLA_") and k not in ("TORCH_CUDA_ARCH_LIST", "NVCC_THREADS")}
    if includes:
        env["CPATH"] = os.pathsep.join([p for p in (env.get("CPATH"),) if p] + includes)
    env.update(pin.build_env)
    env.update(CUDA_HOME=str(cuda_home), MAX_JOBS=str(jobs),
               # setup.py's default is 32 nvcc threads per file: ~1.5 GB each on these kernels.
               NVCC_THREADS="1", TORCH_CUDA_ARCH_LIST="9.0a")
    front = [str(shim)] if shim else []
    front += [str(cuda_home / "bin")] + ([str(Path(python).parent)] if python else [])
    env["PATH"] = os.pathsep.join(front + [env.get("PATH", "")])
    return env


def _stage(src: Path, cutlass: Path, pin: Pin, work: Path) -> Path:
    """A copy of exactly the checked files, with the CUTLASS headers linked in."""
    stage = work / "src"
    for rel in pin.trees:
        a = src / rel
        if a.is_dir():
            shutil.copytree(a, stage / rel, symlinks=True,
                            ignore=lambda d, names: [n for n in names if _IGNORED.search(n) or
                                                     (Path(d) == src / "csrc" and n == "cutlass")])
        else:
            stage.mkdir(parents=True, exist_ok=True)
            shutil.copy2(a, stage / rel)
    for rel in pin.cutlass_trees:
        (stage / "csrc" / "cutlass" / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / "csrc" / "cutlass" / rel).symlink_to(cutlass / rel)
    shim = work / "shim"
    shim.mkdir()
    (shim / "git").write_text(
        "#!/bin/sh\n# FlashMLA's setup.py asks git for two things; ktenv answers both (see ktenv/build/flash_mla.py).\n"
        f'case "$*" in\n  "rev-parse --short HEAD") echo {pin.short} ;;\n'
        '  "submodule update --init csrc/cutlass") exit 0 ;;\n'
        '  *) echo "ktenv: unexpected git call during the flash_mla build: git $*" >&2; exit 1 ;;\nesac\n')
    (shim / "git").chmod(0o755)
    return stage


def _run_logged(cmd: list[str], cwd: Path, env: dict, log: Path, progress: Callable[[str], None],
                heartbeat: float) -> int:
    """Run the build; ninja's [n/N] steps to progress, and a line every `heartbeat` s while one compiles."""
    state = {"step": "starting", "t": time.monotonic()}
    t0, stop = time.monotonic(), threading.Event()

    def beat():
        while not stop.wait(heartbeat):
            progress(f"flash_mla build: still compiling ({time.monotonic() - t0:.0f} s; at {state['step']})")

    threading.Thread(target=beat, daemon=True).start()
    try:
        with open(log, "w") as fh, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            for line in proc.stdout:  # type: ignore[union-attr]
                fh.write(line)
                m = _STEP.match(line)
                if m:
                    unit = re.findall(r"(\S+\.(?:cu|cpp))\b", line)
                    # ninja's [n/N] counts finished steps; the line names the one it starts now
                    state["step"] = f"{m.group(1)}/{m.group(2)} done, compiling {Path(unit[-1]).name if unit else '?'}"
                    progress(f"flash_mla build: {state['step']}")
            return proc.wait()
    finally:
        stop.set()


def _cxx_version(env: Mapping[str, str]) -> str | None:
    cxx = env.get("CXX") or "c++"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, env=dict(env), timeout=60).stdout
    except OSError:
        return None
    return out.splitlines()[0] if out else None


def build_wheel(source: str | Path, python: str, cuda_home: str | Path | None, pin: Pin, cache: str | Path,
                progress: Callable[[str], None] = print, *, cutlass: str | Path | None = None,
                jobs: int | None = None, environ: Mapping[str, str] | None = None, heartbeat: float = 60.0,
                cuobjdump: str | None = None) -> Path:
    """Check, then build (or reuse from the cache) the flash_mla wheel for this env; returns the wheel.

    cuobjdump: the lister for the SASS audit (the check stage's pinned one, from
    the caller); default $KTENV_CUOBJDUMP, else the toolkit's own bin/cuobjdump.
    """
    problems = check_prerequisites(source, python, cuda_home, pin, cutlass, environ)
    if problems:
        raise KtenvError(f"Cannot build flash_mla from {source}; {len(problems)} prerequisite(s) missing:\n"
                         + "\n".join(f"  - {p}" for p in problems))
    src, home = Path(source).resolve(), Path(cuda_home).resolve()  # type: ignore[arg-type]
    headers = find_cutlass(src, pin, cutlass)
    facts = _probe(python, "facts")
    # Each nvcc of these kernels takes 2-4 GB; more jobs than that fits only swaps.
    jobs = jobs or max(1, min(os.cpu_count() or 1, (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 4_000_000_000))
    inputs = {"commit": pin.commit, "cutlass": pin.cutlass_commit, "build_env": pin.build_env, "sass": list(pin.sass),
              "python": facts["python"], "abi": facts["abi"], "torch": facts["torch"], "torch_cuda": facts["torch_cuda"],
              "nvcc": nvcc_version(home), "cxx": _cxx_version(environ or os.environ)}
    # One build at a time (wheelcache.slot): memory, not CPU, is the limit.
    with wheelcache.slot(Path(cache) / "flash-mla", wheelcache.key_of(inputs)) as slot:
        if slot.hit:
            progress(f"flash_mla wheel from the cache: {slot.hit}")
            return slot.hit
        work = slot.work
        stage = _stage(src, headers, pin, work)
        # CUDA 13 moved CCCL (cuda/std, cub) to include/cccl, which nvcc's profile adds for .cu
        # files but g++ does not know for the .cpp ones that include CUTLASS.
        cccl = [str(home / "include" / "cccl")] if (home / "include" / "cccl").is_dir() else []
        env = _build_env(environ, home, work / "shim", pin, jobs, python, cccl + env_includes(facts["site"]))
        progress(f"building flash_mla {pin.short} for {', '.join(pin.sass)} with nvcc {inputs['nvcc']} "
                 f"({jobs} jobs; tens of minutes on a few cores), log: {slot.log}")
        t0 = time.monotonic()
        rc = _run_logged([python, "-c", wheelcache.BUILD_WHEEL, str(work / "dist")], stage, env, slot.log, progress, heartbeat)
        seconds = round(time.monotonic() - t0, 1)
        if rc != 0:
            keep = slot.keep_log()
            errors = [l for l in slot.log.read_text(errors="replace").splitlines() if "error" in l.lower()]
            raise KtenvError(f"Building flash_mla {pin.short} failed (exit {rc}) after {seconds} s. First errors:\n  "
                             + "\n  ".join(errors[:6]) + f"\nFull log: {keep}")
        built = sorted((work / "dist").glob("*.whl"))
        if len(built) != 1:
            raise KtenvError(f"The flash_mla build finished but left {len(built)} wheels in {work / 'dist'}; expected one.")
        audit = audit_wheel(built[0], pin, cuobjdump or os.environ.get("KTENV_CUOBJDUMP")
                            or str(home / "bin" / "cuobjdump"))
        meta = {"key": slot.key, "inputs": inputs, "seconds": seconds, "jobs": jobs, "wheel": built[0].name, "audit": audit}
        wheel = slot.publish(built[0], meta, scratch=("src", "dist", "shim"))
        progress(f"flash_mla wheel built in {seconds} s; SASS {', '.join(audit['sass'])}: {wheel}")
        return wheel


def verify(env_python: str) -> dict:
    """Does the env's flash_mla import and offer what sglang-kt calls? The probe's report; `ok` says it all.

    For the env's end, `launch --arch sm90` and the import tier: without ok,
    they say missing_message().
    """
    return _probe(env_python, "verify")


def install(env_python: str, wheel: str | Path) -> dict:
    """Install the wheel into the env (no dependencies: torch is the env's) and prove it imports."""
    p = subprocess.run([uv_bin(), "pip", "install", "--python", env_python, "--no-deps", "--no-index", "--reinstall",
                        str(wheel)], capture_output=True, text=True, timeout=600)
    if p.returncode:
        raise KtenvError(f"Installing {Path(wheel).name} into the env of {env_python} failed: {p.stderr.strip()[-800:]}")
    report = verify(env_python)
    if not report.get("ok"):
        why = report.get("error") or (f"missing {report.get('missing_kwargs')}, ops {report.get('ops')}, "
                                      f"metadata {report.get('metadata_type')}")
        raise KtenvError(f"flash_mla was installed from {Path(wheel).name} but is not what sglang-kt calls: {why}. "
                         f"{report.get('traceback', '')}")
    return {k: report.get(k) for k in ("version", "extension", "ops")}


def provide(env_python: str, source: str | Path, cuda_home: str | Path | None, pin: Pin, cache: str | Path,
            progress: Callable[[str], None] = print, *, cutlass: str | Path | None = None,
            jobs: int | None = None, cuobjdump: str | None = None, environ: Mapping[str, str] | None = None) -> dict:
    """Build (or reuse), install and verify flash_mla; the dict is the env stamp's `flash_mla` entry.

    environ: the build's environment (toolchain.build_env of the env's toolchain record: CUDA_HOME, PATH, CPATH, CC/CXX)."""
    wheel = build_wheel(source, env_python, cuda_home, pin, cache, progress, cutlass=cutlass, jobs=jobs,
                        cuobjdump=cuobjdump, environ=environ)
    installed = install(env_python, wheel)
    meta = json.loads((wheel.parent / "build.json").read_text())
    progress(f"flash_mla {installed['version']} installed and imports ({', '.join(installed['ops'] or [])})")
    return {"path": "source", "commit": pin.commit, "cutlass_commit": pin.cutlass_commit, "wheel": str(wheel),
            "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(), "cache_key": meta["key"],
            "inputs": meta["inputs"], "sass": meta["audit"]["sass"], "built_seconds": meta["seconds"], **installed}


def missing_message(arch, pin: Pin | None = None, stack=None) -> str:
    """What `env --arch sm90` ends with, `launch` refuses with and the import tier names, without flash_mla."""
    pin = pin or pin_for(arch)
    release = f"sglang-kt {stack.default}" if stack is not None else "sglang-kt"
    cuda = f" (CUDA {stack.cuda}, torch {stack.torch_cuda})" if stack is not None else ""
    commit = pin.commit if pin else "the pinned commit"
    need = pin.min_cuda if pin else "12.8"
    return (f"This {arch.name} env cannot serve DeepSeek-V4 on {arch.title}: flash_mla is not installed. {release} "
            f"imports it on compute capability {arch.compute_capability} whenever it builds attention metadata (every "
            f"prefill and decode, and CUDA-graph capture) and decodes through it, with no fallback there; no wheel on "
            f"PyPI fits this stack{cuda}. Provide it by building FlashMLA from source into the env: "
            f"`build.py env --arch {arch.name} --flash-mla-source PATH`, where PATH is a clone of "
            f"{pin.repository if pin else 'https://github.com/deepseek-ai/FlashMLA'} at commit {commit} with its "
            f"csrc/cutlass submodule (`git checkout {commit[:12]} && git submodule update --init csrc/cutlass`), and a "
            f"CUDA {need}+ toolkit of torch's CUDA major on the machine (the build compiles for sm_90a and needs no GPU).")
