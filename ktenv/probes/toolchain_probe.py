"""Run inside an env (its python, activated): where each JIT path looks for CUDA, and
compile, without a GPU, the kernels sglang-kt's DeepSeek-V4 path compiles at first use.

    toolchain_probe.py where
    toolchain_probe.py compile KERNEL     stdin: {"cc": "9.0", "build_dir": "..."}

KERNEL: linear_bf16_fp32 | fused_rope | hc_split_sinkhorn | indexer | deep_gemm.
Prints one line `KTENV-RESULT {json}`. Standalone: never imports ktenv.

How each compiles without a GPU (what sglang would otherwise ask the device):
- linear_bf16_fp32: sglang's own _jit_torch_cublas_bf16_fp32() (torch
  load_inline); the arch comes from TORCH_CUDA_ARCH_LIST, which envs/ sets.
- fused_rope: sglang's own _jit_fused_rope_module() (tvm-ffi load_inline);
  sglang takes TVM_FFI_CUDA_ARCH_LIST from the device as "<major>.<minor>"
  and PDL from "major >= 9": both are given from the arch's compute capability.
- hc_split_sinkhorn, indexer: sglang's own tilelang kernels, compiled inside a
  `tvm.target.Target` context, which tilelang's "auto" target takes before
  asking the device (sm_90a for 9.0 as tilelang itself would pick).
- deep_gemm: its JIT lives in C++ inside deep_gemm_cpp, whose import needs the
  driver (libcuda.so.1) and which asks the device for its SM count before
  generating code. The probe writes the same translation unit deep_gemm
  generates for the indexer's fp8_paged_mqa_logits (its template, V4's shape)
  and runs nvcc with deep_gemm's flags and include dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback

MARK = "KTENV-RESULT "


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj, default=str), flush=True)


def _safe(fn):
    try:
        return fn()
    except BaseException as e:  # a library's lookup may raise anything; report it
        return f"error: {type(e).__name__}: {e}"


def where() -> dict:
    import torch
    import torch.utils.cpp_extension as ce

    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "torch_cuda_home": ce.CUDA_HOME, "ninja": shutil.which("ninja"),
           "env": {k: os.environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH", "CC", "CXX", "NVCC_CCBIN", "CPATH",
                                                  "TORCH_CUDA_ARCH_LIST", "TVM_FFI_CUDA_ARCH_LIST")},
           "nvcc_on_path": shutil.which("nvcc")}

    def tvm():
        from tvm_ffi.cpp import extension

        return extension._find_cuda_home()

    def tile():
        import tilelang.env as te

        return te.CUDA_HOME

    out["tvm_ffi_cuda_home"] = _safe(tvm)
    out["tilelang_cuda_home"] = _safe(tile)
    # deep_gemm reads CUDA_HOME, then `which nvcc`, then /usr/local/cuda (deep_gemm/__init__.py).
    out["deep_gemm_cuda_home"] = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or (
        os.path.dirname(os.path.dirname(shutil.which("nvcc"))) if shutil.which("nvcc") else
        ("/usr/local/cuda" if os.path.exists("/usr/local/cuda") else None))
    return out


def _cc(arg: dict) -> tuple[int, int]:
    major, minor = (int(x) for x in arg["cc"].split("."))
    return major, minor


def linear_bf16_fp32(arg: dict) -> dict:
    os.environ["TORCH_EXTENSIONS_DIR"] = arg["build_dir"]
    from sglang.jit_kernel import deepseek_v4 as dv4

    mod = dv4._jit_torch_cublas_bf16_fp32()
    return {"module": getattr(mod, "__file__", str(mod)), "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
            "via": "torch.utils.cpp_extension.load_inline (sglang.jit_kernel.deepseek_v4._jit_torch_cublas_bf16_fp32)"}


def fused_rope(arg: dict) -> dict:
    major, minor = _cc(arg)
    os.environ["TVM_FFI_CACHE_DIR"] = arg["build_dir"]
    os.environ["TVM_FFI_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    from sglang.jit_kernel import deepseek_v4 as dv4

    dv4.is_arch_support_pdl = lambda: major >= 9  # sglang asks the device: cc major >= 9
    mod = dv4._jit_fused_rope_module()
    built = [os.path.join(r, f) for r, _, fs in os.walk(arg["build_dir"]) for f in fs if f.endswith(".so")]
    return {"module": built[0] if built else str(mod), "arch_list": os.environ["TVM_FFI_CUDA_ARCH_LIST"],
            "pdl": major >= 9, "via": "tvm_ffi.cpp.load_inline (sglang.jit_kernel.deepseek_v4._jit_fused_rope_module)"}


def _tilelang_target(arg: dict):
    major, minor = _cc(arg)
    os.environ["TILELANG_CACHE_DIR"] = arg["build_dir"]  # read when tilelang is imported
    from tilelang.contrib import nvcc as tl_nvcc
    from tvm.target import Target

    arch = f"sm_{tl_nvcc.get_target_arch((major, minor))}"
    return Target({"kind": "cuda", "arch": arch}), arch


def _kernel_info(kernel, arch: str, via: str, build_dir: str) -> dict:
    """What tilelang built: the CUDA source it generated and the library nvcc's cubin went into."""
    src = str(kernel.get_kernel_source() or "")
    libs = [os.path.join(r, f) for r, _, fs in os.walk(build_dir) for f in fs if f.endswith(".so")]
    if not libs:
        raise RuntimeError(f"tilelang generated {len(src)} characters of CUDA but left no library in {build_dir}")
    # tvm embeds nvcc's cubin (and PTX) as a blob cuobjdump does not list; its ELF
    # sections and the PTX `.target` line show that nvcc really compiled it.
    data = open(libs[0], "rb").read()
    if b".nv.info." not in data:
        raise RuntimeError(f"{libs[0]} holds no cubin (no .nv.info section): nvcc did not compile the kernel")
    return {"target": arch, "kernel_source_chars": len(src), "module": libs[0], "bytes": len(data),
            "ptx_target_" + arch: (b".target " + arch.encode()) in data, "via": via}


