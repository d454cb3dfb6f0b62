"""Apply the version-ranged rules to one (arch, stack version): the resolver's inputs.

The result, `Inputs`, is everything `resolve` hands to uv and everything the
lock's input hash covers, so `lock --check` can tell offline whether a lock is
stale. Lockstep groups stay symbolic here; their versions are picked against
the index in `resolve`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from ..errors import SpecError
from .model import Arch, Rule, Spec

# A marker no interpreter satisfies: uv drops an overridden requirement whose
# marker is false, which is how a package is taken out of a resolution.
NEVER = 'python_version < "0"'


@dataclass
class Inputs:
    arch: str
    stack_version: str
    python: list[str]
    platform: str
    exclude_newer: str
    index_url: str
    cuda: str
    torch_cuda: str
    requirements: list[str]
    overrides: list[str]
    constraints: list[str]
    lockstep: list[dict] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def resolution_key(self) -> str:
        """What the resolution depends on: archs with equal keys resolve identically."""
        data = {k: v for k, v in asdict(self).items() if k not in ("env", "arch")}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """sha256 over the canonical JSON of these inputs (the lock's input hash)."""
        # The env vars are the arch's run-time settings: they do not change what
        # resolves, so editing them must not make a lock stale.
        data = {k: v for k, v in asdict(self).items() if k != "env"}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def rules_in_effect(spec: Spec, arch: str, stack_version: str, disabled: tuple[str, ...] = ()) -> list[Rule]:
    unknown = set(disabled) - {r.id for r in spec.rules}
    if unknown:
        raise SpecError(f"--no-rule names unknown rule(s) {', '.join(sorted(unknown))}; `python build.py explain` lists them.")
    return [r for r in spec.rules if r.applies(arch, stack_version) and r.id not in disabled]


def inputs(spec: Spec, arch_name: str, stack_version: str | None = None, disabled: tuple[str, ...] = ()) -> Inputs:
    arch: Arch = spec.arch(arch_name)
    release = spec.stack.release(stack_version)
    version = release.version
    requirements = spec.stack.root_requirements(version) + list(arch.extra)
    overrides: list[str] = []
    constraints: list[str] = []
    lockstep: list[dict] = []
    applied = rules_in_effect(spec, arch.name, version, disabled)
    for r in applied:
        if r.kind == "override":
            overrides.append(f"{r.package}{r.spec}")
        elif r.kind == "constrain":
            constraints.append(f"{r.package}{r.spec}")
        elif r.kind == "add":
            requirements.append(f"{r.package}{r.spec}")
        elif r.kind == "remove":
            overrides.append(f"{r.package} ; {NEVER}")
        elif r.kind == "replace":
            overrides.append(f"{r.package} ; {NEVER}")
            requirements.append(r.with_)
            # Dependents that pin the replacement to something else must yield.
            overrides.append(r.with_)
        elif r.kind == "lockstep":
            lockstep.append({"rule": r.id, "packages": list(r.packages), "spec": str(r.spec)})
    for name in arch.drop:
        overrides.append(f"{name} ; {NEVER}")
    env = dict(spec.stack.env)
    env.update(arch.env)
    return Inputs(
        arch=arch.name,
        stack_version=version,
        python=list(spec.stack.python),
        platform=spec.stack.platform,
        exclude_newer=release.exclude_newer,
        index_url=spec.stack.index_url,
        cuda=spec.stack.cuda,
        torch_cuda=spec.stack.torch_cuda,
        requirements=requirements,
        overrides=overrides,
        constraints=constraints,
        lockstep=lockstep,
        rules=[r.id for r in applied],
        env=env,
    )


def launch_profile(spec: Spec, arch_name: str) -> dict:
    """The stack's launch profile with the arch's keys laid over it."""
    arch = spec.arch(arch_name)
    base = spec.stack.launch
    over = arch.launch
    merged = {k: v for k, v in base.items() if k not in ("args", "speculative")}
    merged.update({k: v for k, v in over.items() if k not in ("args", "speculative")})
    merged["args"] = {**base.get("args", {}), **over.get("args", {})}
    merged["speculative"] = {**base.get("speculative", {}), **over.get("speculative", {})}
    return merged


# --- contradictions --------------------------------------------------------

def _probe_versions(specs: list[SpecifierSet]) -> list[Version]:
    """Versions worth testing for a common solution: each bound and its neighbours.

    Two specifier sets intersect iff some version satisfies both; if one does,
    one of the bounds they mention (or a point just past one) does too.
    """
    probes: set[Version] = set()
    for s in specs:
        for sp in s:
            v = Version(sp.version.replace(".*", ""))
            rel = list(v.release) + [0] * (3 - len(v.release))
            probes.add(v)
            probes.add(Version(f"{v.base_version}.post9999"))
            probes.add(Version(".".join(map(str, rel[:2] + [rel[2] + 1]))))
            if rel[2] > 0:
                probes.add(Version(".".join(map(str, rel[:2] + [rel[2] - 1]))))
    probes.add(Version("0.0.1"))
    return sorted(probes)


def _intersects(specs: list[SpecifierSet]) -> bool:
    if not any(len(s) for s in specs):
        return True
    return any(all(s.contains(v, prereleases=True) for s in specs) for v in _probe_versions(specs))


def check_contradictions(spec: Spec) -> None:
    """Refuse rule sets that cannot all hold for some (arch, stack version)."""
    for version in spec.stack.releases:
        for arch in spec.supported_archs():
            applied = rules_in_effect(spec, arch, version)
            by_pkg: dict[str, list[tuple[Rule, SpecifierSet | None]]] = {}
            for r in applied:
                if r.kind == "replace":
                    by_pkg.setdefault(canonicalize_name(r.package), []).append((r, None))
                    req = Requirement(r.with_)
                    by_pkg.setdefault(canonicalize_name(req.name), []).append((r, req.specifier))
                elif r.kind == "remove":
                    by_pkg.setdefault(canonicalize_name(r.package), []).append((r, None))
                else:
                    for p in r.touches():
                        by_pkg.setdefault(p, []).append((r, r.spec))
            for pkg, entries in by_pkg.items():
                if len(entries) < 2:
                    continue
                removed = [r for r, s in entries if s is None]
                kept = [r for r, s in entries if s is not None]
                ids = ", ".join(f"{r.id!r} ({r.where})" for r, _ in entries)
                if removed and kept:
                    raise SpecError(
                        f"Rules {ids} contradict each other for {pkg} on {arch}, stack {version}: "
                        "one removes the package and another requires a version of it. "
                        "Narrow one rule's `stack` or `archs` so they never apply together."
                    )
                overrides = [r for r, _ in entries if r.kind in ("override", "lockstep", "replace")]
                if len(overrides) > 1:
                    raise SpecError(
                        f"Rules {ids} both override {pkg} on {arch}, stack {version}; uv would keep "
                        "only one of them. Merge them into one rule."
                    )
                specs = [s for _, s in entries if s is not None]
                if not _intersects(specs):
                    raise SpecError(
                        f"Rules {ids} contradict each other for {pkg} on {arch}, stack {version}: "
                        f"no version satisfies {' and '.join(str(s) for s in specs)}. "
                        "Fix one of the specs, or narrow one rule's `stack` or `archs`."
                    )
