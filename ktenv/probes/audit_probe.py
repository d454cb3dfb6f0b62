"""Audit probe: what the env's run-time compilers can target. Runs INSIDE the env.

    <env>/bin/python audit_probe.py

Reports, without a GPU and without importing torch:
  site          the env's site-packages
  payload_root  where sgl_kernel's payload loader finds its extracted objects
                (the same lookup as sgl_kernel/payload_runtime.py, nothing created)
  nvrtc         the NVRTC library the env ships (nvidia-cuda-nvrtc-cu12) and the
                SASS targets it can compile for (nvrtcGetSupportedArchs): the JIT
                behind deep_gemm, tilelang and cuda-python kernels
  ptxas         triton's bundled ptxas, its version and the sm_ targets it accepts

Prints `KTENV-RESULT {json}` last on stdout.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

MARK = "KTENV-RESULT "


def nvrtc(site: Path) -> dict:
    libs = sorted(glob.glob(str(site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.*")))
    libs = [p for p in libs if ".alt." not in p and "builtins" not in p]
    if not libs:
        return {"found": False}
    lib = ctypes.CDLL(libs[0])
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    n = ctypes.c_int()
    lib.nvrtcGetNumSupportedArchs(ctypes.byref(n))
    archs = (ctypes.c_int * n.value)()
    lib.nvrtcGetSupportedArchs(archs)
    return {"found": True, "library": libs[0], "version": f"{major.value}.{minor.value}",
            "archs": [f"sm_{a}" for a in archs]}


def ptxas(site: Path) -> dict:
    exe = site / "triton" / "backends" / "nvidia" / "bin" / "ptxas"
    if not exe.is_file():
        return {"found": False}
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout
    helptext = subprocess.run([str(exe), "--help"], capture_output=True, text=True).stdout
    block = helptext.split("--gpu-name", 1)[-1].split("Default value", 1)[0]
    archs = sorted(set(re.findall(r"'(sm_\d+[af]?)'", block)))
    m = re.search(r"release (\d+\.\d+)", version)
    return {"found": True, "path": str(exe), "version": m.group(1) if m else version.strip()[-40:], "archs": archs}


def payload_root(site: Path) -> str | None:
    manifest = site / "sgl_kernel" / "_payload_manifest.py"
    if not manifest.is_file():
        return None
    values: dict = {}
    exec(compile(manifest.read_text(), str(manifest), "exec"), values)  # literal assignments only
    sub = Path("sgl-kernel-kt") / values["VERSION"] / values["ARCHIVE_SHA256"][:16]
    override = os.environ.get("SGL_KERNEL_KT_CACHE_DIR")
    bases = [Path(override).expanduser()] if override else [
        site / "sgl_kernel" / "_payload_cache", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")), Path("/tmp")]
    for base in bases:
        if all((base / sub / name).is_file() for name in values["FILES"]):
            return str(base / sub)
    return None


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    out: dict = {"site": str(site), "python": sys.version.split()[0]}
    for key, fn in (("payload_root", payload_root), ("nvrtc", nvrtc), ("ptxas", ptxas)):
        try:
            out[key] = fn(site)
        except Exception as e:  # each part reports on its own
            out[key] = {"found": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + MARK + json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
