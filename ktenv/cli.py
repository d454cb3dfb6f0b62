"""Command-line parsing only: each subcommand hands its namespace to one module.

Every stage module exposes `run(args) -> int`. Modules are imported lazily so
that `lock --check` does not pay for importing the env builder, and so that the
tool's own process never imports torch or sglang (those run inside the env).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import KtenvError

ISAS = ("amx", "avx512_bf16", "avx512_vbmi", "avx512_vnni", "avx512_base", "avx2")


def _arch_args(p: argparse.ArgumentParser, allow_all: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--arch", help="sm89, sm90, sm100 or sm120")
    if allow_all:
        g.add_argument("--all", action="store_true", help="every supported arch")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--envs", default="envs", help="the spec directory (default: envs)")
    p.add_argument("--lock-dir", default="lock", help="where locks live (default: lock)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="build.py",
        description="ktenv: locked, verified environments for sglang-kt + KT-Kernel, per GPU arch.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("lock", help="resolve envs/ with uv into lock/<arch>/")
    _arch_args(p, allow_all=True)
    _common(p)
    p.add_argument("--stack", help="stack version (default: envs/stack.toml's default)")
    p.add_argument("--check", action="store_true", help="offline: exit 1 if the inputs changed since the lock")
    p.add_argument("--upgrade", action="store_true", help="re-resolve within the spec, ignoring the current pins")
    p.add_argument("--offline", action="store_true", help="resolve from uv's cache only")
    p.add_argument("--no-rule", action="append", default=[], metavar="ID", help="resolve without this rule (to see what it lifts)")
    p.add_argument("--out", help="write the lock here instead of lock/<arch>[/stack-<v>]")
    p.add_argument("--conda", action="store_true", help="also solve envs/conda.toml into lock/<arch>/conda-lock.yml")
    p.add_argument("--channel", metavar="URL", help="conda channel to solve against (default: envs/conda.toml's)")
    p.set_defaults(module="lock")

    p = sub.add_parser("explain", help="the rules in effect and where the lock departs from upstream")
    _arch_args(p)
    _common(p)
    p.add_argument("--stack")
    p.add_argument("--json", action="store_true")
    p.set_defaults(module="explain")

    p = sub.add_parser("env", help="build .envs/<arch> from its lock, KT-Kernel matched to this CPU")
    _arch_args(p)
    _common(p)
    p.add_argument("--prefix", help="where to build (default: .envs/<arch>)")
    p.add_argument("--stack")
    p.add_argument("--no-wait", action="store_true", help="fail at once if another build holds the prefix")
    p.add_argument("--kt-source", metavar="PATH", help="build kt-kernel from this ktransformers checkout")
    p.add_argument("--target-isa", choices=ISAS, help="build kt-kernel for another machine's CPU")
    p.add_argument("--python", help="the interpreter to build the env with (default: found by uv)")
    p.add_argument("--backend", choices=("uv", "conda"), default="uv")
    p.add_argument("--channel", metavar="URL", help="with --backend conda: the channel the conda lock was made against")
    p.add_argument("--json", action="store_true")
    p.set_defaults(module="materialize")

    p = sub.add_parser("smoke", help="prove an env: import, kernel, launch tiers")
    _arch_args(p)
    _common(p)
    p.add_argument("--prefix")
    p.add_argument("--tier", action="append", choices=("import", "kernel", "launch-cpu", "launch-gpu"), help="run only these tiers (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(module="smoke")

    p = sub.add_parser("audit", help="CUDA arch coverage of the binaries the env's loaders will load")
    _arch_args(p)
    _common(p)
    p.add_argument("--prefix")
    p.add_argument("--json", action="store_true")
    p.set_defaults(module="audit")

    p = sub.add_parser("doctor", help="this host: GPUs, driver, CPU ISA, NUMA, RAM, disk; which --arch")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--record", metavar="DIR", help="save this host's raw facts (nvidia-smi, NVML, /proc, /sys) to DIR")
    p.add_argument("--host-facts", metavar="DIR", help="answer for a host recorded with --record instead of this one")
    p.set_defaults(module="doctor")

    p = sub.add_parser("launch", help="the per-arch, per-host server command")
    _arch_args(p)
    _common(p)
    p.add_argument("--prefix")
    p.add_argument("--model", required=True, metavar="PATH")
    p.add_argument("--kt-weight-path", metavar="PATH")
    p.add_argument("--no-speculative", action="store_true", help="leave out the MTP (EAGLE) flags")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("--host-facts", metavar="DIR",
                   help="print the command for a host recorded with `doctor --record DIR` (implies --dry-run)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra sglang flags")
    p.set_defaults(module="launch")

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
    p.set_defaults(module="serve.convert")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        module = importlib.import_module(f"ktenv.{args.module}")
        return int(module.run(args) or 0)
    except KtenvError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
