"""Load and validate envs/*.toml: the stack, the archs, the rules and the stack knowledge.

The same files are read by flake.nix with builtins.fromTOML, so this module
only accepts plain TOML data and rejects unknown keys (a typo in a key would
otherwise be silently ignored by one reader and not the other).
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ..errors import SpecError
from .knowledge import load_knowledge
from .model import RULE_KINDS, Arch, Release, Rule, Sizes, Spec, Stack
from .rules import check_contradictions
from .toml import check_keys as _check_keys
from .toml import need as _need
from .toml import read as _read
from .toml import specifier as _specifier

ARCH_FILE = re.compile(r"^sm\d+$")


def _load_stack(path: Path) -> Stack:
    data = _read(path)
    _check_keys(path, data, {"stack", "sizes", "launch", "env"}, "the top level")
    st = _need(path, data, "stack", dict, "the file")
    _check_keys(path, st, {"name", "default", "root", "python", "platform", "cuda", "torch_cuda", "index_url", "versions"}, "[stack]")
    releases = {}
    for version, rel in _need(path, st, "versions", dict, "[stack]").items():
        where = f"[stack.versions.{version!r}]"
        try:
            Version(version)
        except InvalidVersion:
            raise SpecError(f"{path}: {where}: {version!r} is not a version.") from None
        _check_keys(path, rel, {"exclude_newer", "released"}, where)
        cutoff = _need(path, rel, "exclude_newer", str, where)
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cutoff):
            raise SpecError(f"{path}: {where}.exclude_newer must be an RFC 3339 UTC time like 2026-11-20T00:00:00Z, got {cutoff!r}.")
        releases[version] = Release(version, cutoff, rel.get("released", ""))
    default = _need(path, st, "default", str, "[stack]")
    if default not in releases:
        raise SpecError(f"{path}: [stack].default = {default!r} has no [stack.versions.{default!r}] entry.")
    root = _need(path, st, "root", list, "[stack]")
    for r in root:
        try:
            Requirement(r.replace("{version}", default))
        except InvalidRequirement as e:
            raise SpecError(f"{path}: [stack].root entry {r!r} is not a requirement: {e}.") from None
    launch = data.get("launch", {})
    _check_keys(path, launch, {"module", "numactl", "args", "speculative"}, "[launch]")
    env = data.get("env", {})
    for k, v in env.items():
        if not isinstance(v, str):
            raise SpecError(f"{path}: [env].{k} must be a string, got {v!r}.")
    sizes = _need(path, data, "sizes", dict, "the file")
    _check_keys(path, sizes, {"env_bytes", "linked_env_bytes", "payload_scratch_bytes"}, "[sizes]")
    return Stack(
        default=default,
        root=tuple(root),
        python=tuple(_need(path, st, "python", list, "[stack]")),
        platform=_need(path, st, "platform", str, "[stack]"),
        cuda=_need(path, st, "cuda", str, "[stack]"),
        torch_cuda=_need(path, st, "torch_cuda", str, "[stack]"),
        index_url=st.get("index_url", "https://pypi.org/simple"),
        releases=releases,
        launch=launch,
        env=env,
        sizes=Sizes(**{k: _need(path, sizes, k, int, "[sizes]") for k in
                       ("env_bytes", "linked_env_bytes", "payload_scratch_bytes")}),
        name=st.get("name", ""),
    )


ARCH_KEYS = {"name", "title", "compute_capability", "supported", "validated", "min_cuda", "reason", "evidence", "notes", "paths", "packages"}


def _load_arch(path: Path) -> Arch:
    data = _read(path)
    _check_keys(path, data, {"arch", "env", "launch", "conda", "nix", "flash_mla"}, "the top level")
    a = _need(path, data, "arch", dict, "the file")
    _check_keys(path, a, ARCH_KEYS, "[arch]")
    name = _need(path, a, "name", str, "[arch]")
    if name != path.stem:
        raise SpecError(f"{path}: [arch].name is {name!r} but the file is named {path.name}; they must agree.")
    supported = _need(path, a, "supported", bool, "[arch]")
    if not supported and not a.get("reason"):
        raise SpecError(f"{path}: an unsupported arch needs a `reason`, which is what `--arch {name}` answers with.")
    pkgs = a.get("packages", {})
    _check_keys(path, pkgs, {"extra", "drop"}, "[arch.packages]")
    for req in pkgs.get("extra", []):
        try:
            Requirement(req)
        except InvalidRequirement as e:
            raise SpecError(f"{path}: [arch.packages].extra entry {req!r}: {e}.") from None
    if supported:
        for key in ("compute_capability", "min_cuda", "title"):
            _need(path, a, key, str, "[arch]")
    return Arch(
        name=name,
        title=a.get("title", name),
        compute_capability=_need(path, a, "compute_capability", str, "[arch]"),
        supported=supported,
        source=path,
        validated=a.get("validated", False),
        min_cuda=a.get("min_cuda", ""),
        reason=" ".join(a.get("reason", "").split()),
        evidence=tuple(a.get("evidence", ())),
        notes=tuple(a.get("notes", ())),
        paths=a.get("paths", {}),
        extra=tuple(pkgs.get("extra", ())),
        drop=tuple(canonicalize_name(p) for p in pkgs.get("drop", ())),
        env=data.get("env", {}),
        launch=data.get("launch", {}),
        flash_mla=data.get("flash_mla", {}),
    )


RULE_KEYS = {"id", "kind", "package", "packages", "spec", "with", "stack", "archs", "reason", "evidence"}


def _rule_lines(text: str) -> list[int]:
    return [i + 1 for i, line in enumerate(text.splitlines()) if line.strip() == "[[rule]]"]


def _load_rules(path: Path, arch_names: set[str]) -> tuple[Rule, ...]:
    data = _read(path)
    _check_keys(path, data, {"rule"}, "the top level")
    lines = _rule_lines(path.read_text())
    rules, seen = [], {}
    for n, r in enumerate(data.get("rule", [])):
        line = lines[n] if n < len(lines) else 0
        where = f"rule #{n + 1} (line {line})"
        _check_keys(path, r, RULE_KEYS, where)
        rid = _need(path, r, "id", str, where)
        where = f"rule {rid!r} (line {line})"
        if rid in seen:
            raise SpecError(f"{path}: {where} reuses the id of the rule at line {seen[rid]}; ids must be unique.")
        seen[rid] = line
        kind = _need(path, r, "kind", str, where)
        if kind not in RULE_KINDS:
            raise SpecError(f"{path}: {where}: kind {kind!r} is not one of {', '.join(RULE_KINDS)}.")
        reason = " ".join(str(r.get("reason", "")).split())
        if not reason:
            raise SpecError(
                f"{path}: {where} has no reason. Every departure from what upstream declares "
                "must say why (reason) and on what grounds (evidence); add both or delete the rule."
            )
        evidence = tuple(r.get("evidence", ()))
        if not evidence:
            raise SpecError(f"{path}: {where} has no evidence (an upstream issue or a measured fact).")
        stack = _specifier(path, _need(path, r, "stack", str, where), f"{where}.stack")
        archs = tuple(r.get("archs", ()))
        for a in archs:
            if a not in arch_names:
                raise SpecError(f"{path}: {where} names arch {a!r}, which has no envs/{a}.toml.")
        spec = None
        if kind in ("override", "lockstep", "constrain", "add"):
            spec = _specifier(path, _need(path, r, "spec", str, where), f"{where}.spec")
        if kind == "lockstep":
            packages = tuple(_need(path, r, "packages", list, where))
            if len(packages) < 2:
                raise SpecError(f"{path}: {where}: a lockstep rule needs at least two packages.")
            package = ""
        else:
            package = _need(path, r, "package", str, where)
            packages = ()
        with_ = ""
        if kind == "replace":
            with_ = _need(path, r, "with", str, where)
            try:
                Requirement(with_)
            except InvalidRequirement as e:
                raise SpecError(f"{path}: {where}.with: {e}.") from None
        rules.append(Rule(rid, kind, reason, evidence, stack, path, line, package, packages, spec, with_, archs))
    return tuple(rules)


def load(root: Path | str = "envs") -> Spec:
    root = Path(root)
    if not root.is_dir():
        raise SpecError(f"{root}: no such directory. Run ktenv from the repository root, or pass --envs.")
    stack = _load_stack(root / "stack.toml")
    archs = {}
    for path in sorted(root.glob("sm*.toml")):
        if ARCH_FILE.match(path.stem):
            archs[path.stem] = _load_arch(path)
    if not archs:
        raise SpecError(f"{root}: no arch files (sm89.toml, ...) found.")
    rules = _load_rules(root / "rules.toml", set(archs))
    spec = Spec(root, stack, archs, rules, load_knowledge(root))
    check_contradictions(spec)
    return spec
