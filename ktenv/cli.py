"""The command line: parse the arguments, resolve one target, call one stage, print.

Stage modules are imported lazily so that `lock --check` does not pay for
importing the env builder, and the tool's own process never imports torch or
sglang (those run inside the env, through ktenv/probe.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import KtenvError

ISAS = ("amx", "avx512_bf16", "avx512_vbmi", "avx512_vnni", "avx512_base", "avx2")
TIERS = ("import", "kernel", "launch-cpu", "toolchain", "server-args", "launch-gpu")


def _arch_args(p: argparse.ArgumentParser, allow_all: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--arch", help="sm89, sm90, sm100 or sm120")
    if allow_all:
        g.add_argument("--all", action="store_true", help="every supported arch")
    p.add_argument("--stack", help="stack version (default: envs/stack.toml's default; for a built env, the one it was built from)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--envs", default="envs", help="the spec directory (default: envs)")
    p.add_argument("--lock-dir", default="lock", help="where locks live (default: lock)")


def _env_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", help="the env (default: .envs/<arch>)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="build.py",
        description="ktenv: locked, verified environments for sglang-kt + KT-Kernel, per GPU arch.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("lock", help="resolve envs/ with uv into lock/<arch>/")
    _arch_args(p, allow_all=True)
    _common(p)
    p.add_argument("--check", action="store_true", help="offline: exit 1 if the inputs changed since the lock")
    p.add_argument("--upgrade", action="store_true", help="re-resolve within the spec, ignoring the current pins")
    p.add_argument("--offline", action="store_true", help="resolve from uv's cache only")
    p.add_argument("--no-rule", action="append", default=[], metavar="ID", help="resolve without this rule (to see what it lifts)")
    p.add_argument("--out", help="write the lock here instead of lock/<arch>[/stack-<v>]")
    p.add_argument("--conda", action="store_true", help="also solve envs/conda.toml into lock/<arch>/conda-lock.yml")
    p.add_argument("--channel", metavar="URL", help="conda channel to solve against (default: envs/conda.toml's)")
    p.add_argument("--exclude-newer", metavar="none|DATE",
                   help="with --conda: the solve's cut-off (default: the stack's exclude_newer; `none` for a mirror "
                        "whose index stamps packages with its own indexing time)")
    p.add_argument("--python", metavar="X.Y", help="with --conda: the conda lock's Python (default: the stack's first)")
    p.set_defaults(handler=cmd_lock)

    p = sub.add_parser("explain", help="the rules in effect and where the lock departs from upstream")
    _arch_args(p)
    _common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_explain)

    p = sub.add_parser("env", help="build .envs/<arch> from its lock, KT-Kernel matched to this CPU")
    _arch_args(p)
    _common(p)
    _env_args(p)
    p.add_argument("--no-wait", action="store_true", help="fail at once if another build holds the prefix")
    p.add_argument("--kt-source", metavar="PATH", help="build kt-kernel from this ktransformers checkout")
    p.add_argument("--target-isa", choices=ISAS, help="build kt-kernel for another machine's CPU")
    p.add_argument("--python", help="the interpreter to build the env with (default: found by uv)")
    p.add_argument("--cuda-home", metavar="PATH", help="the CUDA toolkit the env's JIT kernels use (default: found; see `toolchain`)")
    p.add_argument("--flash-mla-source", metavar="PATH",
                   help="sm90: build flash_mla from this FlashMLA checkout (the commit envs/sm90.toml pins)")
    p.add_argument("--cutlass-source", metavar="PATH",
                   help="with --flash-mla-source: CUTLASS at FlashMLA's submodule commit, if its csrc/cutlass is empty")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true",
                   help="verify every file of the built env against its RECORD and the payload manifest; exit 1 if damaged")
    g.add_argument("--repair", action="store_true",
                   help="reinstall only the damaged distributions (hash-checked from the lock), then verify")
    p.add_argument("--deep", action="store_true", help="with --check or --repair: hash every file, not only the ones the stat pass doubts")
    p.add_argument("--backend", choices=("uv", "conda"), default="uv")
    p.add_argument("--channel", metavar="URL", help="with --backend conda: the channel the conda lock was made against")
    p.add_argument("--tune", nargs="?", const="mixed", choices=("decode", "prefill", "mixed"), metavar="WORKLOAD",
                   help="then measure the fastest kt-kernel variant here (build.py tune; default workload: mixed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_env)

    p = sub.add_parser("smoke", help="prove an env: import, kernel, launch tiers")
    _arch_args(p)
    _common(p)
    _env_args(p)
    p.add_argument("--tier", action="append", choices=TIERS, help="run only these tiers (repeatable)")
    p.add_argument("--model", metavar="PATH", help="server-args also loads this checkpoint's config.json as sglang would")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_smoke)

    p = sub.add_parser("toolchain", help="the CUDA toolkit the env's JIT kernels use: found, checked, or provisioned")
    _arch_args(p)
    _common(p)
    _env_args(p)
    p.add_argument("--cuda-home", metavar="PATH", help="use this toolkit, or say why it cannot be used")
    p.add_argument("--provision", action="store_true", help="fetch a pinned toolkit (envs/toolchain.toml) when none is usable")
    p.add_argument("--source", metavar="NAME", help="provision this pinned source (envs/toolchain.toml [[source]] name) even if another toolkit is usable")
    p.add_argument("--from-dir", metavar="DIR", help="with --provision/--source: take the pinned archives from DIR instead of downloading")
    p.add_argument("--print-env", action="store_true", help="print `export` lines that activate the env with the toolkit")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_toolchain)

    p = sub.add_parser("audit", help="CUDA arch coverage of the binaries the env's loaders will load")
    _arch_args(p)
    _common(p)
    _env_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_audit)

    p = sub.add_parser("doctor", help="this host: GPUs, driver, CPU ISA, NUMA, RAM, disk; which --arch")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--record", metavar="DIR", help="save this host's raw facts (nvidia-smi, NVML, /proc, /sys) to DIR")
    p.add_argument("--host-facts", metavar="DIR", help="answer for a host recorded with --record instead of this one")
    p.set_defaults(handler=cmd_doctor)

    p = sub.add_parser("tune", help="measure which kt-kernel variant (and method) is fastest on this CPU")
    _arch_args(p)
    _common(p)
    _env_args(p)
    p.add_argument("--threads", type=int, help="MoE threads (default: what launch gives one thread pool here)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: envs/tune.toml)")
    p.add_argument("--workload", choices=("decode", "prefill", "mixed"), default="mixed",
                   help="the phase that matters most to you; decides ties (default: mixed)")
    p.add_argument("--variant", choices=ISAS, help="force this variant instead of measuring (refused if this CPU cannot run it)")
    p.add_argument("--remeasure", action="store_true", help="measure again instead of using the cached measurement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_tune)

    p = sub.add_parser("launch", help="the per-arch, per-host server command")
    _arch_args(p)
    _common(p)
    _env_args(p)
    p.add_argument("--model", required=True, metavar="PATH")
    p.add_argument("--kt-weight-path", metavar="PATH")
    p.add_argument("--no-speculative", action="store_true", help="leave out the MTP (EAGLE) flags")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("--host-facts", metavar="DIR",
                   help="print the command for a host recorded with `doctor --record DIR` (implies --dry-run)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra sglang flags")
    p.set_defaults(handler=cmd_launch)

    p = sub.add_parser("convert", help="convert the MXFP4 routed experts to AMXINT4 CPU weights (kt-kernel's script)")
    _arch_args(p)
    _common(p)
    p.add_argument("--prefix", help="the env to run the script in (default: .envs/<arch>)")
    p.add_argument("--model", required=True, metavar="PATH", help="the DeepSeek-V4 checkpoint (MXFP4 experts)")
    p.add_argument("--output", required=True, metavar="PATH", help="where the converted experts go (--kt-weight-path)")
    p.add_argument("--kt-source", required=True, metavar="CHECKOUT",
                   help="a ktransformers checkout: its kt-kernel/scripts/convert_cpu_weights_ds4.py runs")
    p.add_argument("--threadpool-count", type=int, metavar="N",
                   help="threadpool slots to write (default: this host's NUMA nodes, what launch will use)")
    p.add_argument("--cpuinfer", type=int, metavar="N", help="conversion threads (default: this host's physical cores)")
    p.add_argument("--host-facts", metavar="DIR", help="take NUMA and cores from a `doctor --record` recording")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_convert)
    return top


# --- the target -------------------------------------------------------------------

def _spec(args):
    from .spec import load

    return load(args.envs)


def _target(args, spec=None, follow_stamp: bool = True):
    from .target import resolve

    return resolve(spec or _spec(args), args.arch, stack=args.stack, lock_root=args.lock_dir,
                   prefix=getattr(args, "prefix", None), follow_stamp=follow_stamp)


def _print(report, as_json: bool, render) -> None:
    print(json.dumps(report, indent=1, sort_keys=True, default=str) if as_json else render(report))


def _errors(errors: list[KtenvError]) -> int:
    """Every arch's error, not just the first; the exit code of the first."""
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return errors[0].exit_code if errors else 0


