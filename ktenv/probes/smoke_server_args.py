"""Server-args probe (no GPU needed): sglang's own start-up checks, run on this machine.

    <env>/bin/python smoke_server_args.py < {"gpu": {...}, "cases": [{...}, ...]}

Runs INSIDE the environment. For each case (a launch argv, the env vars the
launch sets, the model's config.json) it does what `python -m
sglang.launch_server` does before it touches a GPU: parse the argv with
sglang's parser, build `ServerArgs` (its post-initialisation resolves the
attention backend, page size, KV dtype, speculative settings, KT settings and
loads the model config through `ModelConfig`), then checks every config field
the DeepSeek-V4 path reads later on the GPU (dsv4_fields.py) and replays on the
CPU the two config consumers that run there: sglang's rotary-embedding
factory (rope_type deepseek_yarn) and precompute_freqs_cis.

Without a GPU three things are stood in for, inside this process only, and
only when the real one is absent (the report lists what was):
  torch.cuda   is_available / device_count / capability / name / properties /
               mem_get_info answer as one GPU of the arch (`gpu` in the input)
  sgl_kernel   its __init__ loads the CUDA ops library, which needs libcuda;
               the package is made importable without it: its pure-Python
               submodules load from the env, names __init__ re-exports resolve
               to the real wrappers, and the torch.library fake registrations
               of sgl_kernel:: ops (whose library did not load) are skipped
  nvidia-smi   answers the memory query with the same memory
Each case runs in a forked child (imports are paid once; no state leaks from
one case into the next). Prints `KTENV-RESULT {json}` last on stdout.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.machinery
import importlib.util
import json
import linecache
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types

import dsv4_fields  # beside this script

MARK = "KTENV-RESULT "
STUBBED: list[dict] = []  # {"what": ..., "how": sentence}: what stood in for what
TOUCHED: set[str] = set()  # sgl_kernel names resolved through the stand-in
CLEANUP: list[str] = []  # temp dirs made for stand-ins, removed when main ends


# --- stand-ins (only where the real thing is absent) -----------------------------

def stub_torch_cuda(gpu: dict) -> None:
    import torch

    if torch.cuda.is_available():
        return
    major, minor = (int(x) for x in gpu["cc"].split("."))
    total = int(gpu["memory_mib"]) * 1024 * 1024
    props = types.SimpleNamespace(name=gpu["name"], major=major, minor=minor, total_memory=total,
                                  multi_processor_count=gpu.get("sms", 100), gcnArchName="", uuid="GPU-ktenv-stub")
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.get_device_capability = lambda device=None: (major, minor)
    cuda.get_device_name = lambda device=None: gpu["name"]
    cuda.get_device_properties = lambda device=None: props
    cuda.mem_get_info = lambda device=None: (total, total)
    STUBBED.append({"what": "torch.cuda", "how": f"answers as one {gpu['name']} (compute capability {gpu['cc']}, "
                    f"{gpu['memory_mib'] / 1024:.0f} GiB); torch {torch.__version__} sees no GPU here"})


class _Placeholder:
    """A name sgl_kernel's __init__ would have bound that no submodule defines: fails if called."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self._name} is a ktenv stand-in: sgl_kernel's CUDA library is not loaded here")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")


