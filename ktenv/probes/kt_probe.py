"""Report which KT-Kernel build this environment loads. Runs INSIDE the env.

    <env>/bin/python kt_probe.py

Prints one line `KTENV-RESULT {json}` last on stdout (kt-kernel's C++ side
may print its own lines before it). Exits 0 when the JSON says what happened,
even when the import failed: the caller judges. Standard library plus
kt_kernel only; ktenv is not importable here.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import traceback

MARKER = "KTENV-RESULT"


def main() -> int:
    out: dict = {
        "ok": False,
        "python": sys.version.split()[0],
        "override": os.environ.get("KT_KERNEL_CPU_VARIANT"),
    }
    try:
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("kt-kernel", "torch"):
            try:
                out[dist.replace("-", "_") + "_version"] = version(dist)
            except PackageNotFoundError:
                out[dist.replace("-", "_") + "_version"] = None
    except Exception:  # metadata is a nicety; the import below is the test
        pass
    try:
        import kt_kernel
        from kt_kernel import _cpu_detect

        ext = kt_kernel.kt_kernel_ext
        pkg_dir = os.path.dirname(os.path.abspath(kt_kernel.__file__))
        shipped = sorted(
            os.path.basename(p).split(".")[0].replace("_kt_kernel_ext_", "")
            for p in glob.glob(os.path.join(pkg_dir, "_kt_kernel_ext_*.so"))
        )
        single = glob.glob(os.path.join(pkg_dir, "kt_kernel_ext.*.so"))
        cpuinfer = getattr(ext, "CPUInfer", None)
        out.update(
            ok=True,
            variant=str(getattr(kt_kernel, "__cpu_variant__", "")),
            extension_file=getattr(ext, "__file__", None),
            package_dir=pkg_dir,
            variants_shipped=shipped,
            single_variant_build=bool(single),
            # What kt-kernel's own detector picks now (the override, if one is set).
            wheel_detected=_cpu_detect.detect_cpu_features(),
            has_cpuinfer=cpuinfer is not None,
            # Missing means a build without CUDA: SGLang's hybrid path calls it
            # every step and fails (kvcache-ai/ktransformers#1760).
            cuda_stream=bool(cpuinfer is not None and hasattr(cpuinfer, "submit_with_cuda_stream")),
            int8_kernel=str(getattr(ext, "__int8_kernel__", "")),
            fp8_kernel=str(getattr(ext, "__fp8_kernel__", "")),
            moe_classes=sorted(n for n in dir(getattr(ext, "moe", object())) if n.endswith("_MOE")),
        )
        if out["kt_kernel_version"] is None:
            out["kt_kernel_version"] = getattr(kt_kernel, "__version__", None)
    except BaseException as e:  # noqa: BLE001 - the caller needs whatever went wrong
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc(limit=6)
    sys.stdout.flush()
    print(f"{MARKER} {json.dumps(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