# --- the commands -----------------------------------------------------------------

def cmd_lock(args) -> int:
    from .lock import make

    spec = _spec(args)
    archs = spec.supported_archs() if args.all else [args.arch]
    for a in archs:
        spec.arch(a)  # refuse unknown/unsupported archs before any work
    if args.out and len(archs) > 1:
        raise KtenvError("--out names one directory; use it with --arch, not --all.")
    targets = {a: Path(args.out) if args.out else make.lock_dir(Path(args.lock_dir), spec, a, args.stack) for a in archs}
    if (args.exclude_newer or args.python) and not args.conda:
        raise KtenvError("--exclude-newer and --python choose the conda lock's cut-off and Python; use them with --conda.")
    if args.check:
        extra = []
        if any((d / "conda-lock.yml").exists() for d in targets.values()):
            from .lock import conda

            extra.append(lambda a, d: (d / conda.LOCK_FILE).exists() and conda.check(spec, a, d, channel_url=args.channel))
        return _errors(make.check_archs(spec, archs, args.stack, targets, disabled=tuple(args.no_rule), extra_checks=extra))
    errors = make.lock_archs(spec, archs, args.stack, targets, upgrade=args.upgrade, offline=args.offline,
                             disabled=tuple(args.no_rule))
    if errors:
        return _errors(errors)
    if args.conda:
        from .lock import conda

        cutoff = conda.parse_exclude_newer(args.exclude_newer)
        for a in archs:
            conda.lock(spec, a, out_dir=targets[a], channel_url=args.channel, stack_version=args.stack,
                       python=args.python, exclude_newer=cutoff, offline=args.offline)
    return 0


