"""Load and validate envs/*.toml: the stack, the archs and the rules.

The same files are read by flake.nix with builtins.fromTOML, so this module
only accepts plain TOML data and rejects unknown keys (a typo in a key would
otherwise be silently ignored by one reader and not the other).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .errors import SpecError

RULE_KINDS = ("override", "lockstep", "constrain", "add", "remove", "replace")
ARCH_FILE = re.compile(r"^sm\d+$")


@dataclass(frozen=True)
class Release:
    version: str
    exclude_newer: str
    released: str = ""


@dataclass(frozen=True)
class Stack:
    default: str
    root: tuple[str, ...]
    python: tuple[str, ...]
    platform: str
    cuda: str
    torch_cuda: str
    index_url: str
    releases: dict[str, Release]
    launch: dict
    env: dict[str, str]
    name: str = ""

    def release(self, version: str | None) -> Release:
        version = version or self.default
        if version not in self.releases:
            known = ", ".join(sorted(self.releases, key=Version))
            raise SpecError(
                f"Unknown stack version {version!r}. envs/stack.toml knows {known}. "
                "To lock another release, add a [stack.versions.\"X\"] entry with its "
                "resolution cut-off (exclude_newer) and rerun."
            )
        return self.releases[version]

    def root_requirements(self, version: str) -> list[str]:
        return [r.replace("{version}", version) for r in self.root]


@dataclass(frozen=True)
class Arch:
    name: str
    title: str
    compute_capability: str
    supported: bool
    source: Path
    validated: bool = False
    min_cuda: str = ""
    reason: str = ""
    evidence: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    paths: dict = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    launch: dict = field(default_factory=dict)
    # The [flash_mla] table (sm90): the FlashMLA revision ktenv builds and why;
    # validated by ktenv.build.flash_mla.pin_for, which is its only reader.
    flash_mla: dict = field(default_factory=dict)

    @property
    def sm_number(self) -> int:
        return int(self.name[2:])


@dataclass(frozen=True)
class Rule:
    id: str
    kind: str
    reason: str
    evidence: tuple[str, ...]
    stack: SpecifierSet
    source: Path
    line: int
    package: str = ""
    packages: tuple[str, ...] = ()
    spec: SpecifierSet | None = None
    with_: str = ""
    archs: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.source.name}:{self.line}"

    def touches(self) -> tuple[str, ...]:
        """Canonical names of every package this rule changes."""
        names = list(self.packages) or [self.package]
        if self.with_:
            names.append(Requirement(self.with_).name)
        return tuple(canonicalize_name(n) for n in names if n)

    def applies(self, arch: str, stack_version: str) -> bool:
        if self.archs and arch not in self.archs:
            return False
        return self.stack.contains(Version(stack_version), prereleases=True)


@dataclass(frozen=True)
class Spec:
    root: Path
    stack: Stack
    archs: dict[str, Arch]
    rules: tuple[Rule, ...]

    def arch(self, name: str) -> Arch:
        """The arch, or a SpecError that tells the user what to do instead."""
        if name not in self.archs:
            known = ", ".join(self.supported_archs())
            raise SpecError(
                f"Unknown arch {name!r}. Supported archs are {known} "
                "(compute capability 8.9 -> sm89, 9.0 -> sm90, 10.0 -> sm100, 12.0 -> sm120). "
                "`python build.py doctor` tells which one this machine's GPU needs."
            )
        arch = self.archs[name]
        if not arch.supported:
            raise SpecError(
                f"{arch.name} ({arch.title}) is not supported. {arch.reason} "
                f"Evidence: {', '.join(arch.evidence)}.",
                exit_code=3,
            )
        return arch

    def supported_archs(self) -> list[str]:
        """Supported arch names in compute-capability order (sm89 before sm100)."""
        return [a.name for a in sorted(self.archs.values(), key=lambda a: a.sm_number) if a.supported]


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found. ktenv expects the stack description in envs/.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line N, column M)".
        raise SpecError(f"{path}: malformed TOML: {e}. Fix the file and rerun.") from None


def _check_keys(path: Path, table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(
            f"{path}: unknown key(s) {', '.join(unknown)} in {where}. "
            f"Allowed: {', '.join(sorted(allowed))}. (Unknown keys are refused so that "
            "a typo cannot be read differently by Python and Nix.)"
        )


def _need(path: Path, table: dict, key: str, kind: type, where: str):
    if key not in table:
        raise SpecError(f"{path}: {where} is missing the required key {key!r}.")
    value = table[key]
    if not isinstance(value, kind):
        raise SpecError(f"{path}: {where}.{key} must be a {kind.__name__}, got {value!r}.")
    return value


def _specifier(path: Path, text: str, where: str) -> SpecifierSet:
    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        raise SpecError(f"{path}: {where}: {text!r} is not a PEP 440 version specifier (e.g. \">=0.6.9,<0.7\").") from None


def _load_stack(path: Path) -> Stack:
    data = _read(path)
    _check_keys(path, data, {"stack", "launch", "env"}, "the top level")
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
    spec = Spec(root, stack, archs, rules)
    from .rules import check_contradictions  # late: rules imports this module

    check_contradictions(spec)
    return spec
