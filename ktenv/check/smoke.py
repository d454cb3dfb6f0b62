"""`smoke`: prove an environment, tier by tier.

    import      every locked distribution at its locked version, every module
                it installs imports, and the pieces the arch's path needs
                (tier_import.py)
    kernel      a KT-Kernel MXFP4 MoE forward against a torch reference
                (tier_kernel.py)
    toolchain   the CUDA toolkit the env JIT-compiles with: torch's major, new
                enough for the arch, found by every JIT path; with `--tier
                toolchain` the first-start kernels compiled, timed (toolchain_tier.py)
    launch-cpu  the arch's launch command through sglang's own argparse, and
                the DeepSeek-V4 env-var rules (tier_launch.py)
    server-args sglang's ServerArgs post-init and model-config loading for the
                launch argv, on the tiny model and --model (startup.py)
    launch-gpu  a real server on a generated tiny DeepSeek-V4 model (dummy
                weights) on one GPU of the arch when one is visible; skipped otherwise

Every check runs in the env's python, in its own process (ktenv never imports
torch or sglang; see ktenv/probe.py). A result is passed, failed, needs-gpu
(it could only fail for want of the NVIDIA driver, and says so) or skipped
(with the reason); never passed for something that did not run.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from ..host.cpu import cpu_info
from ..target import Target
from .result import FAILED, NEEDS_GPU, PASSED, SKIPPED, Context, Result, child_env
from .tier_import import import_tier
from .tier_kernel import kernel_tier
from .startup import server_args_tier
from .tier_launch import launch_cpu_tier, launch_gpu_tier
from .toolchain_tier import toolchain_tier

TIERS = ("import", "kernel", "toolchain", "launch-cpu", "server-args", "launch-gpu")
TIER_FUNCS = {"import": import_tier, "kernel": kernel_tier, "toolchain": toolchain_tier,
              "launch-cpu": launch_cpu_tier, "server-args": server_args_tier, "launch-gpu": launch_gpu_tier}


def context(target: Target, **kw) -> Context:
    """The smoke context for a built env (KtenvError naming the build command when there is none)."""
    target.require_env()
    return Context(target=target, env=child_env(target), cpu_flags=cpu_info().flags, **kw)


def smoke(ctx: Context, tiers: list[str] | tuple[str, ...] = TIERS) -> dict:
    t = time.monotonic()
    results: list[Result] = []
    timings = {}
    for tier in TIERS:
        if tier not in tiers:
            continue
        t1 = time.monotonic()
        results += TIER_FUNCS[tier](ctx)
        timings[tier] = round(time.monotonic() - t1, 1)
    failed = [r for r in results if r.status == FAILED]
    return {"arch": ctx.arch.name, "prefix": str(ctx.prefix), "python": str(ctx.python), "tiers": list(timings),
            "seconds": timings, "total_seconds": round(time.monotonic() - t, 1), "ok": not failed,
            "counts": {s: sum(1 for r in results if r.status == s) for s in (PASSED, FAILED, NEEDS_GPU, SKIPPED)},
            "results": [asdict(r) for r in results]}


def render(report: dict) -> str:
    mark = {PASSED: "ok  ", FAILED: "FAIL", NEEDS_GPU: "gpu ", SKIPPED: "skip"}
    lines = [f"smoke {report['arch']} ({report['prefix']}): tiers {', '.join(report['tiers'])}"]
    tier = None
    for r in report["results"]:
        if r["tier"] != tier:
            tier = r["tier"]
            lines.append(f"\n[{tier}] {report['seconds'][tier]} s")
        ev = " ".join(r["evidence"].split())  # library messages come with their own line breaks
        ev = ev if len(ev) <= 400 else ev[:400] + " ... (--json has it whole)"
        lines.append(f"  {mark[r['status']]} {r['name']}: {ev}")
        if r["remedy"] and r["status"] in (FAILED, NEEDS_GPU):
            lines.append(f"       -> {r['remedy']}")
    c = report["counts"]
    lines.append(f"\n{c[PASSED]} passed, {c[FAILED]} failed, {c[NEEDS_GPU]} need a GPU, {c[SKIPPED]} skipped "
                 f"in {report['total_seconds']} s")
    return "\n".join(lines)
