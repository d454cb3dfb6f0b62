"""The launch tiers. launch-cpu: the command `build.py launch` would run, parsed
by the installed sglang's own argparse, and the DeepSeek-V4 env-var rules.
launch-gpu: a real server on a generated tiny DeepSeek-V4 model (dummy
weights) when a GPU of the arch is visible; skipped otherwise."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..host import gpu as gpumod
from ..host.facts import HostFacts, live_facts
from ..serve import launch
from .result import FAILED, NEEDS_GPU, PASSED, SKIPPED, Context, Result, probe


def _command(ctx: Context, model: str, speculative: bool = True, extra: list[str] | None = None,
             facts: HostFacts | None = None, require_gpu: bool = False) -> tuple[launch.LaunchCommand, str]:
    """The command `build.py launch` would run, and the DeepSeek-V4 env-var problem
    (as launch words it) if there is one. launch refuses such a command outright;
    smoke reports the problem and still parses the flags (with a valid mode)."""
    user = {k: v for k, v in ctx.env.items() if k.startswith("SGLANG_DSV4")}
    kw = dict(model=model, python=str(ctx.python), speculative=speculative,
              extra=list(ctx.extra_args) + list(extra or []), numactl=shutil.which("numactl") or "numactl",
              require_gpu=require_gpu)
    facts = facts or live_facts(str(ctx.prefix))
    try:
        return launch.build_command(ctx.spec, ctx.arch.name, facts, user_env=user, **kw), ""
    except launch.LaunchError as e:
        if "SGLANG_DSV4" not in str(e):
            raise
        valid = {"SGLANG_DSV4_MODE": "2601", "SGLANG_DSV4_2604_SUBMODE": ""}
        return launch.build_command(ctx.spec, ctx.arch.name, facts, user_env=valid, **kw), str(e)


def _dsv4(tier: str, cmd: launch.LaunchCommand, error: str) -> Result:
    if error:
        return Result(tier, "DeepSeek-V4 env vars", FAILED, error,
                      "sglang-kt checks these only while loading weights, minutes into a start; fix them first.")
    return Result(tier, "DeepSeek-V4 env vars", PASSED,
                  ", ".join(f"{k}={v}" for k, v in cmd.env.items() if k.startswith("SGLANG_DSV4")) + " with --kt-method "
                  + str(launch.flag_value(cmd.server_args, "--kt-method")))


def launch_cpu_tier(ctx: Context) -> list[Result]:
    model = str(Path(tempfile.gettempdir()) / "ktenv-smoke-model-not-loaded")
    cmd, dsv4_error = _command(ctx, model)
    results = [_dsv4("launch-cpu", cmd, dsv4_error)]
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


def launch_gpu_tier(ctx: Context) -> list[Result]:
    from ..probes import smoke_server  # host-side: it starts and watches the server process

    host = gpumod.detect()
    visible = gpumod.visible_gpus(host.gpus, dict(ctx.env))
    mine = [g for g in visible.gpus if (a := gpumod.arch_for_cc(ctx.spec, g.compute_capability)) and a.name == ctx.arch.name]
    if not mine:
        seen = ", ".join(f"{g.name} (cc {g.compute_capability})" for g in visible.gpus) or "no GPU"
        why = " ".join(host.notes) if not host.gpus else f"this host shows {seen}"
        return [Result("launch-gpu", "server on a tiny DeepSeek-V4", SKIPPED,
                       f"needs a visible {ctx.arch.title} GPU (compute capability {ctx.arch.compute_capability}); {why}",
                       f"Run `python build.py smoke --arch {ctx.arch.name} --tier launch-gpu` on such a host.")]
    work = ctx.work or Path(tempfile.mkdtemp(prefix=f"ktenv-smoke-{ctx.arch.name}-"))
    model = work / "model"
    r, why = probe(ctx, "smoke_tiny_model.py", [str(model)], timeout=900)
    if r is None or not r.get("ok"):
        return [Result("launch-gpu", "tiny model", FAILED, why or r.get("error", ""),
                       "The generator runs in the env (safetensors, tokenizers, sglang's config class); see the error.")]
    port = smoke_server.free_port()
    cmd, dsv4_error = _command(ctx, str(model), speculative=False, require_gpu=True,
                   extra=["--load-format", "dummy", "--port", str(port), "--kt-num-gpu-experts", str(r["gpu_experts"]),
                          "--kt-gpu-prefill-token-threshold", "0", "--context-length", "4096",
                          "--max-total-tokens", "4096", "--cuda-graph-max-bs", "1", "--cuda-graph-bs", "1"])
    results = [Result("launch-gpu", "tiny model", PASSED, f"{model}: {r['summary']}", detail=r),
               _dsv4("launch-gpu", cmd, dsv4_error)]
    if dsv4_error:
        return results
    run = smoke_server.ServerRun(cmd.argv, {**ctx.env, **cmd.env}, port, work / "server.log")
    report = run.check(deadline=float(os.environ.get("KTENV_SMOKE_START_TIMEOUT", "900")), prompt=r["prompt"])
    status = PASSED if report["ok"] else FAILED
    results.append(Result("launch-gpu", "server on a tiny DeepSeek-V4", status, report["summary"],
                          "" if report["ok"] else f"The server log is {work / 'server.log'}; its last lines are in the JSON report.",
                          report))
    return results
