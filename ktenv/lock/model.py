"""The lock model: lock/<arch>/'s hashed requirements file and the metadata beside it.

The bottom of the lock package: reading a lock imports neither the resolver
nor the index. `Entry`, `Departure` and `Lock` are what lock, explain, the
patches and the env builder all use.

requirements.txt is what uv installs; lock.toml says what it was made from
(the resolver inputs, whose hash `lock --check` recomputes offline), with which
uv and cut-off, and every departure from upstream. Both are written
byte-for-byte the same for the same inputs: no timestamps, sorted everything.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomlkit
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ..errors import KtenvError, LockStale
from ..spec import Inputs

REQUIREMENTS = "requirements.txt"
METADATA = "lock.toml"
# The `locked` value of a departure whose package a rule took out entirely.
REMOVED = "(removed)"


@dataclass
class Entry:
    """One pinned package of a lock: name==version [; marker], its hashes and who wants it."""
    name: str
    version: str
    hashes: list[str]
    via: list[str]
    marker: str = ""


@dataclass(frozen=True)
class Departure:
    """One declared requirement of a locked package that the lock does not satisfy, and the rule allowing it."""
    package: str
    declared_by: str
    declared: str
    locked: str
    rule: str

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def removes(self) -> bool:
        """True where a rule took the package out entirely (locked is "(removed)")."""
        try:
            Version(self.locked)
            return False
        except (InvalidVersion, TypeError):
            return True

    @property
    def owner(self) -> tuple[str, str]:
        """(canonical name, version or "") of the declaring distribution."""
        name, _, version = self.declared_by.partition("==")
        return canonicalize_name(name.strip()), version.strip()


ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*(.+?))?\s*\\?$")


def parse_requirements(text: str) -> list[Entry]:
    """Parse a hashed requirements file (uv's output or a lock's): the one parser ktenv uses."""
    entries: list[Entry] = []
    cur: Entry | None = None
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        m = ENTRY.match(line) if not raw.startswith((" ", "#")) else None
        if m:
            cur = Entry(canonicalize_name(m.group(1)), m.group(2), [], [], (m.group(3) or "").strip())
            entries.append(cur)
            in_via = False
        elif cur and line.startswith("--hash="):
            cur.hashes.append(line.split("=", 1)[1].rstrip(" \\"))
        elif cur and line.startswith("# via"):
            rest = line[len("# via"):].strip()
            in_via = not rest
            if rest:
                cur.via.extend(x.strip() for x in rest.split(","))
        elif cur and in_via and line.startswith("#   "):
            cur.via.append(line[1:].strip())
        elif not raw.startswith((" ", "#", "-")):
            raise KtenvError(f"{line!r} is not a pinned requirement (name==version); a lock must pin every "
                             "package. Regenerate it with `python build.py lock`.")
    return entries


def lock_dir(root: Path, arch: str, stack_version: str, default_stack: str) -> Path:
    if stack_version == default_stack:
        return Path(root) / arch
    return Path(root) / f"stack-{stack_version}" / arch


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def render_requirements(inputs: Inputs, entries: list[Entry]) -> str:
    head = [
        f"# ktenv lock for {inputs.arch}: stack {inputs.stack_version}, Python {' and '.join(inputs.python)}, {inputs.platform}",
        f"# root: {', '.join(inputs.requirements)}",
        f"# written by `python build.py lock --arch {inputs.arch}`; lock.toml beside it says from what.",
        "# Do not edit: `python build.py lock --check` notices.",
    ]
    body = []
    for e in entries:
        marker = f" ; {e.marker}" if e.marker else ""
        lines = [f"{e.name}=={e.version}{marker}" + (" \\" if e.hashes else "")]
        for i, h in enumerate(e.hashes):
            lines.append(f"    --hash={h}" + (" \\" if i < len(e.hashes) - 1 else ""))
        if e.via:
            lines.append(f"    # via {', '.join(e.via)}")
        body.append("\n".join(lines))
    return "\n".join(head) + "\n" + "\n".join(body) + "\n"


def _inputs_table(inputs: Inputs) -> dict:
    return {
        "requirements": inputs.requirements,
        "overrides": inputs.overrides,
        "constraints": inputs.constraints,
        "lockstep": [f"{' = '.join(g['packages'])} {g['spec']} ({g['rule']})" for g in inputs.lockstep],
    }


def render_metadata(inputs: Inputs, requirements_sha: str, uv_version: str, lockstep: dict[str, str], departures: list[Departure], count: int) -> str:
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"ktenv lock metadata for {inputs.arch}; see requirements.txt beside it."))
    doc["arch"] = inputs.arch
    doc["stack"] = inputs.stack_version
    doc["python"] = inputs.python
    doc["platform"] = inputs.platform
    doc["cuda"] = inputs.cuda
    doc["torch_cuda"] = inputs.torch_cuda
    doc["exclude_newer"] = inputs.exclude_newer
    doc["index_url"] = inputs.index_url
    doc["uv_version"] = uv_version
    doc["input_hash"] = inputs.digest()
    doc["requirements_sha256"] = requirements_sha
    doc["packages"] = count
    doc["rules"] = inputs.rules
    doc["lockstep"] = dict(sorted(lockstep.items()))
    doc["inputs"] = _inputs_table(inputs)
    aot = tomlkit.aot()
    for d in departures:
        aot.append(tomlkit.item(d.as_dict()))
    doc["departure"] = aot
    return tomlkit.dumps(doc)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a committed lock unreadable to others
    os.replace(tmp, path)


def write(directory: Path, inputs: Inputs, entries: list[Entry], uv_version: str, lockstep: dict[str, str], departures: list[Departure]) -> None:
    req_text = render_requirements(inputs, entries)
    req_sha = "sha256:" + hashlib.sha256(req_text.encode()).hexdigest()
    meta = render_metadata(inputs, req_sha, uv_version, lockstep, departures, len(entries))
    # requirements first: a lock.toml never vouches for a file that is not there.
    _atomic_write(directory / REQUIREMENTS, req_text)
    _atomic_write(directory / METADATA, meta)


@dataclass
class Lock:
    directory: Path
    arch: str
    stack: str
    python: list[str]
    platform: str
    cuda: str
    torch_cuda: str
    exclude_newer: str
    uv_version: str
    input_hash: str
    requirements_sha256: str
    rules: list[str]
    lockstep: dict[str, str]
    inputs: dict
    departures: list[Departure] = field(default_factory=list)

    @property
    def requirements(self) -> Path:
        return self.directory / REQUIREMENTS

    def entries(self) -> list[Entry]:
        return parse_requirements(self.requirements.read_text())

    def version_of(self, name: str) -> str | None:
        name = canonicalize_name(name)
        return next((e.version for e in self.entries() if e.name == name), None)

    def check_hash(self) -> None:
        """Refuse a requirements.txt edited after locking: ktenv installs only what a lock vouches for."""
        actual = sha256_file(self.requirements)
        if actual != self.requirements_sha256:
            raise KtenvError(
                f"{self.requirements} does not match the hash lock.toml records for it ({self.requirements_sha256[:19]}…, "
                f"the file has {actual[:19]}…): it was edited after locking. ktenv installs only what a lock vouches for; "
                f"regenerate it with `python build.py lock --arch {self.arch}` (or restore it with git)."
            )


def read(directory: Path) -> Lock:
    directory = Path(directory)
    meta = directory / METADATA
    if not meta.exists() or not (directory / REQUIREMENTS).exists():
        raise KtenvError(f"No lock in {directory}/ (expected {REQUIREMENTS} and {METADATA}). Run `python build.py lock --arch {directory.name}` first.")
    try:
        d = tomllib.loads(meta.read_text())
    except tomllib.TOMLDecodeError as e:
        raise KtenvError(f"{meta}: malformed TOML ({e}). Regenerate it with `python build.py lock`.") from None
    return Lock(
        directory=directory,
        arch=d["arch"],
        stack=d["stack"],
        python=d["python"],
        platform=d["platform"],
        cuda=d.get("cuda", ""),
        torch_cuda=d.get("torch_cuda", ""),
        exclude_newer=d["exclude_newer"],
        uv_version=d["uv_version"],
        input_hash=d["input_hash"],
        requirements_sha256=d["requirements_sha256"],
        rules=d.get("rules", []),
        lockstep=d.get("lockstep", {}),
        inputs=d.get("inputs", {}),
        departures=[Departure(**x) for x in d.get("departure", [])],
    )


def check(directory: Path, inputs: Inputs) -> None:
    """Offline: raise LockStale unless the lock was made from exactly these inputs and is untouched."""
    lock = read(directory)
    problems = []
    if lock.input_hash != inputs.digest():
        was, now = lock.inputs, _inputs_table(inputs)
        for key in now:
            before, after = set(was.get(key, [])), set(now[key])
            for x in sorted(after - before):
                problems.append(f"{key}: added {x}")
            for x in sorted(before - after):
                problems.append(f"{key}: removed {x}")
        for key, old, new in (("python", lock.python, inputs.python), ("platform", lock.platform, inputs.platform),
                              ("exclude_newer", lock.exclude_newer, inputs.exclude_newer), ("stack", lock.stack, inputs.stack_version)):
            if old != new:
                problems.append(f"{key}: {old} -> {new}")
        if not problems:
            problems.append("the resolver inputs changed (index URL, CUDA or torch variant)")
    actual = sha256_file(lock.requirements)
    if actual != lock.requirements_sha256:
        problems.append(f"{REQUIREMENTS} was edited by hand (its hash is not the one lock.toml records)")
    if problems:
        raise LockStale(
            f"The lock in {directory}/ is stale:\n  " + "\n  ".join(problems)
            + f"\nRun `python build.py lock --arch {inputs.arch}" + (f" --stack {inputs.stack_version}" if directory.parent.name.startswith("stack-") else "") + "` and commit the result."
        )