def stub_sgl_kernel() -> None:
    try:
        import sgl_kernel  # noqa: F401
        return
    except Exception as e:  # OSError/ImportError for libcuda.so.1, RuntimeError without a GPU
        text = str(e)
        m = re.search(r"(lib[\w.+-]+\.so[\d.]*): cannot open shared object file", text)
        first = next((line.strip() for line in text.splitlines() if line.strip()), "(no message)")
        reason = f"{type(e).__name__}: {first[:160]}" + (f" ({m.group(1)} is missing)" if m else "")
    for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("sgl_kernel")  # locates, does not execute
    root = os.path.dirname(spec.origin)
    exports = {}  # what __init__ re-exports: name -> (submodule, attribute)
    for node in ast.parse(open(spec.origin).read()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sgl_kernel."):
            for a in node.names:
                if a.name != "*":
                    exports[a.asname or a.name] = (node.module, a.name)

    class Package(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            if name in exports:
                mod, attr = exports[name]
                try:
                    value = getattr(importlib.import_module(mod), attr)
                    TOUCHED.add(f"{name} (real, from {mod})")
                    return value
                except Exception:
                    pass
            TOUCHED.add(f"{name} (placeholder)")
            return _Placeholder(f"sgl_kernel.{name}")

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name == "sgl_kernel":
                s = importlib.machinery.ModuleSpec(name, self, is_package=True)
                s.submodule_search_locations = [root]
                return s
            return None

        def create_module(self, spec):
            m = Package("sgl_kernel")
            m.__path__ = [root]
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())
    import torch.library

    real_register_fake = torch.library.register_fake

    def register_fake(op, *a, **k):
        if isinstance(op, str) and op.startswith("sgl_kernel::"):
            return a[0] if a else (lambda fn: fn)
        return real_register_fake(op, *a, **k)

    torch.library.register_fake = register_fake
    STUBBED.append({"what": "sgl_kernel", "how": f"its __init__ fails here ({reason}); the package is imported without "
                    "it: pure-Python submodules load from the env, fake registrations of sgl_kernel:: ops are skipped"})


def stub_nvidia_smi(gpu: dict) -> None:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            p = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=30)
            if p.returncode == 0 and p.stdout.strip():
                return
        except (OSError, subprocess.TimeoutExpired):
            pass
    d = tempfile.mkdtemp(prefix="ktenv-smi-")
    CLEANUP.append(d)
    path = os.path.join(d, "nvidia-smi")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho {int(gpu['memory_mib'])}\n")
    os.chmod(path, 0o755)
    os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
    STUBBED.append({"what": "nvidia-smi", "how": f"{'fails' if smi else 'absent'} here; a stand-in answers "
                    f"memory.total = {int(gpu['memory_mib'])} MiB"})


# --- one case ----------------------------------------------------------------------

