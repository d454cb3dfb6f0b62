"""Build kt-kernel from a ktransformers checkout, for a named CPU variant, with CUDA.

setup.py's defaults follow the *build* machine (NATIVE, AMX switched on where
the builder has it), so every toggle is set explicitly (variants.build_settings),
prerequisites are checked first (each would fail minutes into CMake), the
compile commands are read back afterwards, and the wheel is cached by
(source commit, settings, Python, torch, nvcc).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping

from ...errors import KtenvError
from ...spec.model import KtKernel
from .. import wheelcache
from .prereq import (
    _cublas_include,
    _find_nvcc,
    _python_facts,
    _run,
    check_build_prerequisites,
    cxx_compiler,
)
from .variants import ISA_MFLAG, build_settings, check_isa_name, compiler_flags


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


cache_key = wheelcache.key_of


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


def verify_compile_flags(kt: KtKernel, build_dir: Path, target_isa: str) -> dict:
    """Read CMake's compile_commands.json: did every translation unit get exactly the ISA flags asked for?

    The guard against a build that quietly follows the build machine
    (-march=native) or leaks a higher ISA into a lower variant (upstream
    fixed AVX512 flags leaking into the AVX2 wheel in #2164).
    """
    files = sorted(build_dir.rglob("compile_commands.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise KtenvError(f"The kt-kernel build left no compile_commands.json under {build_dir}; cannot check "
                         "which instructions it was compiled for.")
    want = set(compiler_flags(kt, target_isa))
    bad: dict[str, list[str]] = {}
    units = 0
    for entry in json.loads(files[-1].read_text()):
        args = entry.get("arguments") or entry.get("command", "").split()
        isa = {a for a in args if ISA_MFLAG.match(a)}
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


def build_from_source(kt: KtKernel, source: str | Path, target_isa: str, python: str, cache_dir: str | Path,
                      progress: Callable[[str], None] = print, *, cuda_archs: str | None = None,
                      parallel: int | None = None, environ: Mapping[str, str] | None = None,
                      cuda: bool = True) -> Path:
    """Build (or reuse) a kt-kernel wheel from <source>/kt-kernel for target_isa; returns the wheel.

    python: the interpreter of the env the wheel is for (its ABI, setuptools
    and torch version go into the wheel and the cache key).
    Cached in <cache_dir>/kt-kernel/<key>/ by source commit (+ local edits and
    submodule heads), the CPUINFER_* settings, python version, torch version,
    compiler and nvcc versions. Builds run one at a time per cache dir.
    """
    target_isa = check_isa_name(kt, target_isa)
    src = Path(source).resolve()
    env = dict(os.environ if environ is None else environ)
    problems = check_build_prerequisites(kt, src, python, target_isa, env, cuda=cuda, cuda_archs=cuda_archs)
    if problems:
        raise KtenvError(f"Cannot build kt-kernel from {src}; {len(problems)} prerequisite(s) missing:\n"
                         + "\n".join(f"  - {p}" for p in problems))
    py = _python_facts(python)
    nvcc = _find_nvcc(env) if cuda else None
    settings = build_settings(kt, target_isa, cuda_archs, cuda=cuda)
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
    return build_wheel_cached(kt, src, inputs, settings, python, Path(cache_dir), progress, target_isa=target_isa,
                              parallel=parallel, environ=env, nvcc=nvcc, py=py)


def build_wheel_cached(kt: KtKernel, src: Path, inputs: dict, settings: dict[str, str], python: str, cache_dir: Path,
                       progress: Callable[[str], None] = print, *, target_isa: str | None = None,
                       parallel: int | None = None, environ: Mapping[str, str] | None = None,
                       nvcc: str | None = None, py: dict | None = None) -> Path:
    """The cache and build step of build_from_source, without its prerequisite checks.

    inputs: everything that identifies the result (the cache key is its hash);
    target_isa: when given, the compile flags are checked after the build.
    """
    env = dict(os.environ if environ is None else environ)
    py = py or _python_facts(python)
    # One build at a time (wheelcache.slot): each compiler process takes ~3.5 GB, and two
    # builds of one checkout would share its build/ directory.
    with wheelcache.slot(cache_dir / "kt-kernel", cache_key(inputs)) as slot:
        if slot.hit:
            progress(f"kt-kernel wheel for {target_isa or 'this source'} from the cache: {slot.hit}")
            return slot.hit
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
        out = slot.work / "dist"
        progress(f"building kt-kernel for {target_isa or 'the given settings'} from {src} "
                 f"({benv['CPUINFER_PARALLEL']} jobs; a few minutes per variant), log: {slot.log}")
        t0 = time.monotonic()
        rc = _run_logged([python, "-c", wheelcache.BUILD_WHEEL, str(out)], src / "kt-kernel", benv, slot.log, progress)
        seconds = round(time.monotonic() - t0, 1)
        if rc != 0:
            keep = slot.keep_log()
            tail = "".join(slot.log.read_text(errors="replace").splitlines(True)[-25:])
            raise KtenvError(f"Building kt-kernel from {src} for {target_isa or 'the given settings'} failed (exit {rc}) after "
                             f"{seconds} s. Full log: {keep}. It ends:\n{tail}")
        wheels = sorted(out.glob("*.whl"))
        if len(wheels) != 1:
            raise KtenvError(f"The kt-kernel build finished but left {len(wheels)} wheels in {out}; "
                             "expected one. See the log in the cache.")
        checked = verify_compile_flags(kt, src / "kt-kernel" / "build", target_isa) if target_isa else {}
        meta = {"key": slot.key, "inputs": inputs, "settings": settings, "target_isa": target_isa, "seconds": seconds,
                "wheel": wheels[0].name, "flags_check": checked}
        wheel = slot.publish(wheels[0], meta, scratch=("dist",))
        progress(f"kt-kernel wheel built in {seconds} s: {wheel}")
        return wheel
