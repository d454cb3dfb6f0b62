"""`smoke --tier toolchain`: can this env JIT-compile what sglang-kt's DeepSeek-V4 path compiles at first use?

Results, in order:
  toolchain             which CUDA toolkit the env uses (the stamp's choice, else
                        the best one found), where it came from, what was passed over
  nvcc vs torch         same CUDA major as torch's build (torch refuses another)
  nvcc vs <arch>        new enough for the arch's code (sm_100a/sm_120a need 12.8)
  JIT lookups           where torch, tvm-ffi, tilelang and deep_gemm look for CUDA
                        inside the activated env; they must all find the chosen one
  compile <kernel>      each kernel compiled for the arch without a GPU, timed
                        (cold build dirs: the first server start pays the same)

The compiles run in the env's python through probes/toolchain_probe.py with the
environment activation gives (ktenv/build/activate.py). No toolkit: the checks
fail with the remedy, the compiles are skipped naming what is missing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..build import activate, toolchain
from .result import FAILED, PASSED, SKIPPED, Context, Result, probe

TIER = "toolchain"
PROBE = "toolchain_probe.py"
COMPILE_TIMEOUT = 1800  # linear_bf16_fp32 compiles torch's headers: minutes on 2 cores

# What the DeepSeek-V4 path compiles on every arch, and per indexer path.
ALWAYS = ("linear_bf16_fp32", "fused_rope", "hc_split_sinkhorn")
BY_INDEXER = {"tilelang": "indexer", "deep_gemm": "deep_gemm"}
WHY = {
    "linear_bf16_fp32": "torch load_inline, every MoE gate and compressor (SGLANG_OPT_BF16_FP32_GEMM_ALGO=cublas, the default)",
    "fused_rope": "tvm-ffi JIT, DeepSeek-V4 attention",
    "hc_split_sinkhorn": "tilelang, hyper-connections of every layer",
    "indexer": "tilelang fp8_paged_mqa_logits, the sparse-attention indexer",
    "deep_gemm": "deep_gemm fp8_paged_mqa_logits, the sparse-attention indexer",
}


def kernels_for(arch) -> list[str]:
    extra = BY_INDEXER.get(arch.paths.get("indexer", ""))
    return list(ALWAYS) + ([extra] if extra else [])


def choose(ctx: Context, policy: toolchain.Policy, torch_cuda: str) -> toolchain.Choice:
    """$KTENV_CUDA_HOME when set (and only it), else the env stamp's toolkit when it still
    judges usable, else the best one found now (toolchain.for_env)."""
    need = toolchain.need(policy, ctx.arch.name, torch_cuda)
    if ctx.env.get("KTENV_CUDA_HOME"):  # an explicit choice wins, and is never replaced
        return toolchain.select(policy, need, environ=ctx.env, prefix=ctx.prefix)
    rec = toolchain.for_env(policy.path.parent, ctx.arch.name, ctx.prefix, ctx.env)
    tk = toolchain.inspect(rec["cuda_home"], rec.get("origin") or "") if rec.get("cuda_home") else None
    if tk is None or toolchain.judge(tk, need):
        return toolchain.select(policy, need, environ=ctx.env, prefix=ctx.prefix)
    return toolchain.Choice(need, tk, rec.get("cxx"), rec.get("cc"), list(rec.get("notes") or []),
                            list(rec.get("rejected") or []))


def toolchain_tier(ctx: Context, envs_dir: str | Path | None = None) -> list[Result]:
    policy = toolchain.load(envs_dir) if envs_dir else ctx.spec.knowledge.toolchain
    torch_cuda = (ctx.lock.cuda if ctx.lock and ctx.lock.cuda else ctx.spec.stack.cuda)
    choice = choose(ctx, policy, torch_cuda)
    need = choice.need
    tk = choice.toolkit
    results: list[Result] = []
    kernels = kernels_for(ctx.arch)
    if tk is None:
        results.append(Result(TIER, "toolchain", FAILED, choice.summary + ".", choice.action, toolchain.as_dict(choice)))
        for k in kernels:
            results.append(Result(TIER, f"compile {k}", SKIPPED, f"no usable CUDA {need.major} toolkit ({WHY[k]})"))
        return results
    results.append(Result(TIER, "toolchain", PASSED,
                          f"CUDA {tk.version} at {tk.home} ({tk.origin}); " + "; ".join(choice.notes)
                          + "".join(f"; passed over {r['home']} ({r['version']}): {r['problems'][0]}" for r in choice.rejected),
                          detail=toolchain.as_dict(choice)))
    env = activate.activation(ctx.prefix, choice, ctx.env)
    where, why = probe(ctx, PROBE, ["where"], env=env, timeout=300)
    real_cuda = (where or {}).get("torch_cuda") or torch_cuda
    if real_cuda != torch_cuda:  # the env's torch, not the lock, decides
        need = toolchain.need(policy, ctx.arch.name, real_cuda)
    found = toolchain.problems(tk, need)
    major_bad = [found["major"]] if "major" in found else []
    results.append(Result(TIER, "nvcc vs torch", FAILED if major_bad else PASSED,
                          major_bad[0] if major_bad else f"nvcc {tk.version} and torch's CUDA {real_cuda} are both CUDA {need.major}",
                          "Install the CUDA toolkit of torch's major (see `build.py toolchain`)." if major_bad else ""))
    arch_bad = [found["arch"]] if "arch" in found else []
    results.append(Result(TIER, f"nvcc vs {ctx.arch.name}", FAILED if arch_bad else PASSED,
                          arch_bad[0] if arch_bad else f"nvcc {tk.version} >= {need.min_nvcc}: compiles {', '.join(need.targets)}",
                          f"Use a CUDA {need.major}.x >= {need.min_nvcc} toolkit (`build.py toolchain --arch {ctx.arch.name} --provision`)."
                          if arch_bad else ""))
    results.append(_lookups(where, why, tk))
    if major_bad or arch_bad:
        for k in kernels:
            results.append(Result(TIER, f"compile {k}", SKIPPED, f"the toolkit is refused above ({WHY[k]})"))
        return results
    for k in kernels:
        if ctx.compile_jit:
            results.append(_compile(ctx, env, k))
        else:
            results.append(Result(TIER, f"compile {k}", SKIPPED,
                                  f"not compiled in a default smoke ({WHY[k]}): compiling takes minutes "
                                  "(linear_bf16_fp32 4-10 min on 2 cores); `smoke --tier toolchain` compiles each, timed"))
    return results


def _lookups(where: dict | None, why: str, tk: toolchain.Toolkit) -> Result:
    if where is None:
        return Result(TIER, "JIT lookups", FAILED, f"the lookup probe {why}", "Run probes/toolchain_probe.py where in the env.")
    paths = {"torch": where.get("torch_cuda_home"), "tvm-ffi": where.get("tvm_ffi_cuda_home"),
             "tilelang": where.get("tilelang_cuda_home"), "deep_gemm": where.get("deep_gemm_cuda_home")}
    want = str(Path(tk.home).resolve())
    wrong = {k: v for k, v in paths.items() if not v or str(v).startswith("error") or str(Path(v).resolve()) != want}
    ev = (", ".join(f"{k} -> {v}" for k, v in paths.items()) + f"; ninja {where.get('ninja') or 'NOT on PATH'}"
          + f"; host compiler {where['env'].get('CXX') or 'default'}")
    if wrong or not where.get("ninja"):
        return Result(TIER, "JIT lookups", FAILED, ev,
                      "Some JIT path would use another CUDA (or find no ninja): run the server through "
                      "`build.py launch`, which activates the env (CUDA_HOME, PATH with the env's bin/ first).", where)
    return Result(TIER, "JIT lookups", PASSED, ev, detail=where)


def _compile(ctx: Context, env: dict, kernel: str) -> Result:
    build = Path(tempfile.mkdtemp(prefix=f"ktenv-jit-{kernel}-"))
    try:
        r, why = probe(ctx, PROBE, ["compile", kernel], {"cc": ctx.arch.compute_capability, "build_dir": str(build)},
                       timeout=COMPILE_TIMEOUT, env=env)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    name = f"compile {kernel}"
    if r is None:
        return Result(TIER, name, FAILED, f"the compile probe {why}", f"Run probes/toolchain_probe.py compile {kernel} in the env.")
    if not r.get("ok"):
        return Result(TIER, name, FAILED, f"{WHY[kernel]}: {r['error'][-700:]}",
                      "The server's first forward would fail the same way. The traceback tail is in the JSON report.",
                      {"traceback": r.get("traceback_tail", "")})
    return Result(TIER, name, PASSED, f"{r['seconds']} s for cc {ctx.arch.compute_capability} "
                  f"({r.get('target') or r.get('arch_list')}) via {r['via']}", detail=r)