def cmd_explain(args) -> int:
    from .lock import explain

    t = _target(args, follow_stamp=False)
    _print(explain.report(t.spec, t.arch.name, t.stack, t.lock_dir), args.json, explain.render)
    return 0


def cmd_env(args) -> int:
    from .build import pipeline
    from .progress import Progress

    if args.deep and not (args.check or args.repair):
        raise KtenvError("--deep goes with --check or --repair (it hashes every file of the env).")
    if args.check or args.repair:
        return _env_check(args)
    t = _target(args, follow_stamp=False)
    # One pipeline for both backends: only how the prefix and its Python are
    # made differs (uv venv, or the conda prefix of lock/<arch>/conda-lock.yml).
    if args.cutlass_source and not args.flash_mla_source:
        raise KtenvError("--cutlass-source goes with --flash-mla-source (it is the CUTLASS FlashMLA compiles against).")
    cuobjdump = None
    if args.flash_mla_source:  # the pinned lister for the flash_mla build's SASS audit (check/ sits above build/)
        from .check.cuobjdump import find_cuobjdump

        cuobjdump = find_cuobjdump()[0]
    opts = pipeline.Options(python=args.python, kt_source=args.kt_source, target_isa=args.target_isa, wait=not args.no_wait,
                            cuda_home=args.cuda_home, backend=args.backend, channel=args.channel,
                            flash_mla_source=args.flash_mla_source, cutlass_source=args.cutlass_source, cuobjdump=cuobjdump)
    report = pipeline.build(t, opts, Progress())
    if args.tune:
        # After the build, not inside it: the build stage sits below serve, and a
        # measurement is cached across rebuilds of the same kt-kernel anyway.
        from .serve import tune

        result = tune.tune(t, workload=args.tune, progress=Progress())
        tune.record(result, t.prefix)
        report["kt_tune"] = tune.stamp_entry(result)
    _print(report, args.json, lambda r: pipeline.summary(r) + (
        f"\n  kt-kernel tuned: KT_KERNEL_CPU_VARIANT={r['kt_tune']['variant']} ({r['kt_tune']['why']})"
        if r.get("kt_tune") else ""))
    return 0


