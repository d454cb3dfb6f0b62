"""smoke's server-args tier, and what the launch-gpu tier starts (no GPU needed here).

    server-args   builds sglang's ServerArgs from the exact argv `build.py
                  launch` gives for the arch and runs its post-initialisation
                  and model-config loading, as `sglang.launch_server` does
                  before it touches a GPU, against (a) the generated tiny
                  DeepSeek-V4 model and (b) the user's --model when given;
                  then checks every config field the DeepSeek-V4 path reads on
                  the GPU and replays its RoPE set-up on the CPU. The first
                  failure is reported with the file, line and config field.

The probe (probes/smoke_server_args.py) stands in for torch.cuda, sgl_kernel's
CUDA library and nvidia-smi where they are absent; each result says which.

The launch-gpu tier (tier_launch.launch_gpu_tier) uses `tiny_model`,
`tiny_command`, `server_env` and `not_exercised` from here, so the argv
server-args proves is the argv the GPU tier runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..host import gpu as gpumod
from ..host.facts import ENV_KEYS, HostFacts, live_facts
from ..probe import PROBES
from ..serve import launch
from ..spec import launch_profile
from ..tools import cache_dir
from .command import command
from .result import FAILED, PASSED, Context, Result, probe

TIER = "server-args"
# Without a GPU, the stand-in's memory. Only sglang's defaults for
# --chunked-prefill-size, --cuda-graph-max-bs and --mem-fraction-static depend
# on it; each result names those the argv leaves to it.
STANDIN_MEMORY_MIB = 81920
KEEP_TINY = 2  # tiny models kept in the cache (one per env/mode; 215 MB each)
PROBE_TIMEOUT = 1800  # imports (~20 s quiet, minutes on a loaded 2-core machine) + a fork per case


# --- the tiny model and its start command (shared with launch-gpu) -------------------

def _tiny_key(ctx: Context) -> str:
    """What the generated model depends on: the generator, the field table, the env (its build stamp), the mode."""
    h = hashlib.sha256()
    for name in ("smoke_tiny_model.py", "dsv4_fields.py"):
        h.update((PROBES / name).read_bytes())
    stamp = ctx.prefix / "ktenv-stamp.json"
    h.update(stamp.read_bytes() if stamp.is_file() else str(ctx.python).encode())
    for k in ("SGLANG_DSV4_MODE", "SGLANG_DSV4_2604_SUBMODE"):
        h.update(f"{k}={ctx.env.get(k, '')}".encode())
    return h.hexdigest()[:16]


def tiny_model(ctx: Context, cache: Path | None = None) -> tuple[Path, dict | None, str]:
    """The tiny checkpoint for ctx's env: (dir, generator report or None, why not).

    Generated once per env and mode (~15-30 s, 215 MB) into ktenv's cache
    (smoke-tiny/<key>/, the newest KEEP_TINY kept) and reused by later runs.
    """
    root = cache or cache_dir() / "smoke-tiny"
    entry = root / _tiny_key(ctx)
    model, saved = entry / "model", entry / "tiny-model.json"
    if saved.is_file() and (model / "config.json").is_file():
        os.utime(entry)  # most recently used, for pruning
        return model, json.loads(saved.read_text()), ""
    root.mkdir(parents=True, exist_ok=True)
    # Generated beside its final place and renamed in: a killed run leaves no half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        r, why = probe(ctx, "smoke_tiny_model.py", [str(tmp / "model")], timeout=900)
        if r is None or not r.get("ok"):
            return model, None, why or r.get("error", "")
        r["model"] = str(model)
        (tmp / "tiny-model.json").write_text(json.dumps(r))
        if entry.exists():  # a concurrent run finished first; its model is as good
            shutil.rmtree(entry)
        tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    old = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                 key=lambda d: d.stat().st_mtime, reverse=True)[KEEP_TINY:]
    # and what killed runs left (a day old: a concurrent run may still be writing a young one)
    old += [d for d in root.glob(".tmp-*") if time.time() - d.stat().st_mtime > 86400]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return model, r, ""


def tiny_extra(tiny: dict, port: int) -> list[str]:
    """Flags the tiny start adds to the arch's launch command (they replace the profile's)."""
    return ["--load-format", "dummy", "--port", str(port), "--tensor-parallel-size", "1",
            "--kt-num-gpu-experts", str(tiny.get("gpu_experts", 0)), "--kt-gpu-prefill-token-threshold", "0",
            "--context-length", "4096", "--max-total-tokens", "4096", "--cuda-graph-max-bs", "1", "--cuda-graph-bs", "1"]


def arch_gpus(ctx: Context, facts: HostFacts) -> list[gpumod.Gpu]:
    """The visible GPUs of ctx's arch on the host facts describe."""
    visible = gpumod.visible_gpus(facts.gpu.gpus, {**facts.env, **{k: v for k, v in ctx.env.items() if k in ENV_KEYS}})
    return [g for g in visible.gpus if (a := gpumod.arch_for_cc(ctx.spec, g.compute_capability)) and a.name == ctx.arch.name]


