"""sglang-kt's own GPU-memory arithmetic for DeepSeek-V4, evaluated without a GPU. Runs INSIDE the env.

    <env>/bin/python sizing_probe.py < {"experts", "hidden", "inter", "layers", "head_dim", "rope_dim",
                                        "index_head_dim", "compress_ratios", "window", "tp": [1, 8],
                                        "gpu_experts": 10, "swa": 0.13}

The modules that hold these functions import sgl_kernel at the top, which
needs the NVIDIA driver, so they cannot be imported here. The probe reads the
installed source files instead, takes the few pure functions out with `ast`
(no copy of their code lives in ktenv) and runs them:

  kt_ep_wrapper._mxfp4_raw_slot_storage_nbytes      one full layer of raw MXFP4 experts
  kt_ep_wrapper.generate_uniform_masks              how --kt-num-gpu-experts is spread over layers
  v4_marlin_moe.get_v4_mxfp4_marlin_storage_nbytes  one full layer in Marlin form
  memory_profiler.DSv4MemoryCalculator              KV bytes per token (cc 9.0, fp8)

Prints `KTENV-RESULT {json}` last on stdout: the numbers per tp, and the
sglang files they were read from.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

MARK = "KTENV-RESULT "


def sglang_file(rel: str) -> Path:
    spec = importlib.util.find_spec("sglang")
    return Path(next(iter(spec.submodule_search_locations))) / "srt" / rel


def extract(path: Path, names: set[str], namespace: dict) -> dict:
    """Execute only the named top-level defs/classes/assignments of a source file in `namespace`."""
    tree = ast.parse(path.read_text())
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            keep.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            keep.append(node)
    found = {n.name if hasattr(n, "name") else n.targets[0].id for n in keep}
    missing = names - found
    if missing:
        raise LookupError(f"{path.name} no longer defines {sorted(missing)}; sglang-kt changed, recheck ktenv's sizing")
    module = ast.Module(body=keep, type_ignores=[])
    exec(compile(module, str(path), "exec"), namespace)  # noqa: S102 - the installed sglang's own code
    return namespace


def main() -> int:
    report: dict = {"ok": False}
    try:
        q = json.load(sys.stdin)
        import torch

        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # the calculator asks; fp8 KV from cc 8.9 on
        ns: dict = {"torch": torch, "math": math, "Optional": object, "Tuple": tuple}
        files = {
            "kt_ep_wrapper": sglang_file("layers/moe/kt_ep_wrapper.py"),
            "v4_marlin_moe": sglang_file("layers/quantization/v4_marlin_moe.py"),
            "deepseekv4_memory_pool": sglang_file("mem_cache/deepseekv4_memory_pool.py"),
            "memory_profiler": sglang_file("model_executor/memory_profiler.py"),
        }
        extract(files["kt_ep_wrapper"], {"_mxfp4_raw_slot_storage_nbytes", "generate_uniform_masks"}, ns)
        extract(files["v4_marlin_moe"], {"V4_FP4_GROUP_SIZE", "_MARLIN_TILE", "_prepared_shapes",
                                         "get_v4_mxfp4_marlin_storage_nbytes"}, ns)
        extract(files["deepseekv4_memory_pool"], {"get_compress_state_ring_size"}, ns)
        ns.update(ModelConfig=object, ModelRunner=object, DSv4PoolSizes=object, dataclass=lambda c: c,
                  get_world_group=None, logger=None)
        extract(files["memory_profiler"], {"DSv4MemoryCalculator"}, ns)
        per_tp = {}
        for tp in q["tp"]:
            i = q["inter"] // tp
            per_tp[str(tp)] = {
                "raw_layer": ns["_mxfp4_raw_slot_storage_nbytes"](num_experts=q["experts"], hidden_size=q["hidden"],
                                                                  intermediate_size=i),
                "marlin_layer": ns["get_v4_mxfp4_marlin_storage_nbytes"](num_experts=q["experts"],
                                                                         hidden_size=q["hidden"], intermediate_size=i),
            }
        masks = ns["generate_uniform_masks"](q["layers"], q["experts"], q["gpu_experts"] * q["layers"], 0, 1)
        mc = SimpleNamespace(qk_nope_head_dim=q["head_dim"] - q["rope_dim"], qk_rope_head_dim=q["rope_dim"],
                             index_head_dim=q["index_head_dim"], compress_ratios=q["compress_ratios"],
                             window_size=q["window"])
        kv = {}
        for spec in (False, True):
            calc = ns["DSv4MemoryCalculator"](mc, page_size=256, swa_ratio=q["swa"], is_speculative=spec)
            kv["speculative" if spec else "plain"] = calc.bytes_per_full_token
        report.update(ok=True, per_tp=per_tp, kv_bytes_per_token=kv,
                      gpu_experts_per_layer=[int(x) for x in masks.sum(dim=1).tolist()],
                      files={k: str(v) for k, v in files.items()})
    except Exception as e:  # reported; the caller decides
        report.update(error=f"{type(e).__name__}: {e}"[:1500], traceback_tail=traceback.format_exc()[-1500:])
    sys.stdout.write("\n" + MARK + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