def _env_check(args) -> int:
    """`env --check` / `env --repair`: the env as built (its stamp's lock), file by file."""
    from .build import pipeline, repair, verify
    from .progress import Progress

    t = _target(args).require_env()
    if args.check:
        report = verify.check(t.prefix, deep=args.deep)
        _print(report, args.json, lambda r: verify.render(r, t.build_hint()))
        return 0 if report["ok"] else 1
    report = repair.repair(t, pipeline.PATCHES_DIR, deep=args.deep, wait=not args.no_wait, progress=Progress())
    _print(report, args.json, repair.render)
    return 0


def cmd_smoke(args) -> int:
    from .check import smoke
    from .progress import Progress

    ctx = smoke.context(_target(args), compile_jit="toolchain" in (args.tier or []), model=args.model)
    report = smoke.smoke(ctx, args.tier or smoke.TIERS, Progress())
    _print(report, args.json, smoke.render)
    return 0 if report["ok"] else 1


def cmd_toolchain(args) -> int:
    from .build import toolchain_cli

    return toolchain_cli.run(_target(args), args)


def cmd_audit(args) -> int:
    from .check import audit

    report = audit.audit(_target(args).require_env())
    _print(report, args.json, audit.render)
    return 0 if report["ok"] else 1


def cmd_doctor(args) -> int:
    from .check import doctor
    from .host import facts

    if args.record:
        print(f"recorded this host's facts into {facts.record(args.record)}")
        return 0
    spec = _spec(args)
    host = facts.recorded_facts(args.host_facts) if args.host_facts else facts.live_facts()
    report = doctor.collect(spec, host)
    _print(report, args.json, lambda r: doctor.render(r).rstrip("\n"))
    # Non-zero when something would stop a server, so scripts can gate on it.
    return 0 if report["ok"] else 1


def cmd_tune(args) -> int:
    from .progress import Progress
    from .serve import tune

    t = _target(args).require_env()
    result = tune.tune(t, workload=args.workload, threads=args.threads, rounds=args.rounds, variant=args.variant,
                       use_cache=not args.remeasure, progress=Progress())
    if result["choice"]["variant"]:
        result["recorded_in"] = str(tune.record(result, t.prefix))  # where launch and activation read it
    _print(result, args.json, lambda r: tune.render(r) + (
        f"recorded in {r['recorded_in']}: launch exports KT_KERNEL_CPU_VARIANT={r['choice']['variant']}"
        if r.get("recorded_in") else "no choice recorded"))
    return 0 if result["choice"]["variant"] else 1


def _recorded(args):
    from .host import facts

    return facts.recorded_facts(args.host_facts) if getattr(args, "host_facts", None) else None


def cmd_launch(args) -> int:
    from .serve import launch

    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    if args.host_facts:
        args.dry_run = True  # a command for another machine is printed, never run here
    cmd = launch.command_for(_target(args), args.model, kt_weight_path=args.kt_weight_path,
                             speculative=not args.no_speculative, extra=extra, dry_run=args.dry_run,
                             facts=_recorded(args))
    for n in cmd.notes:
        print(f"note: {n}", file=sys.stderr)
    if args.dry_run:
        print(cmd.shell(), end="")
        return 0
    print(cmd.shell(), end="", file=sys.stderr)
    launch.execute(cmd)
    return 0  # not reached


def cmd_convert(args) -> int:
    from .progress import Progress
    from .serve import convert

    target = _target(args)
    manifest = convert.convert(target, args.model, args.output, args.kt_source, facts=_recorded(args),
                               pools=args.threadpool_count, threads=args.cpuinfer,
                               progress=Progress(quiet=args.json))
    _print(manifest, args.json, lambda m: convert.render(m, target))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KtenvError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
