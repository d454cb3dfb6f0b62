"""`env --repair`: put back the damaged files of a built env without rebuilding it.

Under the build's file lock (one writer per prefix), from build/verify.py's report:

  unlink   every damaged file still there is unlinked first. Env files are hard
           links into uv's cache: a file changed in place changed the cache's
           copy too, and nothing here may ever write through such a link.
  cache    each damaged distribution's entries in uv's cache (archive-v0/*/
           holding its dist-info) are checked: the copies of the damaged files
           against the wheel's own RECORD. A corrupted entry is removed with
           `uv cache clean <name>`, so the reinstall fetches the wheel again.
           The same for ktenv's payload cache (re-extracted from the parts).
  install  only the damaged distributions, `uv pip install --reinstall
           --no-deps --require-hashes` with their lines from the env's lock.
  redo     what ktenv did to them at build time: the metadata and source
           patches (build/patches.py, for these distributions only) and the
           sgl-kernel payload links (build/payload.py).
  verify   the repaired distributions hashed in full, the rest stat-checked;
           `uv pip check`; the stamp records the repair.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import KtenvError
from ..progress import beat
from ..target import STAMP, Target
from ..tools import uv_bin
from . import patches as patches_mod, payload as payload_mod, verify
from .dists import site_packages, write_replacing
from .envdir import BuildLock
from .sync import run as _run

# Written by the installer, not shipped in the wheel: never compared with a cache entry.
INSTALLER_FILES = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json", "uv_cache.json"}
CLEAN_TIMEOUT = 600


class RepairError(KtenvError):
    """The env could not be repaired in place."""


def repair(target: Target, patches_dir: Path, deep: bool = False, wait: bool = True, progress=lambda m: None) -> dict:
    """Check the env (deep: hash every file) and repair what is damaged; a report dict.

    patches_dir: the patches/ the env was built with (pipeline.PATCHES_DIR).
    """
    with BuildLock(Path(target.prefix), wait, progress):
        progress(f"checking {target.prefix}" + (" (every file hashed)" if deep else ""))
        with beat(progress, "check"):
            report = verify.check(target.prefix, deep=deep)
        return repair_locked(target, report, progress, patches_dir)


def repair_locked(target: Target, report: dict, progress, patches_dir: Path) -> dict:
    """Repair from a check report; call only under BuildLock(target.prefix)."""
    t0 = time.monotonic()
    if not report["damaged"]:
        return {"status": "intact", "prefix": str(target.prefix), "check": report, "repaired": []}
    prefix = Path(target.prefix)
    stamp = json.loads((prefix / STAMP).read_text())
    lock = target.lock
    if stamp.get("requirements_sha256") != lock.requirements_sha256:
        raise RepairError(
            f"{prefix} was built from another lock than {lock.directory} (its stamp records requirements "
            f"{str(stamp.get('requirements_sha256'))[:19]}…), so its damaged distributions cannot be reinstalled from "
            f"this one. Rebuild it instead: {target.build_hint()}.")
    site = site_packages(prefix)
    damaged = {d["name"]: d for d in report["damaged"]}
    names = sorted(n for n in damaged if n != verify.PAYLOAD)
    entries = {e.name: e for e in lock.entries()}
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise RepairError(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} damaged but not in {lock.requirements}: "
                          f"installed after the build, not by ktenv. Rebuild the env from its lock: {target.build_hint()}.")
    if "kt-kernel" in names and (stamp.get("kt_kernel") or {}).get("source_build"):
        raise RepairError("kt-kernel is damaged, and this env's kt-kernel was built from source (--kt-source); a repair "
                          "would put PyPI's wheel in its place. Rebuild with the same --kt-source and --target-isa: "
                          f"{target.build_hint()} --kt-source PATH.")
    uv = uv_bin()
    progress(f"repair: {len(damaged)} damaged: " + ", ".join(f"{n} ({d['count']} file(s))" for n, d in sorted(damaged.items())))
    broken = _break_links(site, damaged)
    cache_report = _check_uv_cache(uv, site, [damaged[n] for n in names], broken, progress)
    payload_cache = _check_payload_cache(site, damaged.get(verify.PAYLOAD), broken, progress)
    if names:
        for n in names:
            di = damaged[n]["dist_info"]
            if di and (site / di).is_dir() and not (site / di / "RECORD").exists():
                shutil.rmtree(site / di)  # uv cannot uninstall without a RECORD; the reinstall writes a new one
        with beat(progress, "repair: reinstalling"):
            _reinstall(uv, prefix / "bin" / "python", [entries[n] for n in names], prefix)
        progress(f"repair: reinstalled {', '.join(f'{n}=={entries[n].version}' for n in names)} (hash-checked)")
    patch_report = patches_mod.apply(site, lock.departures, patches_mod.load_patches(patches_dir),
                                     lock.stack, only=set(names)) if names else {"changes": []}
    payload_report = None
    manifest = payload_mod.read_manifest(site)
    if manifest is not None and (verify.PAYLOAD in damaged or _touches_payload(site, manifest, set(names))):
        with beat(progress, "repair: payload"):
            payload_report = payload_mod.materialize(site, progress=progress)
            payload_mod.verify_in_env(prefix / "bin" / "python", site)
        progress(f"repair: payload {payload_report['version']} placed again ({'from cache' if payload_report['cache_hit'] else 'extracted'})")
    check = _run([uv, "pip", "check", "--python", str(prefix / "bin" / "python")])
    if check.returncode != 0:
        raise RepairError(f"After the repair `uv pip check` is not clean:\n{(check.stdout + check.stderr).strip()[-1500:]}\n"
                          f"Rebuild the env: {target.build_hint()}.")
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "distributions": sorted(damaged),
             "files": sum(d["count"] for d in damaged.values()),
             "uv_cache_refetched": [c["distribution"] for c in cache_report if c["corrupted"]],
             "payload_cache_reextracted": bool(payload_cache and payload_cache["corrupted"])}
    stamp["repairs"] = (stamp.get("repairs") or [])[-9:] + [entry]
    write_replacing(prefix / STAMP, (json.dumps(stamp, indent=1, sort_keys=True) + "\n").encode())
    # The reinstalled distributions have new RECORDs (uv's, then the patches'): index them, then
    # verify against the index, hashing every file of what was repaired.
    verify.write_index(prefix)
    after = verify.check(prefix, content_of=set(damaged))
    still = after["damaged"]  # what was repaired, or anything the reinstall disturbed (a file two wheels share)
    if still:
        raise RepairError("The repair did not restore " + "; ".join(f"{d['name']} ({d['files'][0]['path']}: {d['files'][0]['problem']})" for d in still)
                          + f". Rebuild the env: {target.build_hint()}.")
    return {"status": "repaired", "prefix": str(prefix), "arch": stamp.get("arch"), "repaired": sorted(damaged),
            "unlinked": broken, "uv_cache": cache_report, "payload_cache": payload_cache,
            "patches": patch_report["changes"], "payload": payload_report is not None, "check": report, "after": after,
            "seconds": round(time.monotonic() - t0, 2)}


def _break_links(site: Path, damaged: dict[str, dict]) -> list[dict]:
    """Unlink each damaged file that is still there, noting its inode (it may be the cache's too)."""
    out = []
    for d in damaged.values():
        for f in d["files"]:
            if f["problem"] == "missing" or f["problem"].startswith("the whole"):
                continue
            path = site / f["path"]
            try:
                st = os.lstat(path)
                path.unlink()
            except FileNotFoundError:
                continue
            out.append({"owner": d["name"], "path": f["path"], "links": st.st_nlink, "inode": [st.st_dev, st.st_ino]})
    return out


def uv_cache_dir(uv: str) -> Path | None:
    proc = _run([uv, "cache", "dir"])
    return Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def _check_uv_cache(uv: str, site: Path, damaged: list[dict], broken: list[dict], progress) -> list[dict]:
    """For each damaged distribution: are the uv cache's copies of its damaged files still the wheel's?"""
    root = uv_cache_dir(uv)
    out = []
    if root is None:
        return out
    inodes = {(b["owner"], b["path"]): tuple(b["inode"]) for b in broken}
    for d in damaged:
        if not d["dist_info"]:
            continue
        archives = sorted(p.parent for p in (root / "archive-v0").glob(f"*/{d['dist_info']}") if p.is_dir())
        bad, shared = [], []
        for archive in archives:
            record = {os.path.normpath(p): h for p, h, _ in verify._rows(archive / d["dist_info"] / "RECORD")} \
                if (archive / d["dist_info"] / "RECORD").is_file() else {}
            for f in d["files"]:
                rel = f["path"]
                if rel.startswith("..") or rel not in record or Path(rel).name in INSTALLER_FILES:
                    continue
                copy = archive / rel
                try:
                    st = os.lstat(copy)
                except FileNotFoundError:
                    bad.append(str(copy))
                    continue
                if inodes.get((d["name"], rel)) == (st.st_dev, st.st_ino):
                    shared.append(str(copy))
                want = record[rel]
                if verify._digest(copy, want.partition("=")[0]) != want:
                    bad.append(str(copy))
        item = {"distribution": d["name"], "archives": [str(a) for a in archives], "corrupted": bool(bad),
                "corrupted_files": bad[:verify.EXAMPLES], "shared_inode_with_env": shared[:verify.EXAMPLES]}
        if bad:
            progress(f"repair: uv's cache entry for {d['name']} is corrupted ({bad[0]} no longer matches the wheel's "
                     f"RECORD{'; it was the same file as the env' + chr(39) + 's, written in place' if shared else ''}); "
                     f"removing it with `uv cache clean {d['name']}` so the wheel is fetched again")
            # uv waits here while any other uv process holds the cache (its .lock); --force could pull
            # files from under a running install, so ktenv waits too, up to a limit.
            with beat(progress, f"uv cache clean {d['name']} (waits for other uv processes using the cache)"):
                try:
                    proc = _run([uv, "cache", "clean", d["name"]], timeout=CLEAN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    raise RepairError(f"`uv cache clean {d['name']}` waited {CLEAN_TIMEOUT} s for other uv processes to "
                                      f"release uv's cache ({root}), so the corrupted entry {archives[0]} is still there. "
                                      "Rerun the repair when they are done (the env's damaged file is already unlinked).") from None
            if proc.returncode != 0:
                raise RepairError(f"`uv cache clean {d['name']}` failed: {(proc.stderr or proc.stdout).strip()[-600:]}. "
                                  f"The cache entry {archives[0]} is corrupted and would be linked into the env again; "
                                  "remove it by hand and rerun.")
        out.append(item)
    return out


def _check_payload_cache(site: Path, damaged: dict | None, broken: list[dict], progress) -> dict | None:
    """ktenv's payload cache entry: re-extracted when a damaged payload file's cache copy is corrupted."""
    manifest = payload_mod.read_manifest(site)
    if damaged is None or manifest is None:
        return None
    entry = payload_mod.cache_root() / manifest.archive_sha256
    base = payload_mod.runtime_dir(site, manifest)
    bad = []
    for f in damaged["files"]:
        name = os.path.relpath(site / f["path"], base)
        copy = entry / name
        if name in manifest.files and copy.exists() and verify._digest(copy, "sha256") != "sha256=" + verify._b64(bytes.fromhex(manifest.files[name])):
            bad.append(str(copy))
    if bad:
        progress(f"repair: ktenv's payload cache entry is corrupted ({bad[0]}); removing it so the payload is extracted again")
        shutil.rmtree(entry)
    return {"entry": str(entry), "corrupted": bool(bad), "corrupted_files": bad}


def _touches_payload(site: Path, manifest, names: set[str]) -> bool:
    """Whether a reinstalled distribution carries a payload part or the manifest (their files were replaced)."""
    try:
        return any(p["distribution"] in names for p in payload_mod.carriers(site, manifest))
    except payload_mod.PayloadError:
        return True  # a part is missing: materialize says which


def _reinstall(uv: str, python: Path, entries, prefix: Path) -> None:
    lines = [f"{e.name}=={e.version}" + (f" ; {e.marker}" if e.marker else "") + "".join(f" --hash={h}" for h in e.hashes)
             for e in entries]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix=f".{prefix.name}.ktenv-repair-", dir=prefix.parent) as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        proc = _run([uv, "pip", "install", "--python", str(python), "--no-deps", "--require-hashes", "--reinstall", "-r", f.name])
    if proc.returncode != 0:
        text = (proc.stderr or proc.stdout).strip()[-1500:]
        hint = (" An artifact does not match the lock's sha256: do not work around this; the index served another file."
                if "Hash mismatch" in text else "")
        raise RepairError(f"Reinstalling {', '.join(e.name for e in entries)} failed:\n{text}\n{hint}".rstrip())


def render(r: dict) -> str:
    if r["status"] == "intact":
        return verify.render(r["check"]) + "\nnothing to repair."
    lines = [f"env {r.get('arch') or ''}: repaired {r['prefix']} in {r['seconds']:.1f} s: {', '.join(r['repaired'])}"]
    for b in r["unlinked"][:verify.EXAMPLES]:
        lines.append(f"  unlinked {b['path']} first ({b['links']} link(s): " + ("shared with uv's cache or other envs, never written through)"
                                                                               if b["links"] > 1 else "its own inode)"))
    for c in r["uv_cache"]:
        if c["corrupted"]:
            lines.append(f"  uv cache entry for {c['distribution']} was corrupted ({c['corrupted_files'][0]}"
                         + (", the same inode as the env's damaged file: it was written in place" if c["shared_inode_with_env"] else "")
                         + "); cleaned with `uv cache clean` and fetched again")
    if any(c["corrupted"] for c in r["uv_cache"]):
        lines.append("  other envs linked to the corrupted cache file before now hold the same damage: "
                     "`build.py env --arch ARCH --check` on each finds it")
    checked = [c["distribution"] for c in r["uv_cache"] if not c["corrupted"] and c["archives"]]
    if checked:
        lines.append(f"  uv cache copies of the damaged files checked, intact: {', '.join(checked)}")
    if r["payload_cache"] and r["payload_cache"]["corrupted"]:
        lines.append(f"  ktenv's payload cache entry was corrupted ({r['payload_cache']['corrupted_files'][0]}); extracted again")
    if r["patches"]:
        lines.append(f"  patches re-applied: {len(r['patches'])}")
    if r["payload"]:
        lines.append("  sgl-kernel payload placed again and found by the env's own loader")
    a = r["after"]
    lines.append(f"  verified: the repaired distributions hashed in full, {a['files']} files stat-checked: intact; uv pip check clean")
    return "\n".join(lines)
