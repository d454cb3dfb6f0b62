"""ktkernel: variant choice, build settings, prebuilt verification, source builds.

The real 0.7.2 env comes from conftest's stack_env fixture (built by ktenv).
Environment knobs (each test that needs one skips, naming it, when it is absent):
  KTENV_KT_SOURCE        a ktransformers checkout with third_party/pybind11 and llama.cpp filled in
  KTENV_KT_CACHE         where source-build tests keep wheels between runs (default /tmp/ktenv-kt-cache)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import cuda12_home, cuda13_home, run_cli
from ktenv import spec as specmod
from ktenv.build import toolchain
from ktenv.build.ktkernel import install, prereq, source, variants, verify
from ktenv.host import cpu as hostinfo
from ktenv import probe
from ktenv.probe import PROBES
from ktenv.tools import uv_bin
from ktenv.errors import KtenvError

FIX = Path(__file__).parents[1] / "fixtures"
KT = specmod.load(Path(__file__).parents[2] / "envs").knowledge.kt_kernel
KT_SOURCE = os.environ.get("KTENV_KT_SOURCE")
KT_CACHE = Path(os.environ.get("KTENV_KT_CACHE", "/tmp/ktenv-kt-cache"))

needs_source = pytest.mark.skipif(not KT_SOURCE or not (Path(KT_SOURCE) / "kt-kernel/setup.py").exists(),
                                  reason="KTENV_KT_SOURCE does not name a ktransformers checkout")


def flags_of(name: str) -> frozenset[str]:
    return hostinfo.cpu_info((FIX / "cpuinfo" / name).read_text()).flags


SPR, ZEN4, SKX, CLX, HSW, HOSTCOPY = (
    "sapphire-rapids-xeon-8462y.txt", "zen4-threadripper-7960x.txt", "skylake-sp-xeon-gold-6140.txt",
    "cascade-lake-xeon-silver-4214.txt", "haswell-e-i7-5820k.txt", "kvm-amd-epyc-zen4-2vcpu.txt")
HOST = hostinfo.cpu_info().flags
HOST_BEST = variants.best_variant(KT, HOST)


# --- variant choice ---------------------------------------------------------------

@pytest.mark.parametrize("name, variant, runnable", [
    (SPR, "amx", list(KT.variants)),
    (ZEN4, "avx512_bf16", ["avx512_bf16", "avx512_vbmi", "avx512_vnni", "avx512_base", "avx2"]),
    (SKX, "avx512_base", ["avx512_base", "avx2"]),
    (CLX, "avx512_vnni", ["avx512_vnni", "avx512_base", "avx2"]),
    (HSW, "avx2", ["avx2"]),
    (HOSTCOPY, "avx512_bf16", ["avx512_bf16", "avx512_vbmi", "avx512_vnni", "avx512_base", "avx2"]),
    ("emerald-rapids-kvm-16vcpu.txt", "amx", list(KT.variants)),
])
def test_best_variant_per_generation(name, variant, runnable):
    f = flags_of(name)
    assert variants.best_variant(KT, f) == variant
    assert variants.runnable_variants(KT, f) == runnable
    assert variants.missing_instructions(KT, variant, f) == []


def test_amx_needs_all_three_tiles_and_full_avx512():
    f = flags_of(SPR)
    assert variants.best_variant(KT, f - {"amx_bf16"}) == "avx512_bf16"
    # The wheel demands VBMI for AMX too; without it AMX is not chosen.
    assert variants.best_variant(KT, f - {"avx512vbmi"}) == "avx512_vnni"


def test_no_avx2_means_no_variant():
    f = flags_of(HSW) - {"avx2"}
    assert variants.best_variant(KT, f) is None
    assert variants.runnable_variants(KT, f) == []


def test_this_host_gets_what_the_wheel_itself_picks(stack_python):
    ENV_PYTHON = str(stack_python)
    # kt-kernel's own detector, run in the real env, is the reference for
    # "exactly as the wheel does" on this machine.
    report = verify.run_probe(ENV_PYTHON, {k: v for k, v in os.environ.items() if k != "KT_KERNEL_CPU_VARIANT"})
    assert report["ok"], report
    assert report["wheel_detected"] == HOST_BEST == report["variant"]


# --- build settings and flags -----------------------------------------------------

TOGGLES = ("CPUINFER_CPU_INSTRUCT", "CPUINFER_ENABLE_AVX512", "CPUINFER_ENABLE_AVX512_VNNI",
           "CPUINFER_ENABLE_AVX512_BF16", "CPUINFER_ENABLE_AVX512_VBMI", "CPUINFER_ENABLE_AMX")
EXPECTED_TOGGLES = {
    "avx2": ("AVX2", "OFF", "OFF", "OFF", "OFF", "OFF"),
    "avx512_base": ("AVX512", "ON", "OFF", "OFF", "OFF", "OFF"),
    "avx512_vnni": ("AVX512", "ON", "ON", "OFF", "OFF", "OFF"),
    "avx512_vbmi": ("AVX512", "ON", "ON", "OFF", "ON", "OFF"),
    "avx512_bf16": ("AVX512", "ON", "ON", "ON", "ON", "OFF"),
    "amx": ("AVX512", "ON", "ON", "ON", "ON", "ON"),
}
AVX2_FLAGS = ["-mf16c", "-mfma", "-mavx", "-msse3", "-mavx2"]
AVX512_FLAGS = AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
EXPECTED_FLAGS = {
    "avx2": AVX2_FLAGS,
    "avx512_base": AVX512_FLAGS,
    "avx512_vnni": AVX512_FLAGS + ["-mavx512vnni"],
    "avx512_vbmi": AVX512_FLAGS + ["-mavx512vbmi", "-mavx512vnni"],
    "avx512_bf16": AVX512_FLAGS + ["-mavx512vbmi", "-mavx512vnni", "-mavx512bf16"],
    "amx": AVX512_FLAGS + ["-mavx512vbmi", "-mavx512vnni", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
}


@pytest.mark.parametrize("isa", KT.variants)
def test_build_settings_set_every_toggle(isa):
    s = variants.build_settings(KT, isa)
    assert tuple(s[k] for k in TOGGLES) == EXPECTED_TOGGLES[isa]
    assert s["CPUINFER_USE_CUDA"] == "1" and s["CPUINFER_CUDA_STATIC_RUNTIME"] == "ON"
    assert s["CPUINFER_CUDA_ARCHS"] == "80;86;89;90;120"
    assert "NATIVE" not in json.dumps(s)
    assert variants.compiler_flags(KT, isa) == EXPECTED_FLAGS[isa]
    assert not any(f.startswith("-march") for f in variants.compiler_flags(KT, isa))


@pytest.mark.parametrize("name", [SPR, ZEN4, SKX, CLX, HSW])
def test_each_generation_runs_the_code_of_its_settings(name):
    # The chosen variant's compiler flags must all map to instructions the CPU has.
    f = flags_of(name)
    best = variants.best_variant(KT, f)
    assert variants.missing_instructions(KT, best, f) == []
    above = KT.variants[:KT.variants.index(best)]
    assert all(variants.missing_instructions(KT, v, f) for v in above)


def test_cpu_only_settings_turn_cuda_off():
    s = variants.build_settings(KT, "avx2", cuda=False)
    assert s["CPUINFER_USE_CUDA"] == "0" and "CPUINFER_CUDA_ARCHS" not in s


def test_native_and_unknown_targets_are_refused():
    with pytest.raises(KtenvError, match=r"-march=native.*Nix's cc-wrapper"):
        variants.build_settings(KT, "NATIVE")
    with pytest.raises(KtenvError, match=r"'avx512' is not a kt-kernel CPU variant.*exactly amx, avx512_bf16"):
        variants.compiler_flags(KT, "avx512")


# --- KT_KERNEL_CPU_VARIANT ----------------------------------------------------------

def test_override_unset_and_valid():
    assert variants.check_override(KT, flags_of(SPR), {}) is None
    assert variants.check_override(KT, flags_of(SPR), {"KT_KERNEL_CPU_VARIANT": "AVX2"}) == "avx2"


def test_override_bogus_name_is_refused():
    with pytest.raises(KtenvError, match=r"KT_KERNEL_CPU_VARIANT='avx512' is not a kt-kernel variant.*ignores it"):
        variants.check_override(KT, flags_of(SPR), {"KT_KERNEL_CPU_VARIANT": "avx512"})


def test_override_above_the_cpu_is_refused():
    with pytest.raises(KtenvError, match=r"KT_KERNEL_CPU_VARIANT=amx asks for instructions this CPU lacks "
                                         r"\(amx_tile, amx_bf16, amx_int8\).*SIGILL.*#1713.*set it to avx512_bf16"):
        variants.check_override(KT, flags_of(ZEN4), {"KT_KERNEL_CPU_VARIANT": "amx"})
    with pytest.raises(KtenvError, match=r"avx512_vnni asks for instructions this CPU lacks \(avx512f, avx512bw"):
        variants.check_override(KT, flags_of(HSW), {"KT_KERNEL_CPU_VARIANT": "avx512_vnni"})


# --- verify_prebuilt against the real env --------------------------------------------

def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("KT_KERNEL_CPU_VARIANT", "PYTHONPATH")}
    env.update(extra)
    return env


def test_verify_prebuilt_real_env(stack_python):
    ENV_PYTHON = str(stack_python)
    r = verify.verify_prebuilt(KT, ENV_PYTHON, environ=clean_env())
    assert r["variant"] == r["best"] == HOST_BEST
    assert r["cuda_stream"] is True and r["kt_kernel_version"] == "0.7.2"
    assert set(r["variants_shipped"]) == set(KT.variants)
    stamp = install.stamp_config(KT, "prebuilt", r["variant"], verified=r)
    assert stamp["variant"] == HOST_BEST and stamp["path"] == "prebuilt" and stamp["cuda_stream"] is True
    assert stamp["compiler_flags"] == variants.compiler_flags(KT, HOST_BEST)


def test_verify_prebuilt_refuses_a_forced_lower_variant(stack_python):
    ENV_PYTHON = str(stack_python)
    lower = variants.runnable_variants(KT, HOST)[-1]  # avx2
    if lower == HOST_BEST:
        pytest.skip("this CPU runs only the avx2 variant; nothing lower to force")
    with pytest.raises(KtenvError, match=rf"loaded its {lower} build, but this CPU runs {HOST_BEST}.*"
                                         rf"Unset KT_KERNEL_CPU_VARIANT \(it forces {lower}\)"):
        verify.verify_prebuilt(KT, ENV_PYTHON, environ=clean_env(KT_KERNEL_CPU_VARIANT=lower))


def test_verify_prebuilt_refuses_a_bogus_override(stack_python):
    ENV_PYTHON = str(stack_python)
    with pytest.raises(KtenvError, match=r"KT_KERNEL_CPU_VARIANT='avx512' is not a kt-kernel variant"):
        verify.verify_prebuilt(KT, ENV_PYTHON, environ=clean_env(KT_KERNEL_CPU_VARIANT="avx512"))


def test_verify_prebuilt_refuses_an_override_above_the_cpu(stack_python):
    ENV_PYTHON = str(stack_python)
    if HOST_BEST == "amx":
        pytest.skip("this CPU runs every variant; none is above it")
    with pytest.raises(KtenvError, match=r"KT_KERNEL_CPU_VARIANT=amx asks for instructions this CPU lacks.*SIGILL"):
        verify.verify_prebuilt(KT, ENV_PYTHON, environ=clean_env(KT_KERNEL_CPU_VARIANT="amx"))


def test_verify_prebuilt_for_a_bigger_cpu_says_not_best(stack_python):
    ENV_PYTHON = str(stack_python)
    # Told the server CPU is a Sapphire Rapids, the env (which loads what this
    # host runs) is not the best that CPU could use.
    if HOST_BEST == "amx":
        pytest.skip("this host loads amx already")
    with pytest.raises(KtenvError, match=rf"loaded its {HOST_BEST} build, but this CPU runs amx.*reinstall"):
        verify.verify_prebuilt(KT, ENV_PYTHON, flags_of(SPR), environ=clean_env())


def test_verify_prebuilt_reports_an_import_failure(tmp_path, stack_python):
    ENV_PYTHON = str(stack_python)
    # A kt_kernel package that shadows the real one and cannot import.
    bad = tmp_path / "kt_kernel"
    bad.mkdir()
    (bad / "__init__.py").write_text("raise ImportError('libnuma.so.1: cannot open shared object file')\n")
    with pytest.raises(KtenvError, match=r"kt_kernel does not import.*libnuma.so.1"):
        verify.verify_prebuilt(KT, ENV_PYTHON, environ=clean_env(PYTHONPATH=str(tmp_path)))


def test_verify_prebuilt_without_an_env(tmp_path):
    with pytest.raises(KtenvError, match=r"does not exist; build the environment first"):
        verify.verify_prebuilt(KT, str(tmp_path / "bin/python"), flags_of(ZEN4), environ=clean_env())


# --- prerequisites (stand-in checkout) -------------------------------------------------

def standin(tmp_path: Path, submodules: bool = True) -> Path:
    src = tmp_path / "ktransformers"
    shutil.copytree(FIX / "ktsource", src)
    if submodules:
        for sub in ("pybind11", "llama.cpp"):
            (src / "third_party" / sub).mkdir(parents=True)
            (src / "third_party" / sub / "CMakeLists.txt").write_text("# stand-in\n")
    return src


def test_prerequisites_missing_submodules_and_not_a_checkout(tmp_path):
    problems = prereq.check_build_prerequisites(KT, standin(tmp_path, submodules=False), sys.executable, "avx2")
    text = "\n".join(problems)
    assert "third_party/pybind11 is empty" in text and "third_party/llama.cpp is empty" in text
    assert "submodule update --init third_party/pybind11 third_party/llama.cpp" in text
    problems = prereq.check_build_prerequisites(KT, tmp_path / "nowhere", sys.executable, "avx2")
    assert any("is not a ktransformers checkout" in p for p in problems)


def test_prerequisites_missing_tools_each_named(tmp_path):
    # A PATH with none of pkg-config, cmake or nvcc, and no CUDA_HOME.
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {"PATH": str(empty), "HOME": str(tmp_path)}
    problems = "\n".join(prereq.check_build_prerequisites(KT, standin(tmp_path), sys.executable, "avx2", env))
    assert "pkg-config is not on PATH" in problems
    assert "cmake is not on PATH" in problems
    if not Path("/usr/local/cuda/bin/nvcc").exists() and not Path("/usr/bin/nvcc").exists():
        assert "nvcc was not found" in problems


def test_prerequisites_hwloc_not_found(tmp_path):
    assert shutil.which("pkg-config"), "pkg-config is missing: scripts/bootstrap.sh installs it"
    env = dict(os.environ, PKG_CONFIG_LIBDIR=str(tmp_path), PKG_CONFIG_PATH="")
    problems = prereq.check_build_prerequisites(KT, standin(tmp_path), sys.executable, "avx2", env)
    assert any("pkg-config cannot find hwloc" in p and "libhwloc-dev" in p for p in problems)


def test_prerequisites_old_or_missing_setuptools(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    problems = prereq.check_build_prerequisites(KT, standin(tmp_path), str(venv / "bin/python"), "avx2")
    assert any("setuptools is not installed in the build python" in p for p in problems)
    import setuptools
    if prereq._version_tuple(setuptools.__version__) < KT.min_setuptools:
        problems = prereq.check_build_prerequisites(KT, standin(tmp_path / "b"), sys.executable, "avx2")
        assert any(f"setuptools {setuptools.__version__}" in p and "too old" in p for p in problems)


def test_prerequisites_compiler_without_numa_headers(tmp_path):
    assert Path("/usr/bin/g++").exists(), "g++ is missing: scripts/bootstrap.sh installs it"
    # A real g++ whose sysroot is empty: it finds no system headers, numa.h first.
    wrapper = tmp_path / "g++-nosysroot"
    wrapper.write_text(f"#!/bin/sh\nexec /usr/bin/g++ --sysroot={tmp_path / 'empty'} \"$@\"\n")
    wrapper.chmod(0o755)
    problems = prereq.check_build_prerequisites(KT, standin(tmp_path), sys.executable, "avx2", cxx=str(wrapper))
    assert any("cannot find numa.h" in p and "apt install libnuma-dev" in p for p in problems), problems


def test_prerequisites_pass_on_a_complete_checkout_here(tmp_path, stack_python):
    """With what scripts/bootstrap.sh installs (hwloc/numa headers, pkg-config, cmake, g++, Debian's CUDA
    12.4, torch's major) and the env's setuptools >= 77. CUDA 12.4 compiles for 8.9 and 9.0, not 12.0:
    the default CPUINFER_CUDA_ARCHS (with 120) is refused with it, tested in test_toolchain."""
    env = dict(os.environ, CUDA_HOME=str(cuda12_home()))
    problems = prereq.check_build_prerequisites(KT, standin(tmp_path), str(stack_python), HOST_BEST, env, cuda_archs="89;90")
    assert problems == []


def _record(home: str | None) -> dict:
    """The toolchain record `env` makes for sm90 (toolchain.env_record), with `home` as --cuda-home."""
    policy = toolchain.load(toolchain.default_envs())
    if home is None:
        return toolchain.as_dict(toolchain.Choice(toolchain.need(policy, "sm90", "12.8"), None))
    return toolchain.as_dict(toolchain.select(policy, toolchain.need(policy, "sm90", "12.8"), cuda_home=home,
                                              environ={"PATH": os.defpath}))


def test_source_build_compiles_with_the_envs_toolkit_and_what_it_can_target(tmp_path, stack_env):
    """`env --kt-source` builds with the toolkit the env chose (its activation), not the shell's nvcc:
    here the shell has CUDA 13 on PATH and the env chose Debian's 12.4, which cannot target sm_120, so
    the arch list is the env's own SM, and the prerequisites (same nvcc test) then pass."""
    rec = _record(str(cuda12_home()))
    assert rec["cuda_home"] and rec["version"].startswith("12.4")
    shell = dict(os.environ, PATH=f"{cuda13_home()}/bin:{os.defpath}")
    environ, archs, note = install.cuda_inputs(KT, stack_env, rec, 90, shell)
    assert environ["CUDA_HOME"] == rec["cuda_home"]
    assert environ["PATH"].split(":").index(f"{rec['cuda_home']}/bin") < environ["PATH"].split(":").index(f"{cuda13_home()}/bin")
    assert archs == "90" and f"not upstream's {KT.default_cuda_archs}" in note and "nvcc 12.4" in note
    src = standin(tmp_path)
    problems = prereq.check_build_prerequisites(KT, src, str(stack_env / "bin/python"), HOST_BEST,
                                                environ, cuda_archs=archs)
    assert problems == []
    # The same shell without the env's choice: kt-kernel's setup.py would take CUDA 13 and is refused.
    problems = prereq.check_build_prerequisites(KT, src, str(stack_env / "bin/python"), HOST_BEST,
                                                shell, cuda_archs=KT.default_cuda_archs)
    assert any("is CUDA 13" in p for p in problems), problems


def test_source_build_keeps_upstreams_arch_list_when_the_toolkit_covers_it(stack_env):
    # A record as env writes it for a 12.8 toolkit (the NVIDIA redist), which cannot be fetched here:
    # only its version decides the list.
    rec = {"cuda_home": "/opt/cuda-12.8", "nvcc": "/opt/cuda-12.8/bin/nvcc", "version": "12.8.93",
           "origin": "--cuda-home", "torch_cuda": "12.8", "include_dirs": [], "lib_dir": ""}
    environ, archs, note = install.cuda_inputs(KT, stack_env, rec, 90, {"PATH": os.defpath})
    assert (archs, note) == (KT.default_cuda_archs, "") and environ["CUDA_HOME"] == "/opt/cuda-12.8"
    # No toolkit chosen: the build sees the shell as it is (and its prerequisite check names the problem).
    environ, archs, note = install.cuda_inputs(KT, stack_env, _record(None), 90, {"PATH": os.defpath})
    assert environ == {"PATH": os.defpath} and archs == KT.default_cuda_archs and note == ""


def test_env_kt_source_builds_with_the_toolkit_env_chose(tmp_path, stack_env):
    """End to end through `build.py env`: the shell has CUDA 13 first on PATH, --cuda-home names
    Debian's 12.4; the kt-kernel source step runs with 12.4 and the env's SM (its progress says so),
    so the only problems left are the checkout's (no submodules), and nothing is left behind."""
    src = standin(tmp_path, submodules=False)
    (src / "version.py").write_text('__version__ = "0.7.2"\n')  # the lock's release
    prefix = tmp_path / "env"
    shell = {"PATH": f"{cuda13_home()}/bin:{os.environ['PATH']}", "CUDA_HOME": ""}
    p = run_cli("env", "--arch", "sm90", "--prefix", str(prefix), "--kt-source", str(src),
                "--cuda-home", str(cuda12_home()), env=shell)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "kt-kernel: CPUINFER_CUDA_ARCHS=90 (the env's GPU)" in out and "nvcc 12.4" in out
    assert "third_party/pybind11 is empty" in out and "is CUDA 13" not in out
    assert not prefix.exists()
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".env")] == [".env.ktenv.lock"]  # the (empty) lock file only


