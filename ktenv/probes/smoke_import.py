"""Import-tier probe: runs INSIDE the environment under test (its python).

    python smoke_import.py inventory   < {"requirements": [...]}   installed dists vs the lock, modules to import
    python smoke_import.py import MOD [--after A,B]                 import one module (after A, B), report how it went
    python smoke_import.py check NAME  < {...}                      one named check (torch, flashinfer, ...)

Each prints one line `KTENV-RESULT {json}` last on stdout. Every call runs in
its own process (fork_server.py forks them during smoke), so a library that
aborts the interpreter takes down only that call. Standard library only at
module level: the env may be broken in any way, and this must still report.
"""

from __future__ import annotations

import csv
import functools
import importlib
import importlib.metadata as md
import io
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

MARK = "KTENV-RESULT "

# Messages that mean "this needs the NVIDIA driver / a GPU", not "this is broken".
# Each is what a real library prints on a machine without the driver.
NEEDS_GPU = re.compile(
    r"libcuda\.so|No accelerator \(CUDA|NVML|nvml|Found no NVIDIA driver|NVIDIA driver on your system"
    r"|no CUDA-capable device|CUDA driver version is insufficient|cudaErrorNoDevice|CUDA_ERROR_NO_DEVICE"
    r"|cuInit|libnvidia-ml\.so"
)
# What CUDA says in a child forked from a parent that asked torch for the GPU count: the fork
# server allows that only without the NVIDIA driver (KTENV_FORK_WITHOUT_DRIVER), where CUDA fails anyway.
FORK_NO_DRIVER = re.compile(r"Cannot re-initialize CUDA in forked subprocess")


def needs_gpu(tb: str) -> bool:
    return bool(NEEDS_GPU.search(tb) or (os.environ.get("KTENV_FORK_WITHOUT_DRIVER") and FORK_NO_DRIVER.search(tb)))


def emit(obj: dict) -> None:
    sys.stdout.flush()
    sys.stdout.write("\n" + MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- inventory ---------------------------------------------------------------

# Cached per distribution object: the cache holds the object, so its id is never reused for another.
@functools.cache
def _name(dist) -> str:  # dist.metadata parses all of METADATA on every access (~19 s once per RECORD row)
    return dist.metadata["Name"]


@functools.cache
def _record_rows(dist) -> list[tuple[str, str, str]]:
    return [tuple((row + ["", "", ""])[:3]) for row in csv.reader(io.StringIO(dist.read_text("RECORD") or "")) if row]


def _pth_roots(site: Path) -> list[tuple[str, ...]]:
    """Directories that .pth files in site-packages put on sys.path (nvidia-cutlass-dsl's
    `cutlass` lives under nvidia_cutlass_dsl/python_packages/ this way)."""
    roots = []
    for pth in site.glob("*.pth"):
        for line in pth.read_text(errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "import ")) and not os.path.isabs(line) and (site / line).is_dir():
                roots.append(tuple(Path(line).parts))
    return sorted(roots, key=len, reverse=True)


def _is_module_file(name: str) -> str | None:
    if name.endswith(".py"):
        stem = name[:-3]
    elif name.endswith(".so"):
        stem = name.split(".", 1)[0]
    else:
        return None
    return stem if stem.isidentifier() and stem != "__init__" else None


def top_modules(dists: list, site: Path) -> dict[str, list[str]]:
    """dist name -> the modules to import for it, read from RECORD (top_level.txt
    is often incomplete: ktransformers' names only `ktransformers`, yet the wheel
    also ships a payload package).

    A directory with __init__.py is a package; the distribution that ships that
    __init__.py owns it (others only add files to it: ktransformers adds
    sgl_kernel/sm90/). A top directory without one (nvidia/, cuda/, google/) is a
    namespace, and each distribution's own sub-packages are imported instead.
    """
    roots = _pth_roots(site)
    rows: dict[str, list[tuple[str, ...]]] = {}
    init_owners: dict[tuple[str, ...], set[str]] = {}
    for d in dists:
        name = _name(d)
        mine = []
        for path, _, _ in _record_rows(d):
            parts = tuple(path.split("/"))
            if parts[0] in ("..", "") or parts[0].endswith((".dist-info", ".data")) or "__pycache__" in parts:
                continue
            for r in roots:
                if parts[: len(r)] == r and len(parts) > len(r):
                    parts = parts[len(r):]
                    break
            mine.append(parts)
            if parts[-1] == "__init__.py" and len(parts) >= 2:
                init_owners.setdefault(parts[:-1], set()).add(name)
        rows[name] = mine
    out: dict[str, list[str]] = {}
    for d in dists:
        name = _name(d)
        mods: set[str] = set()
        for parts in rows[name]:
            top = parts[0]
            if len(parts) == 1:
                m = _is_module_file(top)
                if m:
                    mods.add(m)
                continue
            if not top.isidentifier():
                continue
            owners = init_owners.get((top,), set())
            if owners == {name}:
                mods.add(top)
            elif not owners or len(owners) > 1:  # a namespace, or a package several dists claim
                sub = parts[1]
                if len(parts) > 2 and name in init_owners.get((top, sub), set()):
                    mods.add(f"{top}.{sub}")
                elif len(parts) == 2 and _is_module_file(sub):
                    mods.add(f"{top}.{_is_module_file(sub)}")
        out[name] = sorted(mods)
    return out


