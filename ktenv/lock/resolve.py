"""Run uv on one arch's inputs and turn its answer, or its refusal, into something a person can act on.

One lock serves every Python in the stack: the first Python is resolved, and
its pins are handed to uv as preferences for the next, so the versions agree
wherever they can; where they cannot (numpy dropping 3.11, say) the entry is
kept per Python with a `python_version` marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from ..errors import ResolveError
from ..spec import Inputs, Spec
from ..tools import cache_dir, check_uv_pin, uv_bin
from .index import Index
from .model import Entry, parse_requirements


def uv_version() -> str:
    """The pinned uv's version (another uv is refused: see tools.check_uv_pin)."""
    return check_uv_pin()


def uv_env() -> dict[str, str]:
    """The environment uv runs in: no UV_* setting from the caller may change a lock."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_") or k in ("UV_CACHE_DIR", "UV_NO_PROGRESS")}
    env["UV_NO_PROGRESS"] = "1"
    return env


@dataclass
class Resolution:
    entries: list[Entry]
    lockstep: dict[str, str]
    seconds: float
    uv_version: str
    per_python: dict[str, dict[str, str]] = field(default_factory=dict)
    arch_first: str = ""


# --- lockstep --------------------------------------------------------------

def _lockstep_cache(group: dict, inputs: Inputs) -> Path:
    key = json.dumps([inputs.index_url, group["packages"], group["spec"], inputs.exclude_newer], separators=(",", ":"))
    return cache_dir() / "lockstep" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def pick_lockstep(group: dict, inputs: Inputs, index: Index | None, previous: dict[str, str], refresh: bool = False) -> str:
    """The newest version every package of the group published before the cut-off.

    What was published before a past cut-off does not change (short of a
    yank), so the answer is cached per (index, packages, spec, cut-off);
    `--upgrade` asks the index again.
    """
    cached = _lockstep_cache(group, inputs)
    if not refresh and cached.exists():
        return json.loads(cached.read_text())["version"]
    version = _pick_lockstep(group, inputs, index, previous)
    if index is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": version, "packages": group["packages"], "spec": group["spec"]}))
        tmp.replace(cached)
    return version


def _pick_lockstep(group: dict, inputs: Inputs, index: Index | None, previous: dict[str, str]) -> str:
    spec = SpecifierSet(group["spec"])
    names = group["packages"]
    if index is None:
        prev = {previous.get(n) for n in names}
        if len(prev) == 1 and None not in prev and spec.contains(prev.pop(), prereleases=False):
            return previous[names[0]]
        raise ResolveError(
            f"Rule {group['rule']!r} must pick one version of {', '.join(names)} from the index, "
            "and --offline forbids asking it (there is no earlier lock with a version inside the rule). "
            "Rerun without --offline."
        )
    common = None
    for n in names:
        vs = {v for v in index.versions(n, inputs.exclude_newer) if not v.is_prerelease}
        common = vs if common is None else common & vs
    candidates = sorted(v for v in common or () if spec.contains(v))
    if not candidates:
        listing = "; ".join(
            f"{n}: {', '.join(str(v) for v in sorted(x for x in index.versions(n, inputs.exclude_newer) if spec.contains(x))[-6:]) or 'none'}"
            for n in names
        )
        raise ResolveError(
            f"Rule {group['rule']!r} needs {', '.join(names)} at one common version {spec}, published before "
            f"{inputs.exclude_newer}, and there is none ({listing}). Widen the rule's spec or move the stack's cut-off."
        )
    return str(candidates[-1])


# --- running uv ------------------------------------------------------------

def _compile(work: Path, python: str, inputs: Inputs, seed: Path | None, upgrade: bool, offline: bool) -> str:
    out = work / f"resolved-{python}.txt"
    if seed and seed.exists():
        shutil.copyfile(seed, out)
    cmd = [
        uv_bin(), "pip", "compile", "requirements.in",
        "--override", "overrides.txt", "--constraint", "constraints.txt",
        "--python-version", python, "--python-platform", inputs.platform,
        "--exclude-newer", inputs.exclude_newer, "--index-url", inputs.index_url,
        "--generate-hashes", "--no-header", "--annotation-style", "split",
        # uv looks for (and would download) a 3.12 interpreter when asked to
        # resolve for 3.12; resolution needs none, and the retries cost seconds.
        "--no-config", "--no-python-downloads", "--quiet", "-o", out.name,
    ]
    if upgrade:
        cmd.append("--upgrade")
    if offline:
        cmd.append("--offline")
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=uv_env())
    if p.returncode != 0:
        raise UvFailure(python, p.stderr)
    return out.read_text()


class UvFailure(Exception):
    def __init__(self, python: str, stderr: str):
        super().__init__(stderr)
        self.python = python
        self.stderr = stderr


def merge(per_python: dict[str, list[Entry]]) -> list[Entry]:
    """One list for all Pythons; entries that differ get a python_version marker."""
    pythons = list(per_python)
    table: dict[tuple[str, str], dict] = {}
    for py, entries in per_python.items():
        for e in entries:
            slot = table.setdefault((e.name, e.version), {"pys": [], "hashes": set(), "via": set()})
            slot["pys"].append(py)
            slot["hashes"].update(e.hashes)
            slot["via"].update(v for v in e.via if not v.startswith("-r "))
            if any(v.startswith("-r ") for v in e.via):
                slot["via"].add("(root)")
    merged = []
    for (name, version), slot in sorted(table.items(), key=lambda kv: (kv[0][0], Version(kv[0][1]))):
        marker = ""
        if len(slot["pys"]) != len(pythons):
            marker = " or ".join(f'python_version == "{p}"' for p in slot["pys"])
        merged.append(Entry(name, version, sorted(slot["hashes"]), sorted(slot["via"]), marker))
    return merged


# --- checks on the answer --------------------------------------------------

def check_answer(entries: list[Entry], inputs: Inputs) -> None:
    names = {e.name: e for e in entries}
    for o in inputs.overrides:
        req = Requirement(o)
        if req.marker and not req.marker.evaluate({"python_version": "3.11"}) and canonicalize_name(req.name) in names:
            raise ResolveError(f"{req.name} was removed by a rule but is still in the resolution; uv ignored the override. This is a ktenv bug: please report it.")
    # The torch wheels from PyPI bundle one CUDA runtime; a second CUDA major
    # (a cu13 toolkit pulled by some dependency) loads two runtimes and breaks JIT paths.
    major = inputs.cuda.split(".")[0]
    for e in entries:
        m = re.fullmatch(r"nvidia-.+-cu(\d+)", e.name)
        if m and m.group(1) != major:
            raise ResolveError(f"{e.name}=={e.version} (via {', '.join(e.via)}) is built for CUDA {m.group(1)}, but the stack is CUDA {inputs.cuda}. Add a rule that keeps it out.")
        if e.name in ("nvidia-cuda-runtime", "cuda-toolkit") and not e.version.startswith(major + "."):
            raise ResolveError(
                f"{e.name}=={e.version} (via {', '.join(e.via)}) brings a CUDA {e.version.split('.')[0]} runtime into a "
                f"CUDA {inputs.cuda} stack (torch {inputs.torch_cuda}). Narrow the rule that let its dependent in."
            )
    rt = names.get("nvidia-cuda-runtime-cu12")
    if rt and major == "12" and not rt.version.startswith(inputs.cuda + "."):
        raise ResolveError(f"torch brings CUDA runtime {rt.version}, but the stack says CUDA {inputs.cuda} ({inputs.torch_cuda}). Update envs/stack.toml.")


# --- explaining a refusal --------------------------------------------------

DEPENDS = re.compile(r"([A-Za-z0-9][\w.\-\[\]]*?)((?:[=<>!~]=?|===)[\w.*+!]+(?:,\s*[=<>!~]=?[\w.*+!]+)*)? depends on ([A-Za-z0-9][\w.\-\[\]]*?)((?:[=<>!~]=?)[\w.*+!]+(?:,\s*[=<>!~]=?[\w.*+!]+)*)?(?=[\s,.]|$)")
_PKG = r"([A-Za-z0-9][\w.\-\[\]]*?)((?:[=<>!~]=?)[\w.*+!]+(?:,\s*[=<>!~]=?[\w.*+!]+)*)?"
# The object list ends at a comma or full stop; "A depends on B and C depends
# on D" is two sentences joined by "and", not a list.
AND_DEPENDS = re.compile(_PKG + r" depends on " + _PKG + r" and " + _PKG + r"(?=,|\.\s|$)")
REQUIRE = re.compile(r"you require ([A-Za-z0-9][\w.\-\[\]]*?)((?:[=<>!~]=?)[\w.*+!]+(?:,\s*[=<>!~]=?[\w.*+!]+)*)?(?=[\s,.]|$)")


def explain_failure(stderr: str, spec: Spec, inputs: Inputs, disabled: tuple[str, ...], python: str) -> str:
    """A few lines: which packages collide, through which dependents, what would lift it."""
    text = " ".join(stderr.split())
    edges = [(canonicalize_name(re.sub(r"\[.*\]", "", a)), av or "", canonicalize_name(b), bv or "") for a, av, b, bv in DEPENDS.findall(text)]
    # uv also says "A depends on B and C": C is a second edge from A.
    for a, av, _b, _bv, c, cv in AND_DEPENDS.findall(text):
        edges.append((canonicalize_name(re.sub(r"\[.*\]", "", a)), av or "", canonicalize_name(c), cv or ""))
    if not edges:
        return (
            f"uv could not resolve the stack for {inputs.arch} (stack {inputs.stack_version}, Python {python}) "
            f"and its message names no dependency chain:\n  {stderr.strip()}"
        )
    needs: dict[str, list[str]] = {}
    for a, av, b, bv in edges:
        needs.setdefault(b, []).append(f"{a}{av} needs {b}{bv}")
    # A collision is a package two different dependents constrain.
    collide = [b for b, why in needs.items() if len({w.split(' needs ')[0] for w in why}) > 1]
    if not collide:
        collide = [edges[0][2]]
    who = {b: a + av for a, av, b, _ in edges}
    lines = [f"Cannot resolve the stack for {inputs.arch} (stack {inputs.stack_version}, Python {python}): the pins collide."]
    for b in collide:
        lines.append(f"  collision on {b}:")
        for w in dict.fromkeys(needs[b]):
            dependent = w.split(" needs ")[0]
            chain = [dependent]
            seen = set()
            while canonicalize_name(re.split(r"[=<>!~]", chain[-1])[0]) in who and len(chain) < 5:
                nxt = who[canonicalize_name(re.split(r"[=<>!~]", chain[-1])[0])]
                if nxt in seen:
                    break
                seen.add(nxt)
                chain.append(nxt)
            via = f"  (via {' <- '.join(chain[1:])})" if len(chain) > 1 else ""
            lines.append(f"    {w}{via}")
    involved = set(collide) | {a for a, _, b, _ in edges if b in collide}
    lifting = [r for r in spec.rules if set(r.touches()) & involved]
    active = set(inputs.rules)
    if lifting:
        for r in lifting:
            state = "disabled by --no-rule" if r.id in disabled else ("in effect" if r.id in active else f"not in effect for stack {inputs.stack_version}/{inputs.arch} (stack {r.stack})")
            lines.append(f"  rule {r.id!r} ({r.where}) touches this: {r.kind} {', '.join(r.touches())} -- {state}.")
        if any(r.id in disabled for r in lifting):
            lines.append("  Rerun without --no-rule to lift it.")
    else:
        lines.append(
            f"  No rule in envs/rules.toml touches {', '.join(sorted(collide))}. Add one (kind = \"override\", with a reason "
            "and evidence) that says which side yields."
        )
    return "\n".join(lines)


# --- the whole step --------------------------------------------------------

def resolve(
    spec: Spec,
    inputs: Inputs,
    *,
    previous_lock: Path | None = None,
    previous_lockstep: dict[str, str] | None = None,
    upgrade: bool = False,
    offline: bool = False,
    disabled: tuple[str, ...] = (),
    index: Index | None = None,
) -> Resolution:
    start = time.monotonic()
    uv_ver = uv_version()  # before any work: another uv than the pinned one is refused
    if not offline and index is None:
        index = Index(inputs.index_url)
    lockstep: dict[str, str] = {}
    for group in inputs.lockstep:
        version = pick_lockstep(group, inputs, None if offline else index, previous_lockstep or {}, refresh=upgrade)
        for n in group["packages"]:
            lockstep[n] = version
    with tempfile.TemporaryDirectory(prefix="ktenv-resolve-") as tmp:
        work = Path(tmp)
        (work / "requirements.in").write_text("".join(r + "\n" for r in inputs.requirements))
        (work / "overrides.txt").write_text("".join(o + "\n" for o in inputs.overrides + [f"{n}=={v}" for n, v in lockstep.items()]))
        (work / "constraints.txt").write_text("".join(c + "\n" for c in inputs.constraints))
        per_python: dict[str, list[Entry]] = {}
        seed = previous_lock if (previous_lock and not upgrade) else None
        for py in inputs.python:
            try:
                text = _compile(work, py, inputs, seed, upgrade and not per_python, offline)
            except UvFailure as f:
                # Offline, uv reports a package missing from its cache as "no version of X".
                if offline and any(k in f.stderr.lower() for k in ("offline", "network", "there is no version of")):
                    raise ResolveError(
                        f"Resolving {inputs.arch} (Python {py}) needs the package index, and --offline allows only "
                        "uv's cache, which lacks some of the metadata. Rerun without --offline (or warm the cache first)."
                    ) from None
                if "Failed to fetch" in f.stderr or "dns error" in f.stderr or "Could not connect" in f.stderr:
                    raise ResolveError(
                        f"uv could not reach the package index ({inputs.index_url}) while resolving {inputs.arch}. "
                        "Resolving needs the network; check the connection or the index URL in envs/stack.toml."
                    ) from None
                raise ResolveError(explain_failure(f.stderr, spec, inputs, disabled, f.python)) from None
            per_python[py] = parse_requirements(text)
            seed = work / f"resolved-{py}.txt"
    entries = merge(per_python)
    check_answer(entries, inputs)
    return Resolution(
        entries=entries,
        lockstep=lockstep,
        seconds=time.monotonic() - start,
        uv_version=uv_ver,
        per_python={py: {e.name: e.version for e in es} for py, es in per_python.items()},
    )