# --- compile-flag guard -------------------------------------------------------------------

def test_compile_flag_guard_catches_a_leak(tmp_path):
    build = tmp_path / "build/temp/x"
    build.mkdir(parents=True)
    ok = " ".join(["/usr/bin/g++", "-O3", *variants.compiler_flags(KT, "avx2"), "-c", "a.cpp"])
    leak = ok + " -mavx512f -mavx512bw"
    native = ok + " -march=native"
    entries = [{"file": "/s/a.cpp", "command": ok, "directory": "/"}]
    (build / "compile_commands.json").write_text(json.dumps(entries))
    assert source.verify_compile_flags(KT, tmp_path / "build", "avx2")["units"] == 1
    for bad, word in ((leak, r"\+-mavx512bw \+-mavx512f"), (native, r"\+-march=native")):
        (build / "compile_commands.json").write_text(json.dumps(entries + [{"file": "/s/b.c", "command": bad}]))
        with pytest.raises(KtenvError, match=rf"compiled 1 of 2 files with other ISA flags.*b.c: {word}"):
            source.verify_compile_flags(KT, tmp_path / "build", "avx2")


# --- the wheel cache (stand-in checkout, real setuptools build) ----------------------------

@pytest.fixture(scope="module")
def build_python(tmp_path_factory):
    """A venv with setuptools >= 77: uv, from its cache if it can, else PyPI."""
    venv = tmp_path_factory.mktemp("buildpy") / "venv"
    uv = uv_bin()
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    for extra in (["--offline"], []):
        r = subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin/python"), *extra,
                            "setuptools>=77"], capture_output=True, text=True)
        if r.returncode == 0:
            return str(venv / "bin/python")
    pytest.fail(f"cannot install setuptools>=77 (uv cache and PyPI both failed): {r.stderr[-400:]}")