def overlapping_files(dists: list) -> dict[str, list[str]]:
    """Paths that more than one distribution's RECORD claims: the last installed
    wins, so their size cannot be held against either (flashinfer-python and
    torch_c_dlpack_ext both ship a top-level build_backend.py)."""
    seen: dict[str, list[str]] = {}
    for d in dists:
        for path, _, _ in _record_rows(d):
            if "__pycache__" not in path and ".dist-info/" not in path:
                seen.setdefault(path, []).append(_name(d))
    return {p: names for p, names in seen.items() if len(names) > 1}


def _missing_files(dist, root: Path, shared: dict, limit: int = 20) -> tuple[int, list[str]]:
    """Files RECORD lists that are absent or have another size (stat only, no hashing)."""
    bad = []
    count = 0
    for path, _, size in _record_rows(dist):
        if "__pycache__" in path or path.endswith(".pyc"):
            continue
        if path in shared:
            size = ""  # another distribution may have overwritten it
        p = (root / path).resolve() if path.startswith("..") else root / path
        try:
            st = p.stat()
        except OSError:
            count += 1
            if len(bad) < limit:
                bad.append(f"{path} (missing)")
            continue
        if size and size.isdigit() and st.st_size != int(size):
            count += 1
            if len(bad) < limit:
                bad.append(f"{path} (size {st.st_size}, RECORD says {size})")
    return count, bad


def inventory(req: dict) -> dict:
    from_marker = None
    try:  # packaging is in every env this stack builds; without it markers count as true
        from packaging.markers import Marker as from_marker  # type: ignore
    except ImportError:
        pass
    installed = {}
    for d in md.distributions():
        installed.setdefault(_norm(_name(d)), d)
    checked, wrong, missing, skipped = [], [], [], []
    wanted = []
    for r in req.get("requirements", []):
        marker = r.get("marker") or ""
        if marker and from_marker is not None and not from_marker(marker).evaluate():
            skipped.append(f"{r['name']}=={r['version']} ; {marker}")
            continue
        key = _norm(r["name"])
        d = installed.get(key)
        if d is None:
            missing.append(f"{r['name']}=={r['version']}")
            continue
        have = d.version
        same = have == r["version"]
        if not same:
            try:
                from packaging.version import Version

                same = Version(have) == Version(r["version"])
            except Exception:
                pass
        if not same:
            wrong.append(f"{r['name']}: installed {have}, locked {r['version']}")
        checked.append(key)
        wanted.append(d)
    extra = sorted(_name(d) + "==" + d.version for k, d in installed.items() if k not in set(checked))
    root = Path(wanted[0].locate_file("")) if wanted else Path(".")
    damaged = {}
    shared = overlapping_files(wanted)
    for d in wanted:
        n, examples = _missing_files(d, Path(d.locate_file("")), shared)
        if n:
            damaged[_name(d)] = {"count": n, "examples": examples}
    return {
        "python": sys.version.split()[0],
        "site_packages": str(root),
        "checked": len(checked),
        "wrong_version": wrong,
        "missing": missing,
        "not_for_this_python": skipped,
        "extra": extra,
        "damaged": damaged,
        "overlapping": {p: n for p, n in sorted(shared.items())[:50]},
        "modules": top_modules(wanted, root),
    }


# --- import one module ---------------------------------------------------------

def import_one(name: str, after: list[str], passthrough: tuple = ()) -> dict:
    for first in after:
        importlib.import_module(first)
    t = time.perf_counter()
    try:
        importlib.import_module(name)
    except passthrough:
        raise
    except BaseException as e:  # SystemExit from a module body counts as a failure too
        text = f"{type(e).__name__}: {e}"
        tb = traceback.format_exc()
        return {
            "module": name,
            "ok": False,
            "seconds": round(time.perf_counter() - t, 2),
            "error": text[:2000],
            "needs_gpu": needs_gpu(tb),
            "traceback_tail": tb[-1500:],
        }
    return {"module": name, "ok": True, "seconds": round(time.perf_counter() - t, 2)}


# --- named checks ----------------------------------------------------------------

def check_torch(arg: dict) -> dict:
    import torch

    # get_arch_list() answers [] without a GPU; the build's own flags do not need one.
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")() if torch.version.cuda else ""
    return {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "arch_list": (flags or "").split()}


