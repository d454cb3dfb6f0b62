"""py-rattler, run in a child process: solve, index, install, detect virtual packages.

py-rattler runs Rust worker threads that can crash the interpreter when it
shuts down (an abort in PyGILState_Release, about one run in ten here), so
every rattler call runs in a child process that leaves with os._exit; the
caller only sees JSON. py-rattler is imported only in that child, so ktenv
works without it (inside `nix develop`, say) until a conda step is asked for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import KtenvError


def call(op: str, payload: dict) -> dict:
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", "from ktenv.lock.rattler import worker_main; worker_main()", op],
        input=json.dumps(payload), capture_output=True, text=True, env=env,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise KtenvError(
            f"The conda worker (py-rattler, step {op!r}) died without an answer (exit {proc.returncode}). "
            f"Its output:\n{(proc.stderr or proc.stdout)[-3000:]}\nThat is a crash inside py-rattler; rerun, and "
            "report it with this output if it happens again."
        ) from None
    if "error" in answer:
        kind, message = answer["error"]["kind"], answer["error"]["message"]
        if kind in ("ModuleNotFoundError", "ImportError"):
            raise KtenvError(
                f"The conda backend needs py-rattler, which {sys.executable} cannot import ({message}). "
                "Install it into the Python that runs ktenv (pip install py-rattler; `nix develop` has none), "
                "or use the uv backend (the default)."
            )
        raise RattlerFailure(op, kind, message)
    return answer["result"]


class RattlerFailure(KtenvError):
    def __init__(self, op: str, kind: str, message: str):
        super().__init__(f"py-rattler failed at step {op!r} ({kind}): {message}")
        self.kind, self.message = kind, message


def worker_main() -> None:
    op = sys.argv[1]
    try:
        import asyncio

        result = asyncio.run(_WORKER_OPS[op](json.loads(sys.stdin.read())))
        out = {"result": result}
    except Exception as e:  # every failure goes back to the parent as data
        out = {"error": {"kind": type(e).__name__, "message": str(e)}}
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


async def _op_index(p: dict) -> dict:
    from rattler.index import index_fs

    root = Path(p["channel"])
    (root / "noarch").mkdir(parents=True, exist_ok=True)  # conda channels always have noarch
    await index_fs(root, write_zst=False, write_shards=False, force=p.get("force", False))
    return {}


def _record_dict(r) -> dict:
    from rattler import MatchSpec

    deps: dict[str, list[str]] = {}
    for d in r.depends:
        m = MatchSpec(d)
        deps.setdefault(m.name.normalized, [])
        if m.version is not None:
            deps[m.name.normalized].append(str(m.version))
    return {
        "name": r.name.normalized, "version": str(r.version), "build": str(r.build), "subdir": r.subdir,
        "url": r.url, "file_name": r.file_name, "channel": r.channel,
        "md5": r.md5.hex() if r.md5 else None, "sha256": r.sha256.hex() if r.sha256 else None,
        "dependencies": {k: ",".join(v) for k, v in deps.items()}, "depends": list(r.depends),
        # When the package was published (CEP 47's indexed time where the
        # channel gives one): what names a package the cut-off excluded.
        "timestamp": r.timestamp.isoformat() if getattr(r, "timestamp", None) else None,
    }


async def _op_solve(p: dict) -> dict:
    import datetime

    import rattler
    from rattler import BuildString, GenericVirtualPackage, PackageName

    virtual = []
    for name, value in p["virtual"].items():
        version, _, build = value.partition(" ")
        virtual.append(GenericVirtualPackage(PackageName(name), rattler.Version(version), BuildString(build or "0")))
    cutoff = None
    if p.get("exclude_newer"):
        cutoff = datetime.datetime.fromisoformat(p["exclude_newer"].replace("Z", "+00:00"))
    records = await rattler.solve(
        p["channels"], p["specs"], platforms=[p["subdir"], "noarch"], virtual_packages=virtual,
        exclude_newer=cutoff, timestamp_policy="allow-missing",
    )
    return {"records": sorted((_record_dict(r) for r in records), key=lambda r: r["name"])}


async def _op_install(p: dict) -> dict:
    import rattler
    from rattler import RepoDataRecord

    records = []
    for item in p["packages"]:
        # The metadata comes from the (hash-checked) archive itself, as with
        # micromamba: the lock carries no noarch type or build number.
        rec = await RepoDataRecord.from_package_archive(item["path"])
        rec.url = Path(item["path"]).as_uri()
        rec.channel = item["channel"]
        records.append(rec)
    await rattler.install(
        records, p["prefix"], cache_dir=p["cache"], installed_packages=[], show_progress=False,
        execute_link_scripts=False, platform=rattler.Subdir(p["subdir"]),
        # Linked into the build directory, but the final prefix is what goes
        # into files that carry conda's prefix placeholder: the build is
        # renamed into place, and conda prefixes are not relocatable.
        alternative_target_prefix=p.get("final_prefix") or None,
    )
    return {"installed": len(records)}


async def _op_detect(p: dict) -> dict:
    from rattler import VirtualPackage, VirtualPackageOverrides

    found = {}
    for vp in VirtualPackage.detect(VirtualPackageOverrides.from_env()):
        g = vp.into_generic()
        found[g.name.normalized] = str(g.version)
    return {"virtual": found}


_WORKER_OPS = {"index": _op_index, "solve": _op_solve, "install": _op_install, "detect": _op_detect}


def index_channel(path: Path | str, force: bool = False) -> None:
    """Write repodata.json for a directory of .conda packages (linux-64/, noarch/).

    Packages already in the index keep their indexed_timestamp (CEP 47), so
    a package added later is newer than a cut-off set in between."""
    try:
        call("index", {"channel": str(Path(path).resolve()), "force": force})
    except RattlerFailure as e:
        raise KtenvError(f"Indexing the conda channel {path} failed: {e.message}") from None