def test_wheel_cache_reuses_and_keys_on_settings(tmp_path, build_python):
    src = standin(tmp_path)
    cache = tmp_path / "cache"
    lines: list[str] = []
    settings = variants.build_settings(KT, "avx512_vnni")
    inputs = {"source": source.source_identity(src), "settings": settings}
    env = dict(os.environ, CPUINFER_CPU_INSTRUCT="NATIVE", CPUINFER_BUILD_ALL_VARIANTS="1")  # must not leak in
    whl = source.build_wheel_cached(KT, src, inputs, settings, build_python, cache, lines.append, environ=env)
    assert whl.exists() and whl.parent.parent == cache / "kt-kernel"
    with zipfile.ZipFile(whl) as z:
        seen = json.loads(z.read("kt_kernel/build_settings.json"))
    assert {k: v for k, v in seen.items() if k != "CPUINFER_PARALLEL"} == settings
    meta = json.loads((whl.parent / "build.json").read_text())
    assert meta["settings"] == settings and (whl.parent / "build.log").exists()
    assert any("building kt-kernel" in line for line in lines) and any("100%" in line for line in lines)

    lines.clear()
    again = source.build_wheel_cached(KT, src, inputs, settings, build_python, cache, lines.append, environ=env)
    assert again == whl and any("from the cache" in line for line in lines)

    other = variants.build_settings(KT, "avx2")
    third = source.build_wheel_cached(KT, src, {**inputs, "settings": other}, other, build_python, cache, lines.append)
    assert third != whl and third.parent != whl.parent


