"""Every place a lock departs from what the locked packages themselves declare.

A departure is one declared requirement (say sglang-kt's flashinfer_python==0.6.3)
that the lock does not satisfy. Each must be covered by a rule in envs/rules.toml;
one that is not means the resolver did something no one decided, and the lock is
refused. The list is stored in lock.toml so `explain` and the env builder's
metadata patches can use it offline.
"""

from __future__ import annotations

import functools

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from ..errors import ResolveError
from ..spec import Inputs, Spec
from .index import Index
from .model import REMOVED, Departure, Entry


def marker_env(python: str, platform: str) -> dict[str, str]:
    env = default_environment()
    machine = "x86_64" if "x86_64" in platform else "aarch64"
    env.update(
        python_version=python,
        python_full_version=f"{python}.0",
        platform_machine=machine,
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def _applies_to(entry: Entry, python: str) -> bool:
    return not entry.marker or f'"{python}"' in entry.marker


def compute(spec: Spec, inputs: Inputs, entries: list[Entry], index: Index) -> list[Departure]:
    pins = {e.name: e.version for e in entries}
    declared = index.requires_dist_many(pins)
    rules = [r for r in spec.rules if r.id in inputs.rules]
    removed_by = {}
    for r in rules:
        if r.kind in ("remove", "replace"):
            removed_by[canonicalize_name(r.package)] = r.id
    arch = spec.archs[inputs.arch]
    for d in arch.drop:
        removed_by[d] = f"{arch.name}.toml [arch.packages].drop"

    def rule_for(pkg: str) -> str:
        for r in rules:
            if pkg in r.touches():
                return r.id
        return ""

    found: dict[tuple, Departure] = {}
    for py in inputs.python:
        env = marker_env(py, inputs.platform)
        present = {e.name: e.version for e in entries if _applies_to(e, py)}
        # Extras in play: the root's, then whatever a requirement in play asks for.
        extras: dict[str, set[str]] = {}
        for root in inputs.requirements:
            req = Requirement(root)
            extras.setdefault(canonicalize_name(req.name), set()).update(req.extras)
        changed = True
        while changed:
            changed = False
            for name in present:
                for line in declared.get(name) or []:
                    req = _parse(line)
                    if req and req.extras and _active(req, env, extras.get(name, set())):
                        have = extras.setdefault(canonicalize_name(req.name), set())
                        if not req.extras <= have:
                            have.update(req.extras)
                            changed = True
        for name, version in sorted(present.items()):
            for line in declared.get(name) or []:
                req = _parse(line)
                if req is None or not _active(req, env, extras.get(name, set())):
                    continue
                dep = canonicalize_name(req.name)
                shown = str(req).split(";")[0].strip()
                if dep not in present:
                    if dep in removed_by:
                        d = Departure(dep, f"{name}=={version}", shown, REMOVED, removed_by[dep])
                    else:
                        d = Departure(dep, f"{name}=={version}", shown, REMOVED, "")
                elif not req.specifier.contains(Version(present[dep]), prereleases=True):
                    d = Departure(dep, f"{name}=={version}", shown, present[dep], rule_for(dep))
                else:
                    continue
                found[(d.package, d.declared_by, d.declared, d.locked)] = d
    result = sorted(found.values(), key=lambda d: (d.package, d.declared_by))
    stray = [d for d in result if not d.rule]
    if stray:
        listing = "\n".join(f"  {d.declared_by} declares {d.declared}, the lock has {d.package} {d.locked}" for d in stray)
        raise ResolveError(
            f"The resolution for {inputs.arch} departs from upstream where no rule says it may:\n{listing}\n"
            "Every departure must be a rule with a reason in envs/rules.toml; add one or fix the rule that caused this."
        )
    return result


@functools.lru_cache(maxsize=None)
def _parse(line: str) -> Requirement | None:
    # Parsing is the cost here (~9,000 lines per lock, each seen several times).
    try:
        return Requirement(line)
    except InvalidRequirement:
        return None


def _active(req: Requirement, env: dict, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    if req.marker.evaluate({**env, "extra": ""}):
        return True
    return any(req.marker.evaluate({**env, "extra": x}) for x in extras)
