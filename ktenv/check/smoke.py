"""`smoke`: prove an environment, tier by tier.

    import      every locked distribution at its locked version, every module
                it installs imports, and the pieces the arch's path needs
                (tier_import.py)
    kernel      a KT-Kernel MXFP4 MoE forward against a torch reference
                (tier_kernel.py)
    launch-cpu  the arch's launch command through sglang's own argparse, and
                the DeepSeek-V4 env-var rules (tier_launch.py)
    toolchain   the CUDA toolkit the env JIT-compiles with: torch's major, new
                enough for the arch, found by every JIT path; with `--tier
                toolchain` the first-start kernels compiled, timed (toolchain_tier.py)
    server-args sglang's ServerArgs post-init and model-config loading for the
                launch argv, on the tiny model and --model (startup.py)
    launch-gpu  a real server on a generated tiny DeepSeek-V4 model (dummy
                weights) on one GPU of the arch when one is visible; skipped otherwise

Every check runs in the env's python, in its own process (ktenv never imports
torch or sglang; see ktenv/probe.py). The tiers that need no GPU share one
fork server (probes/fork_server.py): its warm parent imports torch and the
stack's heavy shared imports once, and every module, check and probe is a
process forked from it, at most one per core at a time. A result is passed,
failed, needs-gpu (it could only fail for want of the NVIDIA driver, and says
so) or skipped (with the reason); never passed for something that did not run.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import asdict

from ..host.cpu import cpu_info
from ..progress import beat
from ..target import Target
from .result import FAILED, NEEDS_GPU, PASSED, SKIPPED, Context, Result, child_env, fork_server
from .tier_import import import_tier
from .tier_kernel import kernel_tier
from .startup import server_args_tier
from .tier_launch import launch_cpu_tier, launch_gpu_tier
from .toolchain_tier import toolchain_tier

TIERS = ("import", "kernel", "launch-cpu", "toolchain", "server-args", "launch-gpu")
TIER_FUNCS = {"import": import_tier, "kernel": kernel_tier, "launch-cpu": launch_cpu_tier, "toolchain": toolchain_tier,
              "server-args": server_args_tier, "launch-gpu": launch_gpu_tier}
# Tiers whose probes run in the env's python on the CPU share the fork server; a tier
# not named here runs after it has stopped (the toolchain tier's compiles and the
# server-args probe, which imports sglang once and forks its own cases, and GPU work).
# The server starts only with the import tier: its preload pays off over ~250 jobs,
# not over one or two probes.
FORKED = ("import", "kernel", "launch-cpu")


def context(target: Target, **kw) -> Context:
    """The smoke context for a built env (KtenvError naming the build command when there is none)."""
    target.require_env()
    return Context(target=target, env=child_env(target), cpu_flags=cpu_info().flags, **kw)


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def smoke(ctx: Context, tiers: list[str] | tuple[str, ...] = TIERS, progress=None) -> dict:
    say = progress or (lambda msg: None)
    t, cpu0, load0 = time.monotonic(), _cpu(), os.getloadavg()[0]
    order = [tier for tier in TIER_FUNCS if tier in tiers]
    forked = "import" in order
    results: list[Result] = []
    timings = {}
    with contextlib.ExitStack() as forks:
        if forked:
            forks.enter_context(fork_server(ctx))
        for tier in order:
            if tier not in FORKED:
                forks.close()  # stop the warm parent (~1 GB) before GPU work
            t1 = time.monotonic()
            say(f"{tier} tier: running")
            with beat(progress, f"{tier} tier"):
                got = TIER_FUNCS[tier](ctx)
            timings[tier] = round(time.monotonic() - t1, 1)
            bad = sum(1 for r in got if r.status == FAILED)
            say(f"{tier} tier: {len(got)} result(s), {bad} failed, in {timings[tier]} s")
            results += got
    failed = [r for r in results if r.status == FAILED]
    return {"arch": ctx.arch.name, "prefix": str(ctx.prefix), "python": str(ctx.python), "tiers": list(timings),
            "seconds": timings, "total_seconds": round(time.monotonic() - t, 1), "ok": not failed,
            "cpu_seconds": round(_cpu() - cpu0, 1), "workers": ctx.workers, "cores": os.cpu_count(),
            "load": [round(load0, 2), round(os.getloadavg()[0], 2)], "fork_server": ctx.last_forks,
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
    per = ", ".join(f"{k} {v} s" for k, v in report["seconds"].items())
    lines.append(f"time: {per}; {report['cpu_seconds']} s of CPU, {report['workers']} at a time on "
                 f"{report['cores']} cores (load average {report['load'][0]} at the start)")
    return "\n".join(lines)