def test_source_identity_changes_with_edits(tmp_path):
    src = standin(tmp_path)
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    clean = source.source_identity(src)
    assert clean["commit"] and clean["dirty"] is None
    (src / "kt-kernel" / "CMakeLists.txt").write_text("# edited\n")
    dirty = source.source_identity(src)
    assert dirty["commit"] == clean["commit"] and dirty["dirty"]
    assert source.cache_key({"s": clean}) != source.cache_key({"s": dirty})


def test_build_failure_keeps_the_log_and_says_so(tmp_path, build_python):
    src = standin(tmp_path)
    (src / "kt-kernel" / "setup.py").write_text("raise SystemExit('CMake Error: Could NOT find OpenMP_CXX')\n")
    settings = variants.build_settings(KT, "avx2")
    with pytest.raises(KtenvError, match=r"(?s)Building kt-kernel from .* failed \(exit 1\).*Full log: .*failed-.*"
                                         r"Could NOT find OpenMP_CXX"):
        source.build_wheel_cached(KT, src, {"settings": settings, "t": 1}, settings, build_python, tmp_path / "c",
                                    lambda m: None)
    assert not list((tmp_path / "c" / "kt-kernel").glob("[0-9a-f]*[0-9a-f]"))  # no half-made entry


def test_build_from_source_refuses_before_compiling(tmp_path):
    with pytest.raises(KtenvError, match=r"Cannot build kt-kernel from .*prerequisite\(s\) missing:\n  - .*"
                                         r"third_party/pybind11 is empty"):
        source.build_from_source(KT, standin(tmp_path, submodules=False), "avx2", sys.executable, tmp_path / "c")
    with pytest.raises(KtenvError, match=r"-march=native"):
        source.build_from_source(KT, standin(tmp_path / "b"), "NATIVE", sys.executable, tmp_path / "c")


