"""The server command the launch tiers check: exactly what `build.py launch` would run
(serve/launch.build_command), with the DeepSeek-V4 env-var problem as launch words it."""

from __future__ import annotations

import shutil

from ..host.facts import HostFacts, live_facts
from ..serve import launch
from .result import FAILED, PASSED, Context, Result


def command(ctx: Context, model: str, speculative: bool = True, extra: list[str] | None = None,
             facts: HostFacts | None = None, require_gpu: bool = False) -> tuple[launch.LaunchCommand, str]:
    """The command `build.py launch` would run, and the DeepSeek-V4 env-var problem
    (as launch words it) if there is one. launch refuses such a command outright;
    smoke reports the problem and still parses the flags (with a valid mode)."""
    user = {k: v for k, v in ctx.env.items() if k.startswith("SGLANG_DSV4")}
    kw = dict(model=model, python=str(ctx.python), speculative=speculative,
              extra=list(ctx.extra_args) + list(extra or []), numactl=shutil.which("numactl", path=ctx.env.get("PATH")),
              require_gpu=require_gpu)
    facts = facts or live_facts(str(ctx.prefix))
    try:
        return launch.build_command(ctx.spec, ctx.arch.name, facts, user_env=user, **kw), ""
    except launch.LaunchError as e:
        if "SGLANG_DSV4" not in str(e):
            raise
        valid = {"SGLANG_DSV4_MODE": "2601", "SGLANG_DSV4_2604_SUBMODE": ""}
        return launch.build_command(ctx.spec, ctx.arch.name, facts, user_env=valid, **kw), str(e)


def dsv4_result(tier: str, cmd: launch.LaunchCommand, error: str) -> Result:
    if error:
        return Result(tier, "DeepSeek-V4 env vars", FAILED, error,
                      "sglang-kt checks these only while loading weights, minutes into a start; fix them first.")
    return Result(tier, "DeepSeek-V4 env vars", PASSED,
                  ", ".join(f"{k}={v}" for k, v in cmd.env.items() if k.startswith("SGLANG_DSV4")) + " with --kt-method "
                  + str(launch.flag_value(cmd.server_args, "--kt-method")))
