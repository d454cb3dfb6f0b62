"""Prove the env's kt-kernel: it imports, loads the variant this CPU should
run, and was built with CUDA (SGLang's hybrid path calls
CPUInfer.submit_with_cuda_stream on every step, upstream #1760)."""

from __future__ import annotations

from typing import Iterable, Mapping

from ... import probe
from ...errors import KtenvError
from ...host.cpu import cpu_info
from ...spec.model import KtKernel
from .variants import best_variant, check_isa_name, check_override, level, missing_instructions


def run_probe(env_python: str, environ: Mapping[str, str] | None = None, timeout: float = 300) -> dict:
    """Run probes/kt_probe.py with the env's python; its JSON, or KtenvError."""
    # An environ the caller passes is used as given (a test may shadow kt_kernel through PYTHONPATH).
    env = probe.child_env() if environ is None else {**environ, "PYTHONDONTWRITEBYTECODE": "1"}
    run = probe.run(env_python, "kt_probe.py", env=env, timeout=timeout)
    if run.result is None:
        raise KtenvError(f"Importing kt_kernel with {env_python} {run.why}. Try `python -c 'import kt_kernel'` "
                         "there by hand to see the whole error.")
    return run.result


def verify_prebuilt(kt: KtKernel, env_python: str, flags: Iterable[str] | None = None, *,
                    expected: str | None = None, environ: Mapping[str, str] | None = None) -> dict:
    """Check the env's kt-kernel: importable, the right variant, built with CUDA.

    flags: the CPU that will run it (default: this host's /proc/cpuinfo).
    expected: the variant that must load (default: the best for `flags`).
    Returns the probe's report plus `best`, `expected`, `override`.
    """
    flags = cpu_info().flags if flags is None else frozenset(f.lower() for f in flags)
    best = best_variant(kt, flags)
    if best is None:
        raise KtenvError(
            "This CPU lacks AVX2, the least any kt-kernel build needs; its CPU MoE kernels cannot run "
            "here. Serve on an x86-64 CPU with AVX2 (AVX512 or AMX is much faster).")
    want = check_isa_name(kt, expected) if expected else best
    override = check_override(kt, flags, environ)  # refuses SIGILL-bound or ignored overrides first
    report = run_probe(env_python, environ)
    if not report.get("ok"):
        raise KtenvError(
            f"kt_kernel does not import in {env_python}: {report.get('error')}. Without it the server cannot "
            "start. Rebuild the environment (`build.py env --arch ...`); if it persists, see the traceback "
            f"below.\n{report.get('traceback', '')}")
    loaded = report.get("variant") or ""
    report.update(best=best, expected=want, override=override)
    if loaded not in kt.variants:
        raise KtenvError(f"kt_kernel loaded an extension that names its variant {loaded!r}, not one of "
                         f"{', '.join(kt.variants)}; ktenv cannot tell whether it suits this CPU. Reinstall "
                         "the env's kt-kernel.")
    if level(kt, loaded) > level(kt, best):
        raise KtenvError(
            f"kt_kernel loaded its {loaded} build, which needs {', '.join(missing_instructions(kt, loaded, flags))} "
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
                   f"reinstall kt-kernel from PyPI (every variant) or build it with --target-isa {want}.")
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