def hc_split_sinkhorn(arg: dict) -> dict:
    major, _ = _cc(arg)
    target, arch = _tilelang_target(arg)
    from sglang.srt.layers import mhc

    mhc.is_arch_support_pdl = lambda: major >= 9
    with target:
        # The DeepSeek-V4 call: hc_split_sinkhorn(mixes, ..., hc_mult=4, sinkhorn_iters=20, eps=1e-6)
        kernel = mhc.hc_split_sinkhorn_kernel(4, 20, 1e-6)
    return _kernel_info(kernel, arch, "tilelang.jit (sglang.srt.layers.mhc.hc_split_sinkhorn_kernel(4, 20, 1e-6))",
                        arg["build_dir"])


def indexer(arg: dict) -> dict:
    import torch

    target, arch = _tilelang_target(arg)
    from sglang.srt.layers.attention.nsa import tilelang_kernel as tk

    # The V4 compressed indexer's call (layers/attention/compressed/indexer.py):
    # head_dim 128, index_n_heads 64, page (block) size 64, clean_logits False.
    jit = tk.fp8_paged_mqa_logits_kernel(head_dim=128, num_heads=64, block_size=64, clear_accum=False)
    n, blocks, pages, seq = 2, 4, 4, 256
    fp8 = torch.float8_e4m3fn
    cache = torch.zeros(blocks, 64 * (128 + 4), dtype=torch.uint8)
    args = (torch.zeros(n, 64, 128, dtype=fp8),
            cache[..., : 64 * 128].view(fp8).view(-1, 64, 128),
            cache[..., 64 * 128:].view(torch.float32),
            torch.zeros(n, 64, dtype=torch.float32), torch.zeros(n, dtype=torch.int32),
            torch.zeros(n, pages, dtype=torch.int32), torch.zeros(n, seq, dtype=torch.float32))
    with target:
        kernel = jit.compile(*args)  # tensors on the CPU only give shapes and dtypes
    return _kernel_info(kernel, arch, "tilelang.jit (sglang.srt.layers.attention.nsa.tilelang_kernel."
                        "fp8_paged_mqa_logits_kernel(128, 64, 64, False))", arg["build_dir"])


