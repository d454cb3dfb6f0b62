"""Patch installed distributions so that a built env agrees with itself.

Two sources of patches, applied in this order:

1. Derived from the lock. Every `[[departure]]` in lock/<arch>/lock.toml says
   "distribution X declares requirement R, the lock installs something else,
   because of rule Y". The matching `Requires-Dist:` line in X's METADATA is
   rewritten to what is installed (`name==locked`), or dropped where the rule
   removed the package. These edits are not written down anywhere else, so a
   rule and its metadata edit cannot drift apart.
2. Declared in patches/*.toml: what the lock cannot tell (source edits, files
   that two distributions legitimately share). Each entry carries a reason,
   evidence and the stack versions it applies to; see patches/README.md.

Files are never edited in place: uv hard-links installed files from its cache,
so an in-place write would change the cache and every other env built from
it. Each edit writes a new file and renames it over the old one, then updates
the distribution's RECORD so `pip uninstall` and RECORD checks stay truthful.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from ..errors import KtenvError
from ..lock.model import Departure
from .dists import Dist, update_record, write_replacing, installed, record_entries

# Bump when the way patches are applied changes, so stamped envs get rebuilt.
ENGINE = 2
PATCH_KINDS = ("source", "requires", "shared-file")
PATCH_KEYS = {
    "id", "kind", "distribution", "distributions", "version", "stack", "reason", "evidence",
    "file", "sha256", "edit", "path", "remove", "set",
}
LEDGER = "ktenv-patches.json"


class PatchError(KtenvError):
    """A patch does not apply, or the env is inconsistent after patching."""


# ---------------------------------------------------------------- data

@dataclass(frozen=True)
class Patch:
    id: str
    kind: str
    reason: str
    evidence: tuple[str, ...]
    stack: SpecifierSet
    source: str
    distribution: str = ""
    distributions: tuple[str, ...] = ()
    version: SpecifierSet = field(default_factory=SpecifierSet)
    file: str = ""
    sha256: str = ""
    edits: tuple[tuple[str, str], ...] = ()
    path: str = ""
    remove: tuple[str, ...] = ()
    set: tuple[tuple[str, str], ...] = ()

    def applies_to_stack(self, stack_version: str) -> bool:
        return self.stack.contains(Version(stack_version), prereleases=True)

    def as_data(self) -> dict:
        return {
            "id": self.id, "kind": self.kind, "distribution": self.distribution,
            "distributions": list(self.distributions), "version": str(self.version), "file": self.file,
            "sha256": self.sha256, "edits": [list(e) for e in self.edits], "path": self.path,
            "remove": list(self.remove), "set": [list(s) for s in self.set], "stack": str(self.stack),
        }


def _spec(src: str, where: str, text: str) -> SpecifierSet:
    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        raise PatchError(f"{src}: {where}: {text!r} is not a PEP 440 specifier (e.g. \">=0.7.2\").") from None


def load_patches(directory: Path | str = "patches") -> list[Patch]:
    """Every [[patch]] in directory/*.toml, validated; a malformed one is an error, never skipped."""
    directory = Path(directory)
    patches, seen = [], {}
    for path in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise PatchError(f"{path}: malformed TOML: {e}.") from None
        if set(data) - {"patch"}:
            raise PatchError(f"{path}: only [[patch]] tables are allowed, found {', '.join(sorted(set(data) - {'patch'}))}.")
        for n, p in enumerate(data.get("patch", [])):
            where = f"patch #{n + 1}"
            unknown = set(p) - PATCH_KEYS
            if unknown:
                raise PatchError(f"{path}: {where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(PATCH_KEYS))}.")
            pid = p.get("id")
            if not pid:
                raise PatchError(f"{path}: {where} has no id.")
            where = f"patch {pid!r}"
            if pid in seen:
                raise PatchError(f"{path}: {where} reuses an id already used in {seen[pid]}.")
            seen[pid] = path.name
            kind = p.get("kind")
            if kind not in PATCH_KINDS:
                raise PatchError(f"{path}: {where}: kind must be one of {', '.join(PATCH_KINDS)}, got {kind!r}.")
            reason = " ".join(str(p.get("reason", "")).split())
            evidence = tuple(p.get("evidence", ()))
            if not reason or not evidence:
                raise PatchError(f"{path}: {where} needs both a reason and evidence: a patch to someone else's package must say why and on what grounds.")
            if "stack" not in p:
                raise PatchError(f"{path}: {where} needs `stack`, the stack versions it applies to (e.g. \">=0.7.2\").")
            kw = dict(id=pid, kind=kind, reason=reason, evidence=evidence, stack=_spec(path.name, where, p["stack"]), source=path.name)
            if kind in ("source", "requires"):
                if not p.get("distribution"):
                    raise PatchError(f"{path}: {where}: a {kind} patch names the `distribution` it edits.")
                kw["distribution"] = canonicalize_name(p["distribution"])
                kw["version"] = _spec(path.name, where, p.get("version", ""))
            if kind == "source":
                edits = p.get("edit", [])
                if not p.get("file") or not re.fullmatch(r"[0-9a-f]{64}", p.get("sha256", "")) or not edits:
                    raise PatchError(f"{path}: {where}: a source patch needs `file`, the file's upstream `sha256` (64 hex digits) and at least one [[patch.edit]] with old/new.")
                for e in edits:
                    if set(e) != {"old", "new"} or not e["old"]:
                        raise PatchError(f"{path}: {where}: each [[patch.edit]] has exactly `old` (non-empty) and `new`.")
                kw.update(file=p["file"], sha256=p["sha256"], edits=tuple((e["old"], e["new"]) for e in edits))
            if kind == "requires":
                sets = p.get("set", {})
                for k, v in sets.items():
                    try:
                        Requirement(v)
                    except InvalidRequirement as e:
                        raise PatchError(f"{path}: {where}: set.{k} = {v!r} is not a requirement: {e}.") from None
                if not p.get("remove") and not sets:
                    raise PatchError(f"{path}: {where}: a requires patch needs `remove` and/or `set`.")
                kw.update(remove=tuple(canonicalize_name(r) for r in p.get("remove", ())), set=tuple(sorted((canonicalize_name(k), v) for k, v in sets.items())))
            if kind == "shared-file":
                dists = p.get("distributions", [])
                if not p.get("path") or len(dists) < 2:
                    raise PatchError(f"{path}: {where}: a shared-file entry needs `path` (relative to site-packages) and at least two `distributions`.")
                kw.update(path=p["path"], distributions=tuple(sorted(canonicalize_name(d) for d in dists)))
            patches.append(Patch(**kw))
    return patches


def patches_hash(departs: list[Departure], patches: list[Patch], stack_version: str) -> str:
    """What the stamp records: changes whenever the edits an env would get change."""
    blob = json.dumps(
        {
            "engine": ENGINE,
            "departures": [d.as_dict() for d in sorted(departs, key=lambda d: (d.owner, canonicalize_name(d.package), d.declared))],
            "patches": [p.as_data() for p in patches if p.applies_to_stack(stack_version)],
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- metadata edits

def _header_end(text: str) -> int:
    end = text.find("\n\n")
    return len(text) if end < 0 else end


def requires(dist: Dist) -> list[Requirement]:
    text = (dist.dist_info / "METADATA").read_text(encoding="utf-8")
    out = []
    for line in text[: _header_end(text)].split("\n"):
        if line.startswith("Requires-Dist:"):
            try:
                out.append(Requirement(line.split(":", 1)[1].strip()))
            except InvalidRequirement:
                pass
    return out


def _same_requirement(a: Requirement, b: Requirement) -> bool:
    # lock.toml shows a declared requirement without its marker, so markers
    # are not compared; a marker only appears when `b` was written with one.
    same = (canonicalize_name(a.name), a.specifier, set(a.extras)) == (canonicalize_name(b.name), b.specifier, set(b.extras))
    return same and (b.marker is None or str(a.marker or "") == str(b.marker))


def _rewrite_requires(dist: Dist, decide, label: str) -> list[dict]:
    """Rewrite `Requires-Dist:` lines of dist's METADATA; decide(req) -> None (keep), "" (drop) or new text."""
    meta = dist.dist_info / "METADATA"
    text = meta.read_text(encoding="utf-8")
    end = _header_end(text)
    lines = text[:end].split("\n")
    out, changes = [], []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            raw = line[len("Requires-Dist:"):].strip()
            try:
                req = Requirement(raw)
            except InvalidRequirement:
                out.append(line)
                continue
            new = decide(req)
            if new is not None:
                changes.append({"distribution": dist.name, "file": f"{dist.dist_info.name}/METADATA", "before": raw, "after": new or None, "by": label})
                if new:
                    out.append(f"Requires-Dist: {new}")
                continue
        out.append(line)
    if changes:
        data = ("\n".join(out) + text[end:]).encode("utf-8")
        write_replacing(meta, data)
        update_record(dist, {meta: data})
    return changes


def _locked_requirement(req: Requirement, version: str) -> str:
    # uv's override replaces the whole requirement, extras included; the
    # rewritten line states exactly that, keeping only the original marker.
    text = f"{req.name}=={version}"
    return f"{text}; {req.marker}" if req.marker else text


def apply_departure(site: Path, dists: dict[str, Dist], d: Departure) -> list[dict]:
    name, version = d.owner
    owner = dists.get(name)
    if owner is None:
        return []  # not installed for this Python (a marker excluded it): nothing to agree with
    if version and Version(owner.version) != Version(version):
        raise PatchError(
            f"lock.toml records a departure in {d.declared_by}, but the env has {owner.name} {owner.version}. "
            "The lock's metadata and its requirements.txt disagree; re-run `python build.py lock` for this arch."
        )
    target = canonicalize_name(d.package)
    try:
        declared = Requirement(d.declared) if d.declared else None
    except InvalidRequirement:
        declared = None
    exact = False
    if declared is not None:
        exact = any(_same_requirement(r, declared) for r in requires(owner))

    def decide(req: Requirement):
        if canonicalize_name(req.name) != target:
            return None
        if exact and not _same_requirement(req, declared):
            return None
        if not exact and req.marker is not None and "extra" in str(req.marker):
            return None  # an optional extra nobody installs: not part of the departure
        return "" if d.removes else _locked_requirement(req, d.locked)

    changes = _rewrite_requires(owner, decide, f"rule {d.rule}" if d.rule else "lock departure")
    if not changes:
        raise PatchError(
            f"The lock says {d.declared_by} declares {d.declared!r} (departed from by rule {d.rule}), "
            f"but the installed {owner.dist_info.name}/METADATA has no requirement on {d.package}. "
            "The lock and the wheel it pins disagree; re-run `python build.py lock` for this arch."
        )
    return changes


def apply_requires(dists: dict[str, Dist], p: Patch) -> list[dict]:
    dist = dists[p.distribution]
    sets = dict(p.set)

    def decide(req: Requirement):
        name = canonicalize_name(req.name)
        if name in p.remove:
            return ""
        if name in sets:
            return sets[name]
        return None

    changes = _rewrite_requires(dist, decide, f"patch {p.id}")
    if not changes:
        raise PatchError(f"patches/{p.source}: patch {p.id!r} found nothing to change in {dist.dist_info.name}/METADATA; it is stale: narrow its `version` or delete it.")
    return changes


def apply_source(dists: dict[str, Dist], p: Patch) -> list[dict]:
    dist = dists[p.distribution]
    target = dist.site / p.file
    if not target.is_file():
        raise PatchError(f"patches/{p.source}: patch {p.id!r}: {p.file} is not in {dist.name} {dist.version}. Narrow the patch's `version` or update it.")
    data = target.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != p.sha256:
        raise PatchError(
            f"patches/{p.source}: patch {p.id!r} was written for a {p.file} with sha256 {p.sha256[:12]}…, "
            f"but {dist.name} {dist.version} installs one with {digest[:12]}…. Upstream changed the file: "
            "review the patch against the new source and update `sha256` (or narrow `version`)."
        )
    text = data.decode("utf-8")
    for old, new in p.edits:
        count = text.count(old)
        if count != 1:
            raise PatchError(f"patches/{p.source}: patch {p.id!r}: an edit's `old` text occurs {count} times in {p.file}; it must occur exactly once.")
        text = text.replace(old, new)
    out = text.encode("utf-8")
    write_replacing(target, out)
    update_record(dist, {target: out})
    return [{"distribution": dist.name, "file": p.file, "before": "sha256:" + digest, "after": "sha256:" + hashlib.sha256(out).hexdigest(), "by": f"patch {p.id}"}]


# ---------------------------------------------------------------- file ownership

def shared_files(site: Path, dists: dict[str, Dist] | None = None) -> list[dict]:
    """Files listed in more than one RECORD whose recorded contents differ.

    Identical copies (e.g. the empty nvidia/__init__.py of the CUDA runtime
    wheels) are harmless whichever wins and are not reported.
    """
    dists = dists if dists is not None else installed(site)
    owners: dict[str, list[tuple[str, str]]] = {}
    for dist, path, digest in record_entries(dists.values()):
        if path.endswith(".pyc") or ".dist-info/" in path:
            continue
        owners.setdefault(path, []).append((dist.name, digest))
    out = []
    for path, who in sorted(owners.items()):
        if len(who) > 1 and len({h for _, h in who}) > 1:
            out.append({"path": path, "distributions": sorted(n for n, _ in who)})
    return out


# ---------------------------------------------------------------- entry point

def apply(site: Path, departures: list[Departure], patches: list[Patch], stack_version: str,
          only: set[str] | None = None) -> dict:
    """Apply the lock's departures and the applicable patches/ entries to site; return the ledger.

    only: the distributions to patch (a repair reinstalls a few, fresh from
    their wheels; the others keep the edits they already have).
    Raises PatchError when a patch does not apply or when two distributions
    install different files at the same path without a shared-file entry.
    """
    dists = installed(site)
    changes, skipped = [], []
    for d in sorted(departures, key=lambda d: (d.owner, canonicalize_name(d.package), d.declared)):
        if only is None or d.owner[0] in only:
            changes += apply_departure(site, dists, d)
    accepted = set()
    for p in patches:
        if not p.applies_to_stack(stack_version):
            continue
        if p.kind == "shared-file":
            accepted.add((os.path.normpath(p.path), p.distributions))
            continue
        if only is not None and p.distribution not in only:
            continue
        dist = dists.get(p.distribution)
        if dist is None:
            skipped.append({"id": p.id, "why": f"{p.distribution} is not installed"})
            continue
        if not p.version.contains(Version(dist.version), prereleases=True):
            skipped.append({"id": p.id, "why": f"{dist.name} {dist.version} is outside {p.version}"})
            continue
        changes += apply_source(dists, p) if p.kind == "source" else apply_requires(dists, p)

    shared = shared_files(site, dists)
    unexplained = [s for s in shared if (s["path"], tuple(s["distributions"])) not in accepted]
    if unexplained:
        lines = "; ".join(f"{s['path']} ({' and '.join(s['distributions'])})" for s in unexplained[:8])
        more = f" and {len(unexplained) - 8} more" if len(unexplained) > 8 else ""
        raise PatchError(
            f"{len(unexplained)} file(s) are installed by more than one distribution with different contents: "
            f"{lines}{more}. Whichever was installed last wins, so the env depends on install order. "
            "Usually a rule should remove one of the two distributions (envs/rules.toml); if sharing is harmless, "
            "add a `shared-file` entry with the reason to patches/."
        )
    _write_ledger(dists, changes)
    return {"changes": changes, "skipped": skipped, "shared_files": shared}


def _write_ledger(dists: dict[str, Dist], changes: list[dict]) -> None:
    """Leave a note in each patched dist-info saying what was changed and why."""
    by_dist: dict[str, list[dict]] = {}
    for c in changes:
        by_dist.setdefault(c["distribution"], []).append(c)
    for name, items in sorted(by_dist.items()):
        dist = dists[name]
        path = dist.dist_info / LEDGER
        data = (json.dumps(items, indent=1, sort_keys=True) + "\n").encode()
        write_replacing(path, data, 0o644)
        update_record(dist, {path: data})

