"""`build.py lock`: spec -> rules -> resolve -> departures -> lock/<arch>/."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import departures, lockfile, rules, spec as specmod
from .errors import KtenvError
from .index import Index
from .resolve import resolve


def lock_one(spec, arch: str, stack: str | None, lock_root: Path, *, out: Path | None = None, upgrade=False, offline=False,
             disabled=(), index: Index | None = None, log=print, shared: dict | None = None) -> dict:
    """Lock one arch. `shared` memoizes resolutions across archs whose inputs agree."""
    inputs = rules.inputs(spec, arch, stack, tuple(disabled))
    target = out or lockfile.lock_dir(lock_root, arch, inputs.stack_version, spec.stack.default)
    previous = previous_lockstep = None
    if (target / lockfile.REQUIREMENTS).exists() and (target / lockfile.METADATA).exists():
        previous = target / lockfile.REQUIREMENTS
        previous_lockstep = lockfile.read(target).lockstep
    if index is None and not offline:
        index = Index(inputs.index_url)
    start = time.monotonic()
    key = inputs.resolution_key()
    if shared is not None and key in shared:
        res, deps = shared[key]
        note = f" (same inputs as {res.arch_first})"
    else:
        res = resolve(spec, inputs, previous_lock=previous, previous_lockstep=previous_lockstep, upgrade=upgrade,
                      offline=offline, disabled=tuple(disabled), index=index)
        res.arch_first = arch
        if offline:
            # Departures need each package's declared metadata; offline we can only
            # reuse what an earlier lock of the same packages recorded.
            deps = _offline_departures(target, res)
        else:
            deps = departures.compute(spec, inputs, res.entries, index)
        if shared is not None:
            shared[key] = (res, deps)
        note = ""
    lockfile.write(target, inputs, res.entries, res.uv_version, res.lockstep, deps)
    seconds = time.monotonic() - start
    log(f"{arch}: {len(res.entries)} packages, {len(deps)} departures covered by {len(inputs.rules)} rules "
        f"-> {target}/ ({seconds:.1f} s){note}")
    return {"arch": arch, "dir": str(target), "packages": len(res.entries), "seconds": seconds}


def _offline_departures(target: Path, res) -> list:
    try:
        old = lockfile.read(target).departures
    except KtenvError:
        raise KtenvError("An offline lock needs an earlier lock of the same arch to take the departure list from (each package's declared requirements come from the index). Rerun without --offline.") from None
    pins = {e.name: e.version for e in res.entries}
    kept = []
    for d in old:
        if d["locked"] == departures.REMOVED or pins.get(d["package"]) == d["locked"]:
            kept.append(departures.Departure(**d))
    return kept


def run(args) -> int:
    spec = specmod.load(args.envs)
    archs = spec.supported_archs() if args.all else [args.arch]
    for a in archs:
        spec.arch(a)  # refuse unknown/unsupported archs before any work
    lock_root = Path(args.lock_dir)
    if args.out and len(archs) > 1:
        raise KtenvError("--out names one directory; use it with --arch, not --all.")
    if args.check:
        stale = []
        for a in archs:
            inputs = rules.inputs(spec, a, args.stack, tuple(args.no_rule))
            d = _target(args, spec, inputs, lock_root)
            try:
                lockfile.check(d, inputs)
                if (d / "conda-lock.yml").exists():
                    from . import conda

                    conda.check(spec, a, d, channel_url=args.channel)
                print(f"{a}: up to date ({d}/)")
            except KtenvError as e:
                stale.append(e)
        return _report(stale)
    index = None if args.offline else Index(spec.stack.index_url)
    out = Path(args.out) if args.out else None
    kw = dict(out=out, upgrade=args.upgrade, offline=args.offline, disabled=tuple(args.no_rule), index=index)
    # Archs whose resolver inputs agree share one resolution (they differ in
    # run-time settings only); distinct inputs are resolved in turn.
    shared: dict = {}
    errors = []
    for a in archs:
        try:
            lock_one(spec, a, args.stack, lock_root, shared=shared, **kw)
        except KtenvError as e:
            errors.append(e)
    if errors:
        return _report(errors)
    _conda(args, spec, archs, lock_root)
    return 0


def _report(errors: list[KtenvError]) -> int:
    """Every arch's error, not just the first; the exit code of the first."""
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return errors[0].exit_code if errors else 0


def _conda(args, spec, archs, lock_root: Path) -> None:
    """The conda layer (system packages: nvcc, compilers, hwloc) beside the PyPI lock."""
    if not args.conda:
        return
    from . import conda

    for a in archs:
        d = _target(args, spec, rules.inputs(spec, a, args.stack), lock_root)
        conda.lock(spec, a, out_dir=d, channel_url=args.channel, stack_version=args.stack)


def _target(args, spec, inputs, lock_root: Path) -> Path:
    return Path(args.out) if args.out else lockfile.lock_dir(lock_root, inputs.arch, inputs.stack_version, spec.stack.default)