def deep_gemm(arg: dict) -> dict:
    import importlib.util

    major, minor = _cc(arg)
    spec = importlib.util.find_spec("deep_gemm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("deep_gemm is not installed in this env")
    root = list(spec.submodule_search_locations)[0]
    include = os.path.join(root, "include")
    sm = f"{major}{minor}"
    impl = os.path.join(include, "deep_gemm", "impls", f"sm{major * 10}_fp8_paged_mqa_logits.cuh")
    if not os.path.exists(impl):
        raise RuntimeError(f"deep_gemm has no {os.path.basename(impl)} for cc {major}.{minor}")
    # deep_gemm's smxx_fp8_paged_mqa_logits for V4's indexer: next_n 1, 64 heads, head_dim 128,
    # block_kv 64, split_kv = 4 * block_kv; SM90: 3 KV stages, MMA M 64; SM100: 4 stages, MMA M 128.
    mma_m, kv_stages = (128, 4) if major == 10 else (64, 3)
    split_kv = 256
    math_threads = split_kv // mma_m * 128
    src = (f"#include <deep_gemm/impls/sm{major * 10}_fp8_paged_mqa_logits.cuh>\n"
           "using namespace deep_gemm;\n"
           "static void __instantiate_kernel() {\n"
           f"    auto ptr = reinterpret_cast<void*>(&sm{major * 10}_fp8_paged_mqa_logits<1, 64, 128, 64, 3, {kv_stages}, "
           f"{split_kv}, 128, {math_threads}>);\n}};\n")
    cu = os.path.join(arg["build_dir"], "kernel.cu")
    out = os.path.join(arg["build_dir"], "kernel.cubin")
    with open(cu, "w") as f:
        f.write(src)
    nvcc = os.path.join(os.environ.get("CUDA_HOME") or "", "bin", "nvcc")
    # deep_gemm's NVCC command (its jit/compiler.hpp, read from the installed library's strings).
    cmd = [nvcc, cu, "-std=c++20", "--diag-suppress=39,161,174,177,186,940",
           "--ptxas-options=--register-usage-level=10", f"-I{include}", f"--gpu-architecture=sm_{sm}a",
           "--compiler-options=-fPIC,-O3,-fconcepts,-Wno-deprecated-declarations,-Wno-abi", "-cubin", "-O3",
           "--expt-relaxed-constexpr", "--expt-extended-lambda", "-o", out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"nvcc failed (exit {p.returncode}): {(p.stderr or p.stdout)[-1500:]}")
    return {"module": out, "bytes": os.path.getsize(out), "target": f"sm_{sm}a", "command": " ".join(cmd),
            "via": "nvcc on deep_gemm's generated translation unit (its JIT needs the driver; see the probe's docstring)"}


KERNELS = {"linear_bf16_fp32": linear_bf16_fp32, "fused_rope": fused_rope, "hc_split_sinkhorn": hc_split_sinkhorn,
           "indexer": indexer, "deep_gemm": deep_gemm}


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "where"
    if cmd == "where":
        emit({"ok": True, **where()})
        return
    name = sys.argv[2]
    arg = json.loads(sys.stdin.read() or "{}")
    os.makedirs(arg["build_dir"], exist_ok=True)
    t0 = time.monotonic()
    try:
        info = KERNELS[name](arg)
        emit({"ok": True, "kernel": name, "seconds": round(time.monotonic() - t0, 1), **info})
    except BaseException as e:
        emit({"ok": False, "kernel": name, "seconds": round(time.monotonic() - t0, 1),
              "error": f"{type(e).__name__}: {e}"[-3000:], "traceback_tail": traceback.format_exc()[-3000:]})


if __name__ == "__main__":
    main()