def one_gpu_env(gpu: gpumod.Gpu) -> dict:
    """CUDA_VISIBLE_DEVICES naming exactly this GPU.

    nvidia-smi's index with CUDA_DEVICE_ORDER=PCI_BUS_ID, not the UUID: sglang
    parses the variable as integers (utils/common.py get_physical_device_id,
    which feeds `nvidia-smi topo -i`; custom_all_reduce.py), and nvidia-smi
    numbers GPUs in PCI bus order.
    """
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(gpu.index)}


def tiny_command(ctx: Context, model: Path, tiny: dict, port: int,
                 facts: HostFacts | None = None, require_gpu: bool = False):
    """(LaunchCommand, DeepSeek-V4 env problem, the one GPU or None) for the tiny start.

    One GPU and --tensor-parallel-size 1 whatever the host has: the tiny model
    proves the stack, not the host's parallel layout (and TP=4 is upstream
    #1998). The host facts are narrowed to that GPU, so the CPU sizing
    (--kt-cpuinfer) is the one launch gives a one-GPU server.
    """
    facts = facts or live_facts(str(ctx.prefix))
    mine = arch_gpus(ctx, facts)
    gpu = mine[0] if mine else None
    if gpu is not None:
        facts = replace(facts, env={**facts.env, **one_gpu_env(gpu)})
    cmd, dsv4_error = command(ctx, str(model), speculative=False, require_gpu=require_gpu,
                                     extra=tiny_extra(tiny, port), facts=facts)
    return cmd, dsv4_error, gpu


def server_env(ctx: Context, cmd: launch.LaunchCommand, gpu: gpumod.Gpu | None, deadline: float) -> dict:
    """The environment the tiny server runs with."""
    env = {**ctx.env, **cmd.env}
    if gpu is not None:
        env.update(one_gpu_env(gpu))
    # sglang's warmup request gives up after SGLANG_WARMUP_TIMEOUT (-1 = 600 s)
    # and the server kills itself; a first start compiles JIT kernels inside
    # it, so the cap follows the start deadline.
    env["SGLANG_WARMUP_TIMEOUT"] = str(int(deadline))
    # kt-kernel prints its per-layer loader lines; unbuffered, they reach the
    # log even when the server is killed.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def not_exercised(ctx: Context, tiny: dict) -> list[str]:
    """The real profile's paths the tiny start does not take, one sentence each."""
    profile = launch_profile(ctx.spec, ctx.arch.name)
    args, spec = profile.get("args", {}), profile.get("speculative", {})
    out = []
    gpu_experts = int(args.get("kt-num-gpu-experts", 0) or 0)
    if gpu_experts:
        out.append(f"GPU experts: the profile keeps {gpu_experts} experts per layer on the GPU "
                   f"(the {ctx.arch.paths.get('mxfp4_moe', 'arch')} MXFP4 MoE kernels); the tiny start runs every expert on the CPU")
    threshold = int(args.get("kt-gpu-prefill-token-threshold", 0) or 0)
    if threshold:
        out.append(f"layerwise prefill: the profile moves a layer's experts to the GPU for prefills of >= {threshold} "
                   "tokens; the tiny start's threshold is 0 (off) and its prompts are a few tokens")
    if spec.get("speculative-algorithm"):
        out.append(f"{spec['speculative-algorithm']}/NextN: the profile drafts with the NextN layer; the tiny start runs "
                   "without speculative decoding")
    if args.get("kt-enable-dynamic-expert-update"):
        out.append("dynamic expert update: it swaps GPU experts during layerwise prefill, which the tiny start never enters")
    out.append("hash-routed layers (V4-Flash's first num_hash_layers) and real weights: the tiny model has no hash "
               "layers and dummy weights")
    bs = args.get("cuda-graph-bs")
    if isinstance(bs, list) and max(bs) > 1:
        out.append(f"CUDA graphs for batch sizes {bs}: the tiny start captures batch size 1 only")
    return out


# --- the tier ----------------------------------------------------------------------

