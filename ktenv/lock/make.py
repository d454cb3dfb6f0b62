"""Making and checking locks: spec -> rules -> resolve (uv) -> departures -> lock/<arch>/.

`lock_archs` locks several archs, resolving once for archs whose resolver
inputs agree; `check_archs` is the offline `lock --check`. Both return one
error per failing arch rather than stopping at the first.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import KtenvError
from ..spec import Spec
from ..spec import inputs as spec_inputs
from . import departures, model
from .index import Index
from .resolve import resolve


def lock_dir(lock_root: Path, spec: Spec, arch: str, stack: str | None) -> Path:
    """Where a lock lives: lock/<arch>/ for the default stack, lock/stack-<v>/<arch>/ for another."""
    return model.lock_dir(lock_root, arch, spec.stack.release(stack).version, spec.stack.default)


def lock_one(spec: Spec, arch: str, stack: str | None, target: Path, *, upgrade=False, offline=False,
             disabled=(), index: Index | None = None, log=print, shared: dict | None = None) -> dict:
    """Lock one arch into `target`. `shared` memoizes resolutions across archs whose inputs agree."""
    inputs = spec_inputs(spec, arch, stack, tuple(disabled))
    previous = previous_lockstep = None
    if (target / model.REQUIREMENTS).exists() and (target / model.METADATA).exists():
        previous = target / model.REQUIREMENTS
        previous_lockstep = model.read(target).lockstep
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
    model.write(target, inputs, res.entries, res.uv_version, res.lockstep, deps)
    seconds = time.monotonic() - start
    log(f"{arch}: {len(res.entries)} packages, {len(deps)} departures covered by {len(inputs.rules)} rules "
        f"-> {target}/ ({seconds:.1f} s){note}")
    return {"arch": arch, "dir": str(target), "packages": len(res.entries), "seconds": seconds}


def _offline_departures(target: Path, res) -> list[model.Departure]:
    try:
        old = model.read(target).departures
    except KtenvError:
        raise KtenvError("An offline lock needs an earlier lock of the same arch to take the departure list from "
                         "(each package's declared requirements come from the index). Rerun without --offline.") from None
    pins = {e.name: e.version for e in res.entries}
    return [d for d in old if d.locked == model.REMOVED or pins.get(d.package) == d.locked]


def lock_archs(spec: Spec, archs: list[str], stack: str | None, targets: dict[str, Path], *, upgrade=False,
               offline=False, disabled=(), log=print) -> list[KtenvError]:
    """Lock each arch into targets[arch]; archs whose resolver inputs agree share one resolution."""
    index = None if offline else Index(spec.stack.index_url)
    shared: dict = {}
    errors = []
    for a in archs:
        try:
            lock_one(spec, a, stack, targets[a], upgrade=upgrade, offline=offline, disabled=disabled, index=index,
                     log=log, shared=shared)
        except KtenvError as e:
            errors.append(e)
    return errors


def check_archs(spec: Spec, archs: list[str], stack: str | None, targets: dict[str, Path], *, disabled=(),
                extra_checks=(), log=print) -> list[KtenvError]:
    """Offline: each lock against the inputs envs/ gives now. extra_checks(arch, dir) may raise too."""
    stale = []
    for a in archs:
        d = targets[a]
        try:
            model.check(d, spec_inputs(spec, a, stack, tuple(disabled)))
            for extra in extra_checks:
                extra(a, d)
            log(f"{a}: up to date ({d}/)")
        except KtenvError as e:
            stale.append(e)
    return stale