# --- the real build (slow; cached in KTENV_KT_CACHE) ----------------------------------------

def unpack(wheel: Path, dest: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
    return str(dest)


@pytest.mark.slow
@needs_source
def test_real_build_for_this_cpu_loads_and_computes(tmp_path, stack_python, stack_env):
    ENV_PYTHON = str(stack_python)
    # What `env --kt-source` passes: the env's toolkit (Debian's 12.4 here) and the arch list it can target.
    environ, archs, _ = install.cuda_inputs(KT, stack_env, _record(str(cuda12_home())), 90)
    whl = source.build_from_source(KT, KT_SOURCE, HOST_BEST, ENV_PYTHON, KT_CACHE, progress=print,
                                   cuda_archs=archs, environ=environ)
    meta = json.loads((whl.parent / "build.json").read_text())
    assert meta["flags_check"]["isa_flags"] == sorted(variants.compiler_flags(KT, HOST_BEST))
    assert meta["flags_check"]["units"] > 50
    # Shadow the env's kt_kernel with the built one (the env itself stays untouched).
    env = clean_env(PYTHONPATH=unpack(whl, tmp_path / "site"))
    r = verify.verify_prebuilt(KT, ENV_PYTHON, environ=env)
    assert r["variant"] == HOST_BEST and r["single_variant_build"] and r["cuda_stream"]
    assert r["package_dir"].startswith(str(tmp_path))
    out = subprocess.run([ENV_PYTHON, str(PROBES / "kt_moe.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    moe = probe.parse(out.stdout)
    assert out.returncode == 0 and moe["passed"] and moe["variant"] == HOST_BEST, moe
    stamp = install.stamp_config(KT, "source", HOST_BEST, verified=r, build=whl)
    assert stamp["cache_key"] == meta["key"] and stamp["build_settings"]["CPUINFER_USE_CUDA"] == "1"


@pytest.mark.slow
@needs_source
def test_real_cpu_only_build_is_refused_for_serving(tmp_path, stack_python):
    ENV_PYTHON = str(stack_python)
    whl = source.build_from_source(KT, KT_SOURCE, "avx2", ENV_PYTHON, KT_CACHE, progress=print, cuda=False)
    env = clean_env(PYTHONPATH=unpack(whl, tmp_path / "site"))
    # Built for avx2 on purpose: verify against what it was built for, so the CUDA check decides.
    with pytest.raises(KtenvError, match=r"built without CUDA: CPUInfer has no submit_with_cuda_stream.*#1760"):
        verify.verify_prebuilt(KT, ENV_PYTHON, expected="avx2", environ=env)
    if HOST_BEST != "avx2":
        with pytest.raises(KtenvError, match=r"single-variant source build; rebuild it with --target-isa"):
            verify.verify_prebuilt(KT, ENV_PYTHON, environ=env)


# --- the MXFP4 MoE probe the smoke "kernel" tier reuses ------------------------------------

def run_moe(python: str, *args: str, **env) -> tuple[int, dict]:
    p = subprocess.run([python, str(PROBES / "kt_moe.py"), *args], capture_output=True,
                       text=True, env=clean_env(**env), timeout=600)
    return p.returncode, probe.parse(p.stdout)  # stdout is the report line alone


def test_kt_moe_matches_torch(stack_python):
    ENV_PYTHON = str(stack_python)
    rc, r = run_moe(ENV_PYTHON, )
    assert rc == 0 and r["passed"] is True, r
    assert r["variant"] == HOST_BEST and r["backend"] in ("AMXFP4_KGroup_MOE", "AVX2MXFP4_MOE")
    assert r["shape"] == {"experts": 8, "hidden": 256, "intermediate": 512, "topk": 2, "group_size": 32}
    assert [c["qlen"] for c in r["cases"]] == [1, 32]
    assert all(c["rel_l1"] <= r["tolerance"]["rel_l1"] == 0.03 for c in r["cases"])
    assert r["seconds"] > 0


@pytest.mark.parametrize("corrupt", ["scales", "nibbles"])
def test_kt_moe_fails_on_wrong_weights(corrupt, stack_python):
    ENV_PYTHON = str(stack_python)
    rc, r = run_moe(ENV_PYTHON, "--corrupt", corrupt)
    assert rc == 1 and r["passed"] is False and r["corrupt"] == corrupt
    assert all(not c["passed"] and c["rel_l1"] > 0.5 for c in r["cases"])


def test_kt_moe_avx2_variant_and_bench_mode(stack_python):
    ENV_PYTHON = str(stack_python)
    rc, r = run_moe(ENV_PYTHON, "--bench", "--qlen", "4", "--bench-seconds", "0.2", KT_KERNEL_CPU_VARIANT="avx2")
    assert rc == 0 and r["variant"] == "avx2" and r["backend"] == "AVX2MXFP4_MOE"
    assert r["results"][0]["qlen"] == 4 and r["results"][0]["tokens_per_s"] > 0


def test_kt_moe_reports_a_missing_backend(stack_python):
    ENV_PYTHON = str(stack_python)
    rc, r = run_moe(ENV_PYTHON, "--backend", "amx", KT_KERNEL_CPU_VARIANT="avx2")  # the avx2 build has no AMXFP4 class
    assert rc == 2 and r["passed"] is False and "no AMXFP4_KGroup_MOE" in r["error"]
