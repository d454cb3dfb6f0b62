"""`python build.py toolchain`: which CUDA toolkit an env's JIT kernels use, or provision one.

    build.py toolchain --arch sm90 [--prefix P] [--cuda-home P] [--provision | --source NAME [--from-dir D]]
                       [--print-env | --json]

Exit 0 when a usable toolkit is chosen, 1 when none is (the text says what to
install or to provision), 2 on bad input. `--print-env` prints `export` lines
(activate.shell_exports) for `eval "$(python build.py toolchain --arch sm90 --print-env)"`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import KtenvError
from ..target import STAMP, Target
from . import activate, cuda_fetch, toolchain
from .toolchain import Choice


def describe(choice: Choice) -> str:
    tk = choice.toolkit
    if not tk:
        return f"toolchain {choice.need.arch}: none usable. {choice.remedy}"
    lines = [f"toolchain {choice.need.arch}: CUDA {tk.version} at {tk.home} ({tk.origin})",
             f"  nvcc {tk.nvcc}; torch CUDA {choice.need.torch_cuda}; {choice.need.arch} needs >= {choice.need.min_nvcc}"]
    lines += [f"  {n}" for n in choice.notes]
    lines += [f"  not used: {r['home']} ({r['version'] or '?'}, {r['origin']}): {'; '.join(r['problems'])}"
              for r in choice.rejected]
    return "\n".join(lines)


def run(target: Target, args) -> int:
    spec, arch = target.spec, target.arch
    policy = spec.knowledge.toolchain
    prefix = target.prefix if target.prefix.exists() else None
    err = sys.stderr
    if args.source:
        named = {s.name: s for s in policy.sources}
        if args.source not in named:
            raise KtenvError(f"--source {args.source}: envs/toolchain.toml pins no such source; it has "
                             f"{', '.join(named)}.")
        cuda_fetch.provision(named[args.source], from_dir=Path(args.from_dir) if args.from_dir else None,
                             progress=lambda m: print(m, file=err))
    need = toolchain.need(policy, arch.name, spec.stack.cuda)
    choice = toolchain.select(policy, need, prefix=prefix, cuda_home=args.cuda_home, provision=args.provision,
                              from_dir=Path(args.from_dir) if args.from_dir else None,
                              progress=lambda m: print(m, file=err))
    if prefix and choice.toolkit and toolchain.record_in_stamp(prefix, toolchain.as_dict(choice)):
        print(f"toolchain: recorded in {prefix}/{STAMP} (launch and smoke use it)", file=err)
    if args.print_env:
        if choice.toolkit is None:
            raise KtenvError(choice.remedy)
        print(activate.shell_exports(activate.changes(prefix, choice)), end="")
    elif args.json:
        print(json.dumps(toolchain.as_dict(choice), indent=1))
    else:
        print(describe(choice))
    return 0 if choice.toolkit else 1