def check_server_args(arg: dict) -> dict:
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    flags = sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))
    return {"flags": len(flags), "has_kt_method": "--kt-method" in flags, "has_kt_weight_path": "--kt-weight-path" in flags}


def _resolve(dotted: str):
    """'a.b:c' -> the attribute c of module a.b (raises what the import raises)."""
    mod, _, attr = dotted.partition(":")
    m = importlib.import_module(mod)
    return getattr(m, attr) if attr else m


def check_flashinfer(arg: dict) -> dict:
    out = {"python_dist": None, "cubin_dist": None, "cubin_module": None, "flashinfer_version": None, "symbols": {}}
    for key, dist in (("python_dist", "flashinfer-python"), ("cubin_dist", "flashinfer-cubin")):
        try:
            out[key] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:  # flashinfer refuses to import beside a cubin of another version; say which versions, then why
        import flashinfer
    except Exception as e:
        tb = traceback.format_exc()
        out["import_error"] = f"{type(e).__name__}: {e}"[:1000]
        out["needs_gpu"] = needs_gpu(tb)
        return out
    out["flashinfer_version"] = getattr(flashinfer, "__version__", None)
    try:
        import flashinfer_cubin

        out["cubin_module"] = getattr(flashinfer_cubin, "__version__", None)
        out["cubin_count"] = len(flashinfer_cubin.list_cubins()) if hasattr(flashinfer_cubin, "list_cubins") else None
    except ImportError as e:
        out["cubin_error"] = str(e)
    for sym in arg.get("symbols", []):
        try:
            _resolve(sym)
            out["symbols"][sym] = "ok"
        except Exception as e:
            out["symbols"][sym] = f"{type(e).__name__}: {e}"[:400]
    return out


def check_tilelang(arg: dict) -> dict:
    out = {}
    try:
        out["tvm_ffi_dist"] = md.version("apache-tvm-ffi")
    except md.PackageNotFoundError:
        out["tvm_ffi_dist"] = None
    import tilelang

    out["tilelang"] = getattr(tilelang, "__version__", None)
    import tvm_ffi

    out["tvm_ffi"] = getattr(tvm_ffi, "__version__", None)
    return out


def check_transformers(arg: dict) -> dict:
    providers = md.packages_distributions().get("transformers", [])
    out = {"providers": sorted(set(providers))}
    import transformers

    out["transformers_version"] = getattr(transformers, "__version__", None)
    out["transformers_file"] = transformers.__file__
    # The class lives in sglang/srt/configs/; find it by model_type so a rename
    # of the module does not silently skip the check.
    import pkgutil

    import sglang.srt.configs as configs

    cls = None
    for info in pkgutil.iter_modules(configs.__path__):
        if "deepseek" not in info.name or "v4" not in info.name:
            continue
        mod = importlib.import_module(f"sglang.srt.configs.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and getattr(obj, "model_type", None) == "deepseek_v4":
                cls = obj
    if cls is None:
        raise LookupError("no config class with model_type 'deepseek_v4' in sglang/srt/configs/")
    out["config_class"] = f"{cls.__module__}.{cls.__qualname__}"
    import dataclasses

    out["is_dataclass"] = dataclasses.is_dataclass(cls)
    cfg = cls(num_hidden_layers=2, n_routed_experts=8, quantization_config={"quant_method": "fp8"})
    # to_json_string goes through to_diff_dict, which is what broke when a
    # dataclass config met transformers 5.x (kvcache-ai/ktransformers#1974).
    blob = json.loads(cfg.to_json_string())
    out["round_trip"] = blob.get("model_type") == "deepseek_v4" and blob.get("num_hidden_layers") == 2
    return out


CHECKS = {
    "torch": check_torch,
    "server_args": check_server_args,
    "flashinfer": check_flashinfer,
    "tilelang": check_tilelang,
    "transformers": check_transformers,
}


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "inventory":
        emit(inventory(json.loads(sys.stdin.read() or "{}")))
        return 0
    if cmd == "import" and len(argv) in (3, 5) and argv[3:4] in ([], ["--after"]):
        emit(import_one(argv[2], argv[4].split(",") if len(argv) == 5 else []))
        return 0
    if cmd == "check" and len(argv) == 3 and argv[2] in CHECKS:
        arg = json.loads(sys.stdin.read() or "{}")
        t = time.perf_counter()
        try:
            result = {"ok": True, **CHECKS[argv[2]](arg)}
        except BaseException as e:
            tb = traceback.format_exc()
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "needs_gpu": needs_gpu(tb),
                      "traceback_tail": tb[-1500:]}
        result["seconds"] = round(time.perf_counter() - t, 2)
        emit(result)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
