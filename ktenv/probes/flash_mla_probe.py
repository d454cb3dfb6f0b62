"""What a FlashMLA build needs from an env, and whether its flash_mla is the one sglang-kt calls. Runs INSIDE the env.

    <env>/bin/python flash_mla_probe.py facts    # before a build: python, torch, setuptools, headers
    <env>/bin/python flash_mla_probe.py verify   # after an install: import flash_mla, check the calls

Prints one line `KTENV-RESULT {json}` last on stdout and exits 0 whenever the
JSON says what happened; the caller judges. Standard library plus torch and
flash_mla only; ktenv is not importable here. Nothing here needs a GPU:
importing the extension loads libcudart and torch's CUDA libraries, which
load without a driver.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import sysconfig
import traceback

MARK = "KTENV-RESULT "

# The keyword arguments sglang-kt 0.7.2 passes to flash_mla_with_kvcache
# (deepseek_v4_backend_radix.py, the input_dict of forward()).
SGLANG_KWARGS = ("q", "k_cache", "head_dim_v", "block_table", "cache_seqlens", "tile_scheduler_metadata",
                 "softmax_scale", "is_fp8_kvcache", "indices", "topk_length", "attn_sink", "extra_k_cache",
                 "extra_indices_in_kvcache", "extra_topk_length")


def facts() -> dict:
    out: dict = {"python": ".".join(map(str, sys.version_info[:3])), "abi": sys.implementation.cache_tag,
                 "include": sysconfig.get_paths()["include"], "bin": os.path.dirname(sys.executable),
                 "site": sysconfig.get_paths()["purelib"]}
    out["python_h"] = os.path.exists(os.path.join(out["include"], "Python.h"))
    try:
        from importlib.metadata import version

        out["setuptools"] = version("setuptools")
    except Exception as e:  # noqa: BLE001 - any failure is a fact to report
        out["setuptools_error"] = f"{type(e).__name__}: {e}"
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
    except Exception as e:  # noqa: BLE001
        out["torch_error"] = f"{type(e).__name__}: {e}"[:600]
    return out


def verify() -> dict:
    out: dict = {"ok": False}
    try:
        import flash_mla
        from flash_mla import flash_mla_interface as iface

        out["file"] = getattr(flash_mla, "__file__", None)
        ext = sys.modules.get("flash_mla.cuda")
        out["extension"] = getattr(ext, "__file__", None)
        meta = flash_mla.get_mla_metadata()  # sglang calls it with no arguments and keeps [0]
        out["metadata_type"] = type(meta[0]).__name__ if isinstance(meta, tuple) and meta else type(meta).__name__
        params = inspect.signature(flash_mla.flash_mla_with_kvcache).parameters
        out["missing_kwargs"] = [k for k in SGLANG_KWARGS if k not in params]
        out["ops"] = sorted(n for n in ("sparse_decode_fwd", "dense_decode_fwd", "sparse_prefill_fwd") if hasattr(ext, n))
        out["ok"] = (out["metadata_type"] == iface.FlashMLASchedMeta.__name__ and not out["missing_kwargs"]
                     and "sparse_decode_fwd" in out["ops"])
        try:
            from importlib.metadata import version

            out["version"] = version("flash_mla")
        except Exception:  # noqa: BLE001 - a build without metadata still imports
            out["version"] = None
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"[:800]
        out["traceback"] = traceback.format_exc()[-2000:]
    return out


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "facts"
    result = facts() if mode == "facts" else verify()
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
