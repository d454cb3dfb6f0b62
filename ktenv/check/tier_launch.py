"""The launch tiers. launch-cpu: the command `build.py launch` would run, parsed
by the installed sglang's own argparse, and the DeepSeek-V4 env-var rules.
launch-gpu: a real server on a generated tiny DeepSeek-V4 model (dummy
weights) on one GPU of the arch when one is visible; skipped otherwise. The
tiny model, the one-GPU command and the server environment come from
startup.py, which the server-args tier shares."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..host.facts import HostFacts, live_facts
from ..probes import smoke_server  # host-side: it starts and watches the server process
from ..serve import launch
from . import startup
from .command import command, dsv4_result
from .result import FAILED, NEEDS_GPU, PASSED, SKIPPED, Context, Result, probe


def launch_cpu_tier(ctx: Context) -> list[Result]:
    model = str(Path(tempfile.gettempdir()) / "ktenv-smoke-model-not-loaded")
    cmd, dsv4_error = command(ctx, model)
    results = [dsv4_result("launch-cpu", cmd, dsv4_error)]
    r, why = probe(ctx, "smoke_launch_cpu.py", [], {"argv": cmd.server_args}, env={**ctx.env, **cmd.env})
    name = "launch command parses"
    if r is None or "import_error" in (r or {}):
        results.append(Result("launch-cpu", name, FAILED, why or r["import_error"],
                              "sglang's server arguments do not even import; see the import tier."))
        return results
    if not r["ok"]:
        flags = r.get("unknown") or ([r["bad_argument"]["flag"]] if r.get("bad_argument") else [])
        results.append(Result("launch-cpu", name, FAILED,
                              f"sglang {'does not know ' + ', '.join(flags) if r.get('unknown') else 'rejects ' + ', '.join(flags)}: {r['error']}",
                              "The installed sglang-kt does not accept this command. Remove or rename the flag in envs/ "
                              f"([launch.args] of stack.toml or {ctx.arch.name}.toml), or lock a stack whose sglang-kt knows it.",
                              {"argv": cmd.server_args}))
        return results
    spec_flags = [f for f in r["given_flags"] if f.startswith("--speculative")]
    results.append(Result("launch-cpu", name, PASSED,
                          f"sglang's own parser accepts all {len(r['given_flags'])} flags "
                          f"({len(spec_flags)} speculative) of `build.py launch --arch {ctx.arch.name}`",
                          detail={"argv": cmd.server_args, "parsed": r["parsed"]}))
    sa = r.get("server_args", {})
    if sa.get("ok"):
        results.append(Result("launch-cpu", "ServerArgs validation", PASSED, "ServerArgs.from_cli_args accepts the command"))
    elif sa.get("needs_gpu"):
        results.append(Result("launch-cpu", "ServerArgs validation", NEEDS_GPU, sa["error"],
                              "ServerArgs' post-init asks the accelerator first; run smoke --tier launch-gpu on the GPU host."))
    else:
        results.append(Result("launch-cpu", "ServerArgs validation", FAILED, sa.get("error", "")[:800],
                              "sglang's own validation rejects the command; the error names the setting.",
                              {"traceback": sa.get("traceback_tail", "")}))
    return results


def launch_gpu_tier(ctx: Context, facts: HostFacts | None = None) -> list[Result]:
    """facts: tests pass a recorded host (with a stand-in server as the env's python)."""
    given = facts is not None
    facts = facts or live_facts(str(ctx.prefix))
    if not given and facts.origin != "this host":
        return [Result("launch-gpu", "server on a tiny DeepSeek-V4", SKIPPED,
                       f"host facts come from {facts.origin} (KTENV_HOST_RECORDING); a server start needs this host's GPU",
                       "Unset KTENV_HOST_RECORDING to run the tier here.")]
    if not startup.arch_gpus(ctx, facts):
        seen = ", ".join(f"{g.name} (cc {g.compute_capability})" for g in facts.gpu.gpus) or "no GPU"
        why = " ".join(facts.gpu.notes) if not facts.gpu.gpus else f"this host shows {seen}"
        return [Result("launch-gpu", "server on a tiny DeepSeek-V4", SKIPPED,
                       f"needs a visible {ctx.arch.title} GPU (compute capability {ctx.arch.compute_capability}); {why}",
                       f"Run `python build.py smoke --arch {ctx.arch.name} --tier launch-gpu` on such a host.")]
    model, r, why = startup.tiny_model(ctx)
    ctx.work = ctx.work or Path(tempfile.mkdtemp(prefix=f"ktenv-smoke-{ctx.arch.name}-"))  # the server log
    if r is None:
        return [Result("launch-gpu", "tiny model", FAILED, why,
                       "The generator runs in the env (safetensors, tokenizers, sglang's config class); see the error.")]
    port = smoke_server.free_port()
    try:
        cmd, dsv4_error, gpu = startup.tiny_command(ctx, model, r, port, facts=facts, require_gpu=True)
    except launch.LaunchError as e:  # e.g. several NUMA nodes and no numactl: `build.py launch` refuses too
        return [Result("launch-gpu", "launch command", FAILED, str(e), "Fix what the message names, then rerun.")]
    results = [Result("launch-gpu", "tiny model", PASSED, f"{model}: {r['summary']}", detail=r),
               dsv4_result("launch-gpu", cmd, dsv4_error)]
    if dsv4_error:
        return results
    deadline = float(os.environ.get("KTENV_SMOKE_START_TIMEOUT", "900"))
    run = smoke_server.ServerRun(cmd.argv, startup.server_env(ctx, cmd, gpu, deadline), port, ctx.work / "server.log",
                                 kt_layers=r["kt_layers"], kt_experts=r["n_routed_experts"])
    report = run.check(deadline=deadline, prompt=r["prompt"])
    report["gpu"] = f"{gpu.index} {gpu.name} ({gpu.uuid}, PCI {gpu.pci_bus_id})"
    report["not_exercised"] = startup.not_exercised(ctx, r)
    status = PASSED if report["ok"] else FAILED
    gaps = " Not exercised by the tiny start: " + "; ".join(report["not_exercised"]) + "."
    results.append(Result("launch-gpu", "server on a tiny DeepSeek-V4", status,
                          f"on GPU {gpu.index} ({gpu.name}), --tensor-parallel-size 1: {report['summary']}." + gaps,
                          "" if report["ok"] else f"The server log is {ctx.work / 'server.log'}; its last lines are in the JSON report.",
                          report))
    return results