def where_it_failed(e: BaseException, config_path: str) -> dict:
    """The innermost frame in the stack's code, its source line, and the config field it read."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if re.search(r"/(sglang|transformers|kt_kernel)/", f.filename)] or frames
    inner = ours[-1]
    line = (inner.line or linecache.getline(inner.filename, inner.lineno)).strip()
    out = {"file": re.sub(r".*/site-packages/", "", inner.filename), "line": inner.lineno,
           "function": inner.name, "source": line, "config": config_path}
    via = [f for f in ours if "/sglang/" in f.filename]
    if via and via[-1] is not inner:  # e.g. transformers raised inside sglang's get_config
        out["via"] = f"{re.sub(r'.*/site-packages/', '', via[-1].filename)}:{via[-1].lineno} in {via[-1].name}"
    m = re.search(r"(\w+)\[\s*[\"'](\w+)[\"']\s*\]", line)
    if m and m.group(1) not in ("os", "environ", "kwargs"):
        out["field"] = f"{m.group(1)}.{m.group(2)}"
    elif m := re.search(r"(?:hf_config|hf_text_config|config)\.(\w+)", line):
        out["field"] = m.group(1)
    # transformers' own RoPE validation: "Missing required keys in `rope_parameters` for 'rope_type'='yarn': {'factor'}"
    elif m := re.search(r"keys in `rope_parameters`[^{]*\{'(\w+)'", str(e)):
        out["field"] = f"rope_scaling.{m.group(1)}"
    return out


def resolved(sa) -> dict:
    keep = ("attention_backend", "page_size", "kv_cache_dtype", "context_length", "chunked_prefill_size",
            "cuda_graph_max_bs", "mem_fraction_static", "max_running_requests", "tp_size", "moe_runner_backend",
            "speculative_algorithm", "speculative_draft_model_path", "speculative_num_steps", "kt_method",
            "kt_num_gpu_experts", "kt_cpuinfer", "kt_threadpool_count", "kt_gpu_prefill_token_threshold",
            "disable_cuda_graph", "load_format", "device")
    return {k: getattr(sa, k, None) for k in keep}


def replay_rope(cfg, mode: str, sub: str) -> list[str]:
    """Run sglang's rotary factory and precompute_freqs_cis as MQALayer would, once per RoPE base."""
    import torch
    from sglang.srt.layers.deepseek_v4_rope import precompute_freqs_cis
    from sglang.srt.layers.rotary_embedding import rope_variant
    from sglang.srt.layers.rotary_embedding.factory import get_rope

    # The cache is built on the CPU here (on the server: on the GPU).
    rope_variant.get_device = lambda *a, **k: "cpu"
    done = []
    rs = dict(cfg.rope_scaling)
    rs["rope_type"] = "deepseek_yarn"  # MQALayer sets this before calling the factory
    ratios = set(cfg.compress_ratios[: cfg.num_hidden_layers]) | {0}
    for compressed in sorted({bool(r) for r in ratios}):
        base = cfg.compress_rope_theta if compressed else cfg.rope_theta
        emb = get_rope(head_size=cfg.qk_rope_head_dim, rotary_dim=cfg.qk_rope_head_dim,
                       max_position=cfg.max_position_embeddings, base=base, rope_scaling=rs, is_neox_style=False)
        cache = emb.cos_sin_cache
        if not bool(torch.isfinite(cache).all()):
            raise ValueError(f"the {type(emb).__name__} cache for base {base} has non-finite values "
                             f"(rope_scaling {cfg.rope_scaling})")
        rows = cache.shape[0]
        del emb, cache
        # 2604B: uncompressed layers use no YaRN correction (original_seq_len 0).
        original = (cfg.rope_scaling["original_max_position_embeddings"]
                    if compressed or sub != "2604B" else 0)
        freqs = precompute_freqs_cis(dim=cfg.qk_rope_head_dim, seqlen=cfg.max_position_embeddings,
                                     original_seq_len=original, base=base, factor=cfg.rope_scaling["factor"],
                                     beta_fast=cfg.rope_scaling["beta_fast"], beta_slow=cfg.rope_scaling["beta_slow"])
        if not bool(torch.isfinite(torch.view_as_real(freqs)).all()):
            raise ValueError(f"precompute_freqs_cis for base {base} gives non-finite values")
        done.append(f"{'compressed' if compressed else 'uncompressed'} layers: base {base}, {rows} cached "
                    f"positions, freqs_cis {tuple(freqs.shape)}")
        del freqs
    return done


def defaults_filled(cfg_path: str, mode: str, sub: str, speculative: bool) -> list[str]:
    """Fields the path reads that config.json leaves to DeepSeekV4Config's defaults."""
    try:
        raw = json.load(open(cfg_path))
    except (OSError, ValueError):
        return []
    return [f for f in dsv4_fields.read_fields(mode, sub, speculative) if f not in raw]


