"""`env --check`: every file of a built env against what it should hold.

Two references: each distribution's RECORD (path, sha256, size; written by
the wheel and kept true by ktenv's own edits, see dists.update_record) and
the sgl-kernel payload's manifest (build/payload.py). Two passes:

  stat     every listed file is lstat'ed, in parallel: a missing file or one
           of another size is damage at once. A file is also sent to the
           content pass when its mtime is newer than the env's stamp
           (something wrote to it after the build) or when it has one link
           left while the rest of its distribution still shares inodes with
           uv's cache (uv hard-links installed files; a file with its own
           inode was replaced, by an editor's save or a `mv`).
  content  the sha256 of the flagged files, or of every file with --deep.

A file whose content changed while it still has other links was written in
place, through the link: the cache copy it shares (uv's, or ktenv's payload
cache) and every other env linked to it hold the same damage. The report
says so; build/repair.py breaks the link and refetches the cache entry.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import json
import marshal
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from ..errors import KtenvError
from ..target import STAMP
from . import payload as payload_mod
from .dists import site_packages, write_replacing

PAYLOAD = "sgl-kernel payload"
WORKERS = os.cpu_count() or 2
EXAMPLES = 5


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# path,hash,size: the hash and size never hold a comma, so the last two commas split a row exactly.
_ROW = re.compile(r"^(.*),([^,\n]*),([^,\n]*)$", re.M)


def _rows(record: Path) -> list[tuple[str, str, str]]:
    """RECORD rows (path, hash, size), parsed in one pass of the regex engine (71,000 rows are read per check)."""
    with open(record, encoding="utf-8", newline="") as f:
        rows = _ROW.findall(f.read().replace("\r\n", "\n"))
    return [(next(csv.reader([p]))[0], h, n) if p.startswith('"') else (p, h, n) for p, h, n in rows]


def dist_name(dist_info: str) -> tuple[str, str]:
    """(canonical name, version) from a `<name>-<version>.dist-info` directory name."""
    stem = dist_info[: -len(".dist-info")] if dist_info.endswith(".dist-info") else dist_info
    name, _, version = stem.partition("-")
    return canonicalize_name(name), version


def expectations(site: Path) -> tuple[dict[str, list[tuple[str, str, str]]], dict[str, tuple[str, str]]]:
    """Every listed file: path (relative to site-packages) -> [(owner, "algo=digest" as RECORD writes it, size)].

    Also each owner's (version, dist-info directory). Most paths have one
    owner; a few (nvidia/__init__.py) are listed by several.
    """
    expect: dict[str, list[tuple[str, str, str]]] = {}
    versions = {}  # owner -> (version, dist-info directory name)
    norm = os.path.normpath
    for di in sorted(os.listdir(site)):
        if not di.endswith(".dist-info"):
            continue
        name, version = dist_name(di)
        versions[name] = (version, di)
        try:
            rows = _rows(site / di / "RECORD")
        except FileNotFoundError:
            continue  # check() reports a missing RECORD itself
        for path, digest, size in rows:
            if not digest:
                continue  # RECORD lists itself without a hash
            rel = norm(path) if ("/." in path or path.startswith(".") or "//" in path) else path
            expect.setdefault(rel, []).append((name, digest, size))
    manifest = payload_mod.read_manifest(site)
    if manifest is not None:
        versions[PAYLOAD] = (manifest.version, "")
        base = os.path.relpath(payload_mod.runtime_dir(site, manifest), site)
        sizes = _payload_sizes(manifest)
        for name, hexdigest in manifest.files.items():
            rel = norm(os.path.join(base, name))
            size = str(sizes[name]) if name in sizes else ""
            expect.setdefault(rel, []).append((PAYLOAD, "sha256=" + _b64(bytes.fromhex(hexdigest)), size))
    return expect, versions


def _payload_sizes(manifest) -> dict[str, int]:
    """Per-file sizes from ktenv's payload cache entry, when it is there (the manifest itself has only hashes)."""
    try:
        info = json.loads((payload_mod.cache_root() / manifest.archive_sha256 / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return info.get("sizes", {}) if info.get("files") == manifest.files else {}


# --- the index: what the env should hold, kept beside the stamp --------------------------------

INDEX = "ktenv-files.marshal"
INDEX_FORMAT = 2
MULTI = -1  # owner id of a path several distributions list (see Index.multi)


@dataclass
class Index:
    """Every expected file as parallel lists (the stat pass walks 71,000 of them), keyed to the stamp."""
    key: str
    owners: list[str]
    versions: list[tuple[str, str]]  # per owner: (version, dist-info directory)
    rels: list[str]
    owner: list[int]
    size: list[int]  # -1: not recorded
    digest: list[str]
    multi: dict[str, list[tuple[int, str, int]]]

    def expected(self, i: int) -> list[tuple[int, str, int]]:
        """(owner id, digest, size) of every owner that lists file i."""
        o = self.owner[i]
        return self.multi[self.rels[i]] if o == MULTI else [(o, self.digest[i], self.size[i])]


def _key(stamp_bytes: bytes) -> str:
    return f"{INDEX_FORMAT}:{hashlib.sha256(stamp_bytes).hexdigest()}"


def build_index(site: Path, key: str) -> Index:
    expect, versions = expectations(site)
    owners = sorted(versions)
    ids = {n: i for i, n in enumerate(owners)}
    idx = Index(key, owners, [versions[n] for n in owners], [], [], [], [], {})
    for rel, exp in expect.items():
        idx.rels.append(rel)
        if len(exp) == 1:
            idx.owner.append(ids[exp[0][0]])
            idx.size.append(int(exp[0][2]) if exp[0][2].isdigit() else -1)
            idx.digest.append(exp[0][1])
        else:
            idx.owner.append(MULTI)
            idx.size.append(-1)
            idx.digest.append("")
            idx.multi[rel] = [(ids[o], d, int(n) if n.isdigit() else -1) for o, d, n in exp]
    return idx


def write_index(prefix: Path) -> Index:
    """(Re)write the index of the env at prefix from its RECORDs and payload manifest, keyed to its stamp."""
    idx = build_index(site_packages(prefix), _key((Path(prefix) / STAMP).read_bytes()))
    fields = (idx.key, idx.owners, idx.versions, idx.rels, idx.owner, idx.size, idx.digest, idx.multi)
    with contextlib.suppress(OSError):  # a read-only env is checked all the same, from its RECORDs
        write_replacing(Path(prefix) / INDEX, marshal.dumps(fields), 0o644)
    return idx


def load_index(prefix: Path, stamp_bytes: bytes) -> Index:
    """The index written for this stamp, or a fresh one (after a build or repair by an older ktenv)."""
    try:
        fields = marshal.loads((Path(prefix) / INDEX).read_bytes())
        if fields[0] == _key(stamp_bytes):
            return Index(*fields)
    except (OSError, ValueError, EOFError, TypeError, IndexError):
        pass
    return write_index(prefix)


# --- the passes --------------------------------------------------------------------------------

def _stat_pass(site_fd: int, idx: Index, start: int, end: int, ref_ns: int, hash_all: bool, hash_owners: set[int]) -> dict:
    """lstat files [start, end) of the index: missing, resized, flagged for hashing, and owners seen hard-linked."""
    missing, resized, flagged, single = [], [], [], []
    linked = set()
    rels, size, owner = idx.rels, idx.size, idx.owner
    stat = os.stat
    for i in range(start, end):
        try:
            s = stat(rels[i], dir_fd=site_fd, follow_symlinks=False)  # relative to an open directory: shorter lookups
        except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a parent was replaced by a file
            missing.append(i)
            continue
        st = (s.st_size, s.st_nlink)
        o = owner[i]
        if o == MULTI:
            sizes = {e[2] for e in idx.multi[rels[i]]}
            if -1 not in sizes and s.st_size not in sizes:
                resized.append((i, st))
            else:
                flagged.append((i, st))  # a handful of files (nvidia/__init__.py): always hashed
            continue
        if size[i] != s.st_size and size[i] >= 0:
            resized.append((i, st))
        elif hash_all or s.st_mtime_ns >= ref_ns or o in hash_owners:  # >=: timestamps are coarse (a clock tick)
            flagged.append((i, st))
        elif s.st_nlink > 1:
            linked.add(o)
        else:
            single.append((i, st))
    return {"missing": missing, "resized": resized, "flagged": flagged, "single": single, "linked": linked}


def _digest(path: Path, algo: str) -> str | None:
    """The file's digest in RECORD's form (`sha256=<urlsafe base64>`), or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f"{algo}={_b64(hashlib.file_digest(f, algo).digest())}"
    except (OSError, ValueError):
        return None


def check(prefix: Path, deep: bool = False, workers: int = WORKERS, content_of: set[str] = frozenset()) -> dict:
    """Verify the env at prefix; a report dict (`ok`, `damaged`, timings). content_of: owners to hash in full."""
    t0 = time.monotonic()
    prefix = Path(prefix)
    try:
        ref_ns = os.stat(prefix / STAMP).st_mtime_ns
        stamp_bytes = (prefix / STAMP).read_bytes()
        stamp = json.loads(stamp_bytes)
    except (OSError, ValueError):
        raise KtenvError(f"{prefix} has no readable {STAMP}, so it is not an env ktenv built and there is nothing "
                         "to check it against. Build it with `python build.py env --arch ARCH --prefix ...`.") from None
    site = site_packages(prefix)
    idx = load_index(prefix, stamp_bytes)
    n = len(idx.rels)
    step = max(2048, -(-n // (workers * 4)))
    hash_owners = {i for i, o in enumerate(idx.owners) if o in content_of}
    site_fd = os.open(site, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda a: _stat_pass(site_fd, idx, a, min(a + step, n), ref_ns, deep, hash_owners), range(0, n, step)))
    finally:
        os.close(site_fd)
    t_stat = time.monotonic()

    problems: dict[int, list[dict]] = {}

    def note(i: int, problem: str, st: tuple | None = None, **extra) -> None:
        for o, *_ in idx.expected(i):
            item = {"path": idx.rels[i], "problem": problem, **({"links": st[1]} if st else {}), **extra}
            problems.setdefault(o, []).append(item)

    linked = set().union(*(p["linked"] for p in parts))
    flagged = [f for p in parts for f in p["flagged"]]
    for p in parts:
        for i in p["missing"]:
            note(i, "missing")
        for i, st in p["resized"]:
            note(i, f"size {st[0]}, expected {'/'.join(str(e[2]) for e in idx.expected(i))}", st)
        # A file with its own inode where the rest of its distribution is hard-linked from uv's cache was
        # replaced (an editor's save, a `mv`); uv writes its own files (dist-info, bin/ scripts) unlinked.
        flagged += [(i, st) for i, st in p["single"] if idx.owner[i] in linked
                    and not idx.rels[i].startswith("..") and ".dist-info/" not in idx.rels[i]]
    flagged.sort(key=lambda f: -f[1][0])  # biggest first: the pool finishes together

    def judge(item):
        i, st = item
        want = idx.expected(i)
        got = {algo: _digest(site / idx.rels[i], algo) for algo in {d.partition("=")[0] for _, d, _ in want}}
        return None if any(got[d.partition("=")[0]] == d for _, d, _ in want) else item

    with ThreadPoolExecutor(workers) as pool:
        bad = [b for b in pool.map(judge, flagged) if b]
    for i, st in bad:
        # Still linked elsewhere: written in place, through the link, so the linked copies changed too.
        note(i, "content differs (sha256)", st, **({"in_place": True} if st[1] > 1 else {}))
    t_content = time.monotonic()

    names = {o: idx.owners[o] for o in problems}
    versions = {idx.owners[o]: idx.versions[o] for o in problems}
    by_name = {names[o]: items for o, items in problems.items()}
    built = set(stamp.get("dists") or [])
    present = {d for d in os.listdir(site) if d.endswith(".dist-info")}
    for di in sorted(present):
        if not os.path.exists(site / di / "RECORD"):  # listed without a hash, so not in the index: looked for here
            name, version = dist_name(di)
            versions[name] = (version, di)
            by_name.setdefault(name, []).append({"path": f"{di}/RECORD", "problem": "missing"})
    for di in sorted(built - present):
        name, version = dist_name(di)
        versions[name] = (version, di)
        by_name.setdefault(name, []).append({"path": di, "problem": "the whole distribution is gone"})
    all_versions = dict(zip(idx.owners, idx.versions))
    damaged = []
    for name, items in sorted(by_name.items()):
        items.sort(key=lambda f: f["path"])
        version, di = versions.get(name) or all_versions.get(name) or ("?", "")
        damaged.append({"name": name, "version": version, "dist_info": di, "count": len(items),
                        "in_place": sum(1 for i in items if i.get("in_place")), "files": items})
    extra = sorted(present - built) if built else []
    return {
        "prefix": str(prefix), "site": str(site), "deep": deep, "ok": not damaged and not extra,
        "files": n, "distributions": sum(1 for o in idx.owners if o != PAYLOAD),
        "payload_files": sum(1 for o in idx.owner if o >= 0 and idx.owners[o] == PAYLOAD),
        "hashed": len(flagged), "hashed_bytes": sum(st[0] for _, st in flagged), "workers": workers,
        "damaged": damaged, "extra": extra,
        "seconds": {"stat": round(t_stat - t0, 3), "content": round(t_content - t_stat, 3), "total": round(time.monotonic() - t0, 3)},
    }


def render(r: dict, hint: str = "") -> str:
    """The human report; `hint` is the command that builds this env (the repair adds --repair to it)."""
    s = r["seconds"]
    gb = r["hashed_bytes"] / 1e9
    head = (f"env check {r['prefix']}: {r['files']} files of {r['distributions']} distributions"
            + (f" and the sgl-kernel payload ({r['payload_files']} files)" if r["payload_files"] else "")
            + f"; stat pass {s['stat']:.2f} s, content pass {r['hashed']} file(s), {gb:.2f} GB, {s['content']:.2f} s"
            + (" (--deep: every file)" if r["deep"] else ""))
    lines = [head]
    if r["extra"]:
        lines.append(f"  not built by ktenv (installed afterwards): {', '.join(r['extra'][:10])}; "
                     f"`{hint or 'python build.py env'}` rebuilds the env from its lock")
    if not r["damaged"]:
        lines.append("intact: every file matches its RECORD" + (" and the payload its manifest" if r["payload_files"] else "")
                     + ("" if r["deep"] else " (sizes, and content where the stat pass had doubts; --deep hashes everything)"))
        return "\n".join(lines)
    lines.append(f"DAMAGED: {len(r['damaged'])} distribution(s)")
    for d in r["damaged"]:
        if d["files"][0]["problem"].startswith("the whole"):
            lines.append(f"  {d['name']} {d['version']}: the whole distribution is gone ({d['dist_info']} was deleted)")
            continue
        lines.append(f"  {d['name']} {d['version']}: {d['count']} file(s)")
        for f in d["files"][:EXAMPLES]:
            extra = (f"; written in place through a hard link shared with {f['links'] - 1} other link(s) "
                     "(uv's cache, other envs): they hold the same damage") if f.get("in_place") else ""
            lines.append(f"    {f['path']}: {f['problem']}{extra}")
        if d["count"] > EXAMPLES:
            lines.append(f"    ... and {d['count'] - EXAMPLES} more (--json lists them all)")
    if hint:
        lines.append(f"repair: {hint} --repair (reinstalls only these, hash-checked from the lock)")
    return "\n".join(lines)
