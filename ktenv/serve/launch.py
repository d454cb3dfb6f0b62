"""`launch`: the sglang-kt server command for one arch on this host.

The flags come from envs/ (stack.toml [launch], laid over by the arch's
[launch]); the host fills in what only it knows: GPUs of the arch
(--tensor-parallel-size, and CUDA_VISIBLE_DEVICES on a mixed host), physical
cores and NUMA nodes (--kt-cpuinfer, --kt-threadpool-count, see
host.facts.kt_threads for the sizing). `--dry-run` prints a shell command; without
it the env's python is exec'd in place of this process.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..build import activate, flash_mla_env, toolchain
from ..build.ktkernel.variants import check_override
from ..errors import KtenvError
from ..host import gpu as gpumod
from ..host.cpu import cpu_info
from ..host.facts import ENV_KEYS, HostFacts, kt_threads, live_facts, numa_summary
from ..spec import Spec, launch_profile
from ..spec import inputs as spec_inputs
from ..target import Target
from . import amxint4
from . import model as modelmod
from . import sizing, tune

# Flags the host fills in; a profile that sets them is overridden (with a note).
HOST_FLAGS = ("model", "kt-weight-path", "kt-cpuinfer", "kt-threadpool-count", "tensor-parallel-size")
# sglang's aliases, so `-- --tp 2` replaces --tensor-parallel-size instead of
# passing both (argparse would keep whichever comes last, silently).
ALIASES = {"--tp": "--tensor-parallel-size", "--tp-size": "--tensor-parallel-size", "--model-path": "--model"}

# What sglang-kt 0.7.2's DeepseekV4 load_weights asserts, and what kt-kernel
# needs for the 2604B checkpoint's clamped SwiGLU.
DSV4_MODES = ("2601", "2604")
USER_WINS_PREFIX = "SGLANG_DSV4_"
DSV4_SUBMODES = {"2604": ("2604A", "2604B"), "2601": ("",)}


class LaunchError(KtenvError):
    """The launch command cannot be built or run as asked."""


def dsv4_env_problems(env: dict, server_args: list[str]) -> list[str]:
    """Sentences for each DeepSeek-V4 env-var rule the env + flags break ([] if none).

    Reused by smoke's launch tiers: the same check before any server starts.
    """
    problems = []
    mode = env.get("SGLANG_DSV4_MODE", "")
    sub = env.get("SGLANG_DSV4_2604_SUBMODE", "")
    if mode not in DSV4_MODES:
        problems.append(
            f"SGLANG_DSV4_MODE is {mode!r}; sglang-kt's DeepSeek-V4 model asserts it is 2601 or 2604 "
            "while loading weights, after minutes of start-up. Set SGLANG_DSV4_MODE=2604 for "
            "DeepSeek-V4-Flash (envs/stack.toml [env] does)."
        )
    elif sub not in DSV4_SUBMODES[mode]:
        allowed = " or ".join(repr(s) for s in DSV4_SUBMODES[mode])
        problems.append(
            f"SGLANG_DSV4_2604_SUBMODE is {sub!r} with SGLANG_DSV4_MODE={mode}; sglang-kt asserts it is "
            f"{allowed} for that mode. Use 2604B for the released DeepSeek-V4-Flash checkpoint"
            + (" with SGLANG_DSV4_MODE=2604." if mode == "2604" else ", or unset it for mode 2601.")
        )
    if sub == "2604B":
        method = flag_value(server_args, "--kt-method")
        # AMXINT4 is the exception: sglang-kt 0.7.2 zeroes the clamp for every
        # method but MXFP4/MXFP8 before kt-kernel sees it
        # (kt_ep_wrapper._kt_supports_swiglu_parameters), so 2604B + AMXINT4
        # loads; 2604A instead would change the released checkpoint's rope on
        # its uncompressed layers. launch notes the dropped CPU clamp.
        if (method or "").upper() not in ("MXFP4", "AMXINT4"):
            problems.append(
                f"SGLANG_DSV4_2604_SUBMODE=2604B needs --kt-method MXFP4, but the command has "
                f"--kt-method {method or '(unset: sglang defaults to AMXINT4)'}; kt-kernel would apply the "
                "2604B SwiGLU clamp to the wrong weights or raise while loading. Use --kt-method MXFP4, "
                "or unset SGLANG_DSV4_2604_SUBMODE for another method."
            )
    return problems


def check_dsv4_env(env: dict, server_args: list[str]) -> None:
    problems = dsv4_env_problems(env, server_args)
    if problems:
        raise LaunchError(" ".join(problems))


def flag_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(flag + "="):
            value = tok.split("=", 1)[1]
    return value


def profile_args(table: dict) -> list[list[str]]:
    """TOML [launch.args] -> [[--flag, values...], ...] in file order.

    true is a bare flag, false leaves the flag out, a list is one flag with
    several values (argparse nargs="+").
    """
    out = []
    for key, value in table.items():
        flag = f"--{key}"
        if value is True:
            out.append([flag])
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            out.append([flag] + [str(v) for v in value])
        else:
            out.append([flag, str(value)])
    return out


@dataclass
class LaunchCommand:
    env: dict[str, str]  # only what ktenv sets; the rest of os.environ is inherited
    numactl: list[str]  # [] or ["numactl", args...]
    python: str
    module: str
    args: list[list[str]]  # one group per flag, for printing one flag a line
    notes: list[str] = field(default_factory=list)

    @property
    def server_args(self) -> list[str]:
        return [t for group in self.args for t in group]

    @property
    def argv(self) -> list[str]:
        return self.numactl + [self.python, "-m", self.module] + self.server_args

    def shell(self) -> str:
        """A copy-pasteable POSIX shell command (env ... numactl ... python -m ...)."""
        lines = []
        if self.env:
            lines.append("env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items()))
        if self.numactl:
            lines.append(" ".join(shlex.quote(t) for t in self.numactl))
        lines.append(f"{shlex.quote(self.python)} -m {self.module}")
        lines += ["  " + " ".join(shlex.quote(t) for t in g) for g in self.args]
        return " \\\n".join(lines) + "\n"


def _strip_dashdash(extra: list[str] | None) -> list[str]:
    extra = list(extra or [])
    return extra[1:] if extra[:1] == ["--"] else extra


def _group_extra(extra: list[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    for tok in extra:
        if tok.startswith("--") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def build_command(
    spec: Spec,
    arch_name: str,
    facts: HostFacts,
    model: str,
    python: str,
    kt_weight_path: str | None = None,
    speculative: bool = True,
    extra: list[str] | None = None,
    numactl: str | None = "numactl",
    user_env: dict | None = None,
    require_gpu: bool = True,
    stack_version: str | None = None,
    model_facts: modelmod.ModelFacts | None = None,
    kt_manifest: dict | None = None,
) -> LaunchCommand:
    """The command for arch_name on the host described by facts (no I/O but facts').

    numactl: the numactl executable, or None when it is not installed.
    user_env: the caller's environment; a DeepSeek-V4 variable set there wins
    over envs/ (so a user can try SGLANG_DSV4_MODE=2601 without editing TOML).
    require_gpu: False for --dry-run, where a host without the arch's GPUs
    still gets a command (with --tensor-parallel-size 1).
    model_facts: the checkpoint's shape (serve.model.read); with it the memory
    flags are sized to the GPUs (serve.sizing), without it the profile's stand.
    kt_manifest: a `build.py convert` manifest found in --kt-weight-path
    (serve.amxint4.read_manifest): AMXINT4 with its threadpool count.
    """
    arch = spec.arch(arch_name)  # refuses unknown and unsupported archs with the reason
    profile = launch_profile(spec, arch.name)
    notes: list[str] = []
    user_env = dict(user_env or {})

    # GPUs: the visible ones of this arch. On a mixed host a server spanning
    # archs fails in FlashInfer/Triton JIT (kvcache-ai/ktransformers#2039).
    visible = gpumod.visible_gpus(facts.gpu.gpus, {**facts.env, **{k: v for k, v in user_env.items() if k in ENV_KEYS}})
    if visible.note:
        notes.append(visible.note)
    mine = [g for g in visible.gpus if (a := gpumod.arch_for_cc(spec, g.compute_capability)) and a.name == arch.name]
    others = [g for g in visible.gpus if g not in mine]
    env: dict[str, str] = {}
    if not mine:
        found = ", ".join(f"{g.index} {g.name} (cc {g.compute_capability or '?'})" for g in visible.gpus) or "none"
        msg = (f"No visible GPU of arch {arch.name} ({arch.title}, compute capability {arch.compute_capability}) "
               f"on this host; visible GPUs: {found}.")
        if require_gpu:
            raise LaunchError(msg + " `python build.py doctor` tells which --arch this host needs; "
                              "--dry-run prints the command anyway.")
        notes.append(msg + " Printing the command with --tensor-parallel-size 1.")
    elif others:
        if "CUDA_VISIBLE_DEVICES" in user_env or "CUDA_VISIBLE_DEVICES" in facts.env:
            raise LaunchError(
                f"CUDA_VISIBLE_DEVICES shows GPUs of other archs ({', '.join(f'{g.index} {g.name}' for g in others)}) "
                f"beside the {arch.name} ones; one server across archs fails with a JIT arch mismatch "
                f"(kvcache-ai/ktransformers#2039). Set CUDA_DEVICE_ORDER=PCI_BUS_ID "
                f"CUDA_VISIBLE_DEVICES={','.join(str(g.index) for g in mine)}."
            )
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g.index) for g in mine)
        notes.append(f"This host mixes GPU archs; the command shows only the {arch.name} GPUs "
                     f"({env['CUDA_VISIBLE_DEVICES']}) to the server (kvcache-ai/ktransformers#2039).")
    tp = max(1, len(mine))
    bad = spec.knowledge.model.bad_tp.get(tp)
    if bad is not None and bad.holds(stack_version or spec.stack.default):
        notes.append(f"--tensor-parallel-size {tp}: {bad.reason} ({', '.join(bad.evidence)}); if it does, "
                     "use 2 or 8 GPUs via CUDA_VISIBLE_DEVICES.")

    nodes = numa_summary(facts)
    cpuinfer, pools = kt_threads(nodes, tp)
    extra_groups = _group_extra(_strip_dashdash(extra))
    given = _given(extra_groups)
    if kt_manifest is not None:
        pools, cpuinfer = amxint4.threadpool_for_launch(kt_manifest, given, nodes, tp, notes)
    # A forced kt-kernel variant above this CPU loads and then dies with SIGILL.
    check_override(spec.knowledge.kt_kernel, cpu_info(facts.cpuinfo_text).flags, {**facts.env, **user_env})

    # Env: the stack's and the arch's [env]. A DeepSeek-V4 mode the user
    # exported wins (to try 2601 without editing TOML; it is validated below);
    # arch lists never do: a TORCH_CUDA_ARCH_LIST left over from another GPU
    # would JIT kernels for the wrong arch.
    spec_env = spec_inputs(spec, arch.name, stack_version).env
    for k, v in spec_env.items():
        if k in user_env and user_env[k] != v:
            if k.startswith(USER_WINS_PREFIX):
                notes.append(f"Keeping {k}={user_env[k]} from your environment (envs/ says {v}).")
                v = user_env[k]
            else:
                notes.append(f"Your environment has {k}={user_env[k]}; the command sets {v}, what {arch.name} needs.")
        env[k] = v

    host_args = {
        "model": [model],
        "kt-weight-path": [kt_weight_path or model],
        "kt-cpuinfer": [str(cpuinfer)],
        "kt-threadpool-count": [str(pools)],
        "tensor-parallel-size": [str(tp)],
    }
    table = dict(profile.get("args", {}))
    for k in HOST_FLAGS:
        if k in table:
            notes.append(f"envs/ sets --{k}; the host's value replaces it.")
            table.pop(k)
    if kt_manifest is not None:
        table.update(amxint4.launch_flags(kt_manifest, given, notes, spec.knowledge.serve))
    if model_facts is not None and mine:
        speculative = _size(spec, arch.name, model_facts, mine, table, given, speculative, notes)
    elif model_facts is not None:
        notes.append("The memory flags (--kt-num-gpu-experts, --mem-fraction-static, ...) are envs/'s, not sized: no "
                     f"{arch.name} GPU on this host to size for (`--host-facts DIR` answers for a host with one, "
                     "recorded with `doctor --record DIR`).")
    groups = [[f"--{k}"] + v for k, v in host_args.items()] + profile_args(table)
    if speculative:
        groups += profile_args(profile.get("speculative", {}))

    # Extra flags win over generated ones of the same name.
    groups = [g for g in groups if g[0] not in {f"--{k}" for k in given}] + extra_groups
    cpuinfer_final = flag_value([t for g in groups for t in g], "--kt-cpuinfer")
    if cpuinfer_final and cpuinfer_final.isdigit():
        sizing.check_threads(int(cpuinfer_final), nodes)

    cmd_numactl: list[str] = []
    wanted = [str(a) for a in profile.get("numactl", [])]
    if wanted:
        if numactl:
            cmd_numactl = [numactl] + wanted
        elif len(nodes) > 1:
            raise LaunchError(
                f"numactl is not installed, and this host has {len(nodes)} NUMA nodes: without "
                f"`numactl {' '.join(wanted)}` the weights land on one node and the other node's threads read "
                "them across the interconnect. Install it (apt-get install numactl) and rerun."
            )
        else:
            notes.append("numactl is not installed; on one NUMA node it changes nothing, so the command runs without it.")

    cmd = LaunchCommand(env=env, numactl=cmd_numactl, python=python, module=profile.get("module", "sglang.launch_server"),
                        args=groups, notes=notes)
    check_dsv4_env(env, cmd.server_args)
    return cmd


def _given(extra_groups: list[list[str]]) -> dict[str, list[str]]:
    """The user's flags after `--`: {name without dashes, aliases resolved: values}."""
    out = {}
    for g in extra_groups:
        if not g[0].startswith("--"):
            continue
        flag, _, inline = g[0].partition("=")
        flag = ALIASES.get(flag, flag)
        out[flag[2:]] = ([inline] if inline else []) + g[1:]
    return out


def _size(spec, arch: str, m, gpus, table: dict, given: dict, speculative: bool, notes: list[str]) -> bool:
    """Replace the profile's memory flags in `table` with ones sized to `gpus`; returns whether EAGLE stays."""
    asked = any(k.startswith("speculative-") for k in given)
    plan = sizing.plan(spec.knowledge.serve, m, arch, [g.memory_bytes for g in gpus], table, given,
                       speculative or asked, asked, method=str(table.get("kt-method", "MXFP4")))
    for k in sizing.SIZED:
        table[k] = plan.flags[k]
    notes.extend(plan.notes)
    notes.append(sizing.summary(plan, m))
    return speculative if asked else plan.workload.speculative


def command_for(target: Target, model: str, *, kt_weight_path: str | None = None, speculative: bool = True,
                extra: list[str] | None = None, dry_run: bool = False, facts: HostFacts | None = None) -> LaunchCommand:
    """The checked command for target on this host (or the recorded one in `facts`, e.g. --host-facts).

    Refuses a --model or --kt-weight-path that is not there and, unless
    dry_run, an env that is not built; a dry run on a host without the arch's
    GPUs still gets a command (with a note). The memory flags are sized from
    --model's config.json and the GPUs; an AMXINT4 conversion in
    --kt-weight-path (`build.py convert`) sets the method and threadpools."""
    spec, arch = target.spec, target.arch
    given, model = model, Path(model)
    if not model.is_dir():
        raise LaunchError(
            f"--model {given}: no such directory. Give the directory of the Hugging Face checkpoint, e.g. "
            "`huggingface-cli download deepseek-ai/DeepSeek-V4-Flash --local-dir /models/DeepSeek-V4-Flash` "
            "then --model /models/DeepSeek-V4-Flash."
        )
    if not (model / "config.json").is_file():
        raise LaunchError(
            f"--model {given} has no config.json, so sglang cannot tell which model it is. "
            "Point --model at the checkpoint's top directory (the one with config.json and the *.safetensors)."
        )
    if kt_weight_path and not Path(kt_weight_path).is_dir():
        raise LaunchError(
            f"--kt-weight-path {kt_weight_path}: no such directory. It holds the CPU experts' weights; "
            "for DeepSeek-V4-Flash's MXFP4 experts it is the model directory itself (the default)."
        )
    python = target.python
    if not dry_run:
        target.require_env()
        # sm90: sglang-kt imports flash_mla on every Hopper forward and has no fallback.
        refusal = flash_mla_env.launch_refusal(target)
        if refusal:
            raise LaunchError(refusal)
    recorded = facts is not None
    facts = facts or live_facts(str(model))
    try:
        model_facts, unsized = modelmod.read(model), ""
    except modelmod.ModelError as e:
        model_facts, unsized = None, str(e)
    manifest = amxint4.read_manifest(kt_weight_path) if kt_weight_path else None
    amxint4.check_method(_given(_group_extra(_strip_dashdash(extra))), manifest, kt_weight_path or str(model))
    act, tc = {}, {}
    if python.exists() and not recorded:
        # The server runs inside the env: its bin/ first on PATH (tvm-ffi runs `ninja` from PATH), a
        # conda prefix's activation, and the CUDA toolkit `env` recorded for the JIT kernels.
        tc = toolchain.for_env(spec.root, arch.name, target.prefix)
        act = activate.changes(target.prefix, tc, os.environ)
        act.pop("KT_KERNEL_CPU_VARIANT", None)  # decided below for the command's --kt-method (tune.launch_env)
    cmd = build_command(
        spec, arch.name, facts,
        model=str(model.absolute()), python=str(python),
        kt_weight_path=str(Path(kt_weight_path).absolute()) if kt_weight_path else None,
        speculative=speculative, extra=extra,
        numactl=shutil.which("numactl", path=act.get("PATH")), user_env=dict(os.environ), require_gpu=not dry_run,
        stack_version=target.stack, model_facts=model_facts, kt_manifest=manifest,
    )
    cmd.env.update(act)
    if act and not tc.get("cuda_home"):
        cmd.notes.append(f"No usable CUDA toolkit for this env: the first DeepSeek-V4 forward JIT-compiles kernels "
                         f"and will fail. {tc.get('remedy') or ''} (`python build.py toolchain --arch {arch.name}`)")
    if not recorded and facts.origin == "this host":  # a tuned variant is this CPU's, not another host's
        tuned, notes = tune.launch_env(target.prefix, cmd.server_args, dict(os.environ))
        cmd.env.update(tuned)
        cmd.notes += notes
    if unsized:
        cmd.notes.append(f"The memory flags are envs/'s, not sized to the GPUs: {unsized}")
    if facts.origin != "this host":
        how = "--host-facts" if recorded else "KTENV_HOST_RECORDING"
        cmd.notes.append(f"Host facts come from {facts.origin} ({how}), not this machine: the command is for that host.")
    if dry_run and not python.exists():
        cmd.notes.append(f"{python} does not exist yet: {target.build_hint()}.")
    elif dry_run and (refusal := flash_mla_env.launch_refusal(target)):
        cmd.notes.append(f"Running this command would be refused: {refusal}")
    return cmd


def execute(cmd: LaunchCommand) -> None:
    """Replace this process with the server (its output is the server's)."""
    sys.stderr.flush()
    sys.stdout.flush()
    os.execve(cmd.argv[0], cmd.argv, {**os.environ, **cmd.env})