def run_case(case: dict) -> dict:
    os.environ.update({k: str(v) for k, v in case.get("env", {}).items()})
    mode = os.environ.get("SGLANG_DSV4_MODE", "")
    sub = os.environ.get("SGLANG_DSV4_2604_SUBMODE", "")
    from sglang.srt.server_args import ServerArgs

    out: dict = {"name": case["name"], "ok": False, "steps": []}
    parser = argparse.ArgumentParser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    stage = "parse"
    try:
        ns = parser.parse_args(case["argv"])
        out["steps"].append("argv parsed by sglang's parser")
        stage = "ServerArgs"
        t = time.perf_counter()
        sa = ServerArgs.from_cli_args(ns)
        out["steps"].append(f"ServerArgs post-init ({time.perf_counter() - t:.1f} s)")
        stage = "ModelConfig"
        mc = sa.get_model_config()
        out["steps"].append("ModelConfig loaded")
        out["resolved"] = resolved(sa)
        out["resolved"]["context_len"] = mc.context_len
        out["resolved"]["architectures"] = list(mc.hf_config.architectures or [])
        out["resolved"]["num_hidden_layers"] = mc.hf_config.num_hidden_layers
        out["resolved"]["SGLANG_DSV4_FP4_EXPERTS"] = os.environ.get("SGLANG_DSV4_FP4_EXPERTS")
        given = {t.split("=", 1)[0] for t in case["argv"] if t.startswith("--")}
        out["memory_defaults"] = [f for f in ("--chunked-prefill-size", "--cuda-graph-max-bs", "--mem-fraction-static")
                                  if f not in given]
        stage = "fields"
        speculative = bool(sa.speculative_algorithm)
        bad = dsv4_fields.problems(mc.hf_config, mode, sub, speculative=speculative)
        out["fields_checked"] = len(dsv4_fields.read_fields(mode, sub, speculative))
        out["defaults_filled"] = defaults_filled(case["config"], mode, sub, speculative)
        if bad:
            out["failure"] = {"stage": "fields", "config": case["config"], **bad[0]}
            out["all_problems"] = bad
            return out
        out["steps"].append(f"{out['fields_checked']} DeepSeek-V4 config fields usable")
        stage = "rope"
        # The scheduler process sets this before it builds the model; the rotary layers read it.
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(sa)
        out["rope"] = replay_rope(mc.hf_config, mode, sub)
        out["steps"].append("rotary factory and precompute_freqs_cis ran")
        out["ok"] = True
    except BaseException as e:  # SystemExit (argparse), KeyError, AssertionError, ValueError ...
        err = f"{type(e).__name__}: {e}"
        if isinstance(e, SystemExit) and stage == "parse":
            err = "sglang's parser rejects the argv (see launch-cpu for the flag)"
        out["failure"] = {"stage": stage, "error": err[:1500], **where_it_failed(e, case["config"])}
        out["traceback_tail"] = traceback.format_exc()[-2500:]
    return out


def in_child(case: dict) -> dict:
    """run_case in a forked child; its result comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            res = run_case(case)
            res["sgl_kernel_names"] = sorted(TOUCHED)
            data = json.dumps(res, default=str).encode()
        except BaseException as e:
            data = json.dumps({"name": case["name"], "ok": False, "failure": {"stage": "probe", "error": repr(e)}}).encode()
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        how = f"killed by signal {sig}" if sig else f"exit status {os.WEXITSTATUS(status)}"
        return {"name": case["name"], "ok": False, "failure": {"stage": "probe", "error": f"the case's process died ({how})"}}
    return json.loads(b"".join(chunks))


def main() -> int:
    req = json.loads(sys.stdin.read() or "{}")
    t = time.perf_counter()
    result: dict = {"ok": False}
    try:
        stub_torch_cuda(req["gpu"])
        stub_sgl_kernel()
        stub_nvidia_smi(req["gpu"])
        import sglang.srt.server_args  # noqa: F401  (paid once; the children inherit it)

        result["import_seconds"] = round(time.perf_counter() - t, 1)
        result["cases"] = [in_child(c) for c in req["cases"]]
        for c in result["cases"]:
            TOUCHED.update(c.pop("sgl_kernel_names", []))
        result["ok"] = all(c["ok"] for c in result["cases"])
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"[:1500]
        result["traceback_tail"] = traceback.format_exc()[-2000:]
    finally:
        for d in CLEANUP:  # the stand-in lives as long as the probe (main runs in the parent only)
            shutil.rmtree(d, ignore_errors=True)
    result["stubbed"] = STUBBED
    result["sgl_kernel_names"] = sorted(TOUCHED)
    result["seconds"] = round(time.perf_counter() - t, 1)
    sys.stdout.write("\n" + MARK + json.dumps(result, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
