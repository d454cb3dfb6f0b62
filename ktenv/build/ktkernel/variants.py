"""KT-Kernel's CPU variants: which one a CPU gets, which it can run, how each is built.

KT-Kernel's PyPI wheel ships one build of its extension per x86 ISA level and
picks one at import from /proc/cpuinfo. The variants, the flags each needs
and the CMake toggles each is built with are kt-kernel's own facts, read from
envs/ktkernel.toml (`spec.knowledge.kt_kernel`, passed in as `kt`); this
module only reasons about them.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

from ...errors import KtenvError
from ...host.cpu import has_flag
from ...spec.model import KtKernel

# -m flag -> the /proc/cpuinfo flag a CPU needs to run code built with it
# (GCC's meaning of the flags, not kt-kernel's).
MFLAG_CPU = {
    "-msse3": "pni", "-mavx": "avx", "-mavx2": "avx2", "-mfma": "fma", "-mf16c": "f16c",
    "-mavx512f": "avx512f", "-mavx512bw": "avx512bw", "-mavx512dq": "avx512dq", "-mavx512vl": "avx512vl",
    "-mavx512vnni": "avx512_vnni", "-mavx512bf16": "avx512_bf16", "-mavx512vbmi": "avx512_vbmi",
    "-mamx-tile": "amx_tile", "-mamx-bf16": "amx_bf16", "-mamx-int8": "amx_int8",
}
ISA_MFLAG = re.compile(r"^-m(sse\d*|ssse3|avx\w*|fma\w*|f16c|amx[\w-]*|bmi\d?|popcnt)$|^-march=")


def level(kt: KtKernel, variant: str) -> int:
    """Higher is a bigger ISA (avx2 is 0)."""
    return len(kt.variants) - 1 - kt.variants.index(variant)


def check_isa_name(kt: KtKernel, target_isa: str) -> str:
    if target_isa in kt.variants:
        return target_isa
    if str(target_isa).upper() == "NATIVE":
        raise KtenvError(
            "A NATIVE kt-kernel build is not offered: it compiles with -march=native, which ties the "
            "wheel to the build machine's exact CPU and which Nix's cc-wrapper strips silently "
            f"(so the result depends on who builds it). Name the ISA instead: one of {', '.join(kt.variants)} "
            "(`build.py doctor` shows the one this CPU gets).")
    raise KtenvError(
        f"'{target_isa}' is not a kt-kernel CPU variant. kt-kernel knows exactly {', '.join(kt.variants)}; "
        "pick the one for the CPU that will run the server (`build.py doctor` on that machine shows it).")


def best_variant(kt: KtKernel, flags: Iterable[str]) -> str | None:
    """The variant kt-kernel's loader picks for these /proc/cpuinfo flags.

    None when the CPU lacks even AVX2: the wheel would still load its AVX2
    build there (its last resort) and die on the first AVX2 instruction.
    """
    s = frozenset(f.lower() for f in flags)
    for variant in kt.variants:
        if all(has_flag(s, f) for f in kt.requires[variant]):
            return variant
    return None


def compiler_flags(kt: KtKernel, target_isa: str) -> list[str]:
    """The ISA flags kt-kernel's CMakeLists.txt passes for a variant's toggles, in its order."""
    t = kt.toggles[check_isa_name(kt, target_isa)]
    flags = ["-mf16c", "-mfma", "-mavx", "-msse3", "-mavx2"]
    if t["INSTRUCT"] == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
    flags += [m for key, m in (("VBMI", "-mavx512vbmi"), ("VNNI", "-mavx512vnni"), ("BF16", "-mavx512bf16"))
              if t[key] == "ON"]
    if t["AMX"] == "ON":
        flags += ["-mamx-tile", "-mamx-bf16", "-mamx-int8"]
    return flags


def missing_instructions(kt: KtKernel, variant: str, flags: Iterable[str]) -> list[str]:
    """CPU flags the variant's compiled code uses that these flags lack."""
    s = frozenset(f.lower() for f in flags)
    need = [MFLAG_CPU[m] for m in compiler_flags(kt, variant) if m in MFLAG_CPU]
    return [f for f in dict.fromkeys(need) if not has_flag(s, f)]


def runnable_variants(kt: KtKernel, flags: Iterable[str]) -> list[str]:
    """Best first: the variants whose every compiled instruction set this CPU has."""
    s = frozenset(f.lower() for f in flags)
    return [v for v in kt.variants if not missing_instructions(kt, v, s)]


def check_override(kt: KtKernel, flags: Iterable[str], environ: Mapping[str, str] | None = None) -> str | None:
    """The KT_KERNEL_CPU_VARIANT in effect, or None; refuses one that cannot be right.

    kt-kernel lower-cases the value and accepts only its own names; anything
    else (say `avx512`) is ignored without a word, so the user's intent is
    silently dropped. A valid name skips kt-kernel's ISA check entirely, so
    one above this CPU loads and then dies with SIGILL mid-serve (#1713).
    """
    env = os.environ if environ is None else environ
    raw = env.get("KT_KERNEL_CPU_VARIANT", "")
    if not raw:
        return None
    value = raw.lower()
    if value not in kt.variants:
        raise KtenvError(
            f"KT_KERNEL_CPU_VARIANT={raw!r} is not a kt-kernel variant, so kt-kernel ignores it without a "
            f"word and picks by itself. The valid names are exactly {', '.join(kt.variants)}. Unset the "
            "variable (recommended: kt-kernel then picks the best this CPU runs) or set one of those names.")
    best = best_variant(kt, flags)
    if best is None or level(kt, value) > level(kt, best):
        missing = missing_instructions(kt, value, flags)
        raise KtenvError(
            f"KT_KERNEL_CPU_VARIANT={value} asks for instructions this CPU lacks ({', '.join(missing) or 'AVX2'}); "
            f"the best it runs is {best or 'none'}. kt-kernel skips its ISA check when the variable is set, "
            "so the server would load and then die with 'Illegal instruction' (SIGILL) on the first MoE "
            "forward (kvcache-ai/ktransformers#1713). Unset KT_KERNEL_CPU_VARIANT"
            + (f" or set it to {best}." if best else "."))
    return value


def build_settings(kt: KtKernel, target_isa: str, cuda_archs: str | None = None, *, cuda: bool = True) -> dict[str, str]:
    """The CPUINFER_* environment for a portable, CUDA-enabled build for target_isa.

    Every toggle is explicit: any one left unset falls back to the build
    machine's CPU (AMX switches itself on where the builder has it; an unset or
    unknown CPUINFER_CPU_INSTRUCT means NATIVE), so the wheel would not run on
    the machine it was built for. cuda=False gives the CPU-only build that
    SGLang's hybrid path cannot use (#1760); ktenv's envs never ask for it.
    """
    t = kt.toggles[check_isa_name(kt, target_isa)]
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
        "CPUINFER_CUDA_ARCHS": cuda_archs or kt.default_cuda_archs,
        # Static cudart: the env's torch brings its own libcudart, maybe another major.
        "CPUINFER_CUDA_STATIC_RUNTIME": "ON",
    }
    if not cuda:
        for k in ("CPUINFER_CUDA_ARCHS", "CPUINFER_CUDA_STATIC_RUNTIME"):
            del settings[k]
        settings["CPUINFER_USE_CUDA"] = "0"
    return settings