def gpu_standin(ctx: Context, facts: HostFacts) -> dict:
    """What torch.cuda and nvidia-smi answer in the probe (used only where the real ones are absent)."""
    mine = arch_gpus(ctx, facts)
    if mine:
        g = mine[0]
        return {"cc": ctx.arch.compute_capability, "name": g.name, "memory_mib": g.memory_bytes // 2**20}
    mib = int(os.environ.get("KTENV_SMOKE_GPU_MEMORY_MIB", STANDIN_MEMORY_MIB))
    return {"cc": ctx.arch.compute_capability, "name": f"{ctx.arch.title} stand-in", "memory_mib": mib}


def _case(name: str, cmd: launch.LaunchCommand, model: Path) -> dict:
    return {"name": name, "argv": cmd.server_args, "env": cmd.env, "config": str(model / "config.json")}


def _result(case: dict, r: dict, stubbed: list[dict], dsv4_error: str) -> Result:
    name = f"ServerArgs + model config: {case['name']}"
    stood = ("; without a GPU, stand-ins for " + ", ".join(s["what"] for s in stubbed)
             + " (--json: stubbed)") if stubbed else ""
    detail = {**r, "argv": case["argv"], "stubbed": stubbed}
    if dsv4_error:
        detail["dsv4_env_problem"] = dsv4_error
    f = r.get("failure")
    if not r.get("ok") and f:
        if f.get("stage") == "fields":
            ev = f"{f['config']}: field {f['field']} {f['problem']}"
            remedy = ("sglang reads this field while it builds the model on the GPU, minutes into a start (or builds "
                      "another model). Fix config.json; sglang ships V4-Flash's own config as "
                      "sglang/srt/configs/config_backup_small.json to compare with.")
        else:
            field = f" (config field {f['field']})" if f.get("field") else ""
            at = f"{f['file']}:{f['line']} in {f['function']}" if f.get("file") else "the probe"
            via = f" (called from {f['via']})" if f.get("via") else ""
            ev = f"{f.get('stage')}: {at}{via} raises {f['error']}{field}; the model's config is {f['config']}"
            when = ("while it builds the model on the GPU (MQALayer sets up RoPE)" if f.get("stage") == "rope"
                    else "before it touches the GPU")
            remedy = (f"sglang stops here at every start, {when}. "
                      + (f"Fix {f['field']} in config.json; sglang ships V4-Flash's own config as "
                         "sglang/srt/configs/config_backup_small.json to compare with." if f.get("field")
                         else "The traceback is in the JSON report."))
        return Result(TIER, name, FAILED, ev + stood, remedy, detail)
    if not r.get("ok"):
        return Result(TIER, name, FAILED, "the probe gave no result" + stood, "See the JSON report.", detail)
    res = r.get("resolved", {})
    ev = (f"sglang accepts it: attention backend {res.get('attention_backend')}, page size {res.get('page_size')}, "
          f"KV cache {res.get('kv_cache_dtype')}, context {res.get('context_len')}, "
          f"{res.get('num_hidden_layers')} layers, kt-method {res.get('kt_method')} with "
          f"{res.get('kt_num_gpu_experts')} GPU experts/layer, speculative {res.get('speculative_algorithm') or 'off'}; "
          f"{r.get('fields_checked')} DeepSeek-V4 config fields usable; RoPE set up for "
          f"{len(r.get('rope', []))} base(s)")
    if r.get("memory_defaults"):
        ev += f"; {', '.join(r['memory_defaults'])} left to sglang's default for the GPU's memory"
    if r.get("defaults_filled"):
        ev += f"; from DeepSeekV4Config's defaults, not config.json: {', '.join(r['defaults_filled'])}"
    return Result(TIER, name, PASSED, ev + stood, detail=detail)


def server_args_tier(ctx: Context, facts: HostFacts | None = None) -> list[Result]:
    facts = facts or live_facts(str(ctx.prefix))
    model, tiny, why = tiny_model(ctx)
    if tiny is None:
        return [Result(TIER, "tiny model", FAILED, why,
                             "The generator runs in the env (safetensors, tokenizers, sglang's config code); see the error.")]
    results = [Result(TIER, "tiny model", PASSED, f"{model}: {tiny['summary']}", detail=tiny)]
    cmd, dsv4_error, _ = tiny_command(ctx, model, tiny, port=30000, facts=facts)
    cases = [_case("tiny model, the launch-gpu command", cmd, model)]
    full, _ = command(ctx, str(model), speculative=True, facts=facts)
    cases.append(_case("tiny model, the `build.py launch` command", full, model))
    if getattr(ctx, "model", None):
        user = Path(ctx.model)
        if not (user / "config.json").is_file():
            results.append(Result(TIER, f"ServerArgs + model config: {user}", FAILED,
                                        f"--model {user} has no config.json",
                                        "Point --model at the checkpoint's top directory (config.json and the *.safetensors)."))
        else:
            mine, _ = command(ctx, str(user.absolute()), speculative=True, facts=facts)
            cases.append(_case(f"your model ({user})", mine, user))
    r, why = probe(ctx, "smoke_server_args.py", [], {"gpu": gpu_standin(ctx, facts), "cases": cases},
                         timeout=PROBE_TIMEOUT)
    if r is None or "cases" not in r:
        results.append(Result(TIER, "ServerArgs", FAILED, why or (r or {}).get("error", ""),
                                    "sglang's server arguments or its stand-ins did not even load; see the import tier.",
                                    r or {}))
        return results
    for case, cr in zip(cases, r["cases"]):
        results.append(_result(case, cr, r.get("stubbed", []), dsv4_error))
    return results
